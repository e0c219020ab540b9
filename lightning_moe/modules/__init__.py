"""LightningModules: the MoE language model and the studies' task-specific modules."""

from lightning_moe.modules.language_model import MoELanguageModel
from lightning_moe.modules.task_routing import TaskRoutingLM
from lightning_moe.modules.transitions import (
    TransitionCharLM,
    TransitionPrecisionRegression,
    TransitionRoutingToy,
    TransitionSequenceRouting,
)

__all__ = [
    "MoELanguageModel",
    "TaskRoutingLM",
    "TransitionCharLM",
    "TransitionPrecisionRegression",
    "TransitionRoutingToy",
    "TransitionSequenceRouting",
]
