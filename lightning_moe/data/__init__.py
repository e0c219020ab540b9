"""DataModules. Every batch is a dict with ``tokens``, ``labels`` (next tokens) and, where known, per-token
``domain_ids``."""

from lightning_moe.data.byte_corpus import DOMAINS, ByteCorpusDataModule, build_byte_corpus
from lightning_moe.data.task_routing import TaskRoutingDataModule, TemplateKVTasks
from lightning_moe.data.text import TextDataModule
from lightning_moe.data.transitions import TransitionTaskDataModule
from lightning_moe.data.windows import EpochShuffle, ResumableLoader, WindowDataModule

__all__ = [
    "DOMAINS",
    "ByteCorpusDataModule",
    "EpochShuffle",
    "ResumableLoader",
    "TaskRoutingDataModule",
    "TemplateKVTasks",
    "TextDataModule",
    "TransitionTaskDataModule",
    "WindowDataModule",
    "build_byte_corpus",
]
