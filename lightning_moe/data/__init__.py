"""DataModules. Every batch is a dict with ``tokens``, ``labels`` (next tokens) and, where known, per-token
``domain_ids``."""

from lightning_moe.data.batch import IGNORE_INDEX
from lightning_moe.data.byte_corpus import DOMAINS, ByteCorpusDataModule, build_byte_corpus
from lightning_moe.data.text import TextDataModule
from lightning_moe.data.windows import EpochShuffle, ResumableLoader, WindowDataModule

__all__ = [
    "DOMAINS",
    "ByteCorpusDataModule",
    "IGNORE_INDEX",
    "EpochShuffle",
    "ResumableLoader",
    "TextDataModule",
    "WindowDataModule",
    "build_byte_corpus",
]
