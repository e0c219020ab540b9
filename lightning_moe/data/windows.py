"""Fixed-length next-token windows over one token stream, shared by the text DataModules."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: inputs are the first ``seq_len``, labels the last."""

    def __init__(self, tokens: Tensor, seq_len: int, domain_ids: Tensor | None = None) -> None:
        n = (tokens.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(
                f"the token stream has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use more text or a shorter seq_len."
            )
        self.tokens, self.domain_ids, self.seq_len, self.n = tokens, domain_ids, seq_len, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        start = i * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()
        item = {"tokens": chunk[:-1], "labels": chunk[1:]}
        if self.domain_ids is not None:
            item["domain_ids"] = self.domain_ids[start : start + self.seq_len].long()
        return item


def check_loader_args(seq_len: int, batch_size: int, num_workers: int) -> None:
    from lightning_moe.utils import check_non_negative, check_positive_int

    check_positive_int("seq_len", seq_len)
    check_positive_int("batch_size", batch_size)
    check_non_negative("num_workers", num_workers)


def split_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class WindowDataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``/``"val"`` :class:`TokenWindows`), filled by a subclass's ``setup``."""

    seq_len: int
    batch_size: int
    num_workers: int
    seed: int
    splits: dict[str, TokenWindows]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=split_generator(self.seed), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        # One fixed shuffled order: a `limit_val_batches` prefix then samples the whole split (both domains)
        # instead of its first documents, and every validation run sees the same windows.
        val = self.splits["val"]
        order = torch.randperm(len(val), generator=split_generator(self.seed)).tolist()
        return DataLoader(Subset(val, order), self.batch_size, num_workers=self.num_workers)
