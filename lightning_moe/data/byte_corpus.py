"""The embedded default data: a byte-level two-domain corpus built from text every Python installation ships.

* ``code``: the standard library's top-level ``.py`` sources, in sorted file order.
* ``prose``: the pydoc topic texts (``pydoc_data.topics``), in sorted key order.

Documents are shuffled with a seed and concatenated into one byte stream, so training windows cross document
boundaries and therefore domain boundaries: the per-token ``domain_ids`` in every batch record where.
Exact bytes depend on the Python version (its standard library), never on the network.
"""

from __future__ import annotations

import os
import sysconfig

import torch
from torch import Tensor

from lightning_moe.data.windows import TokenWindows, WindowDataModule, check_loader_args, split_generator
from lightning_moe.utils import check_positive

DOMAINS: tuple[str, ...] = ("code", "prose")


def _documents(domain: str, max_bytes: int) -> list[bytes]:
    if domain == "code":
        lib = sysconfig.get_paths()["stdlib"]
        names = sorted(f for f in os.listdir(lib) if f.endswith(".py"))
        texts = (open(os.path.join(lib, f), "rb").read() for f in names)
    else:
        from pydoc_data.topics import topics

        texts = (topics[k].encode("utf-8") for k in sorted(topics))
    docs, total = [], 0
    for t in texts:
        if total >= max_bytes:
            break
        t = t[: max_bytes - total]
        docs.append(t)
        total += len(t)
    return docs


def build_byte_corpus(bytes_per_domain: int, val_fraction: float, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Return ``{"train": (bytes_N, domain_ids_N), "val": (...)}`` as uint8 / int8 tensors.

    Whole documents from the end of each domain, about ``val_fraction`` of its bytes, are held out, so no
    document appears in both splits.
    """
    g = split_generator(seed)
    split_docs: dict[str, list[tuple[bytes, int]]] = {"train": [], "val": []}
    for d, domain in enumerate(DOMAINS):
        docs = _documents(domain, bytes_per_domain)
        # Hold out whole documents from the end until they reach val_fraction of the domain's bytes.
        n_val, val_bytes = 0, 0
        while n_val < len(docs) - 1 and val_bytes < val_fraction * sum(map(len, docs)):
            n_val += 1
            val_bytes += len(docs[-n_val])
        split_docs["train"] += [(t, d) for t in docs[:-n_val]]
        split_docs["val"] += [(t, d) for t in docs[-n_val:]]
    out = {}
    for split, docs in split_docs.items():
        order = torch.randperm(len(docs), generator=g).tolist()
        data = b"".join(docs[i][0] for i in order)
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        domains = torch.cat([torch.full((len(docs[i][0]),), docs[i][1], dtype=torch.int8) for i in order])
        out[split] = (tokens, domains)
    return out


class ByteCorpusDataModule(WindowDataModule):
    """Byte-level code/prose corpus (vocabulary 256) with per-token domain labels; needs no download.

    Args:
        seq_len: tokens per training window.
        batch_size: windows per batch.
        bytes_per_domain: bytes taken from each domain (the prose domain has about 460 kB in all).
        val_fraction: share of each domain's bytes held out (whole documents) for validation.
        seed: seed of the document shuffle.
        num_workers: DataLoader worker processes.
    """

    vocab_size = 256
    domains = DOMAINS

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        bytes_per_domain: int = 400_000,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(seq_len, batch_size, num_workers)
        check_positive("bytes_per_domain", bytes_per_domain)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}.")
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.bytes_per_domain, self.val_fraction, self.seed = bytes_per_domain, val_fraction, seed
        self.splits: dict[str, TokenWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            corpus = build_byte_corpus(self.bytes_per_domain, self.val_fraction, self.seed)
            self.splits = {k: TokenWindows(t, self.seq_len, d) for k, (t, d) in corpus.items()}
