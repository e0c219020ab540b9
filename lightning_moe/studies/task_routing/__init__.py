"""Task routing with templates and key-value dictionaries (arXiv 2606.14398): the task generator, the oracle
router, the LM with the task-routing loss, and the report section. Recipes: ``recipes/task_routing/``."""

from lightning_moe.studies.task_routing.data import TaskRoutingDataModule, TemplateKVTasks
from lightning_moe.studies.task_routing.module import TaskRoutingLM
from lightning_moe.studies.task_routing.oracle import OracleRouter

__all__ = ["OracleRouter", "TaskRoutingDataModule", "TaskRoutingLM", "TemplateKVTasks"]
