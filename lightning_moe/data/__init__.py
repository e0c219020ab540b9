"""DataModules. Every batch is a dict with ``tokens``, ``labels`` (next tokens) and, where known, per-token
``domain_ids``."""

from lightning_moe.data.byte_corpus import DOMAINS, ByteCorpusDataModule, build_byte_corpus
from lightning_moe.data.text import TextDataModule

__all__ = ["DOMAINS", "ByteCorpusDataModule", "TextDataModule", "build_byte_corpus"]
