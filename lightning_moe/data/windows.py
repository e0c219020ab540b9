"""Fixed-length next-token windows over one token stream, shared by the text DataModules, and a training loader
that resumes mid-epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset


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


class EpochShuffle(DistributedSampler):
    """The training order: epoch ``e`` is ``randperm(n)`` seeded with ``seed + e`` (torch's ``DistributedSampler``
    convention), cut to a multiple of ``num_replicas`` and dealt out by stride, rank ``r`` taking positions
    ``r, r + R, ...``. A data-parallel step of ``R`` ranks with ``b`` windows each therefore trains on the same
    ``R * b`` windows as one process with batch size ``R * b``.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP instead of swapping in its own (which
    could not resume). ``skip`` leaves out the first positions of this rank's share: the part of the epoch a
    resumed run has already trained on (see :class:`ResumableLoader`). Outside a Trainer, call ``set_epoch``
    before each epoch, as with any ``DistributedSampler``.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # Only len(dataset) is read; a range stands in for the dataset.
        super().__init__(range(n), num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)


class ResumableLoader(DataLoader):
    """A training DataLoader over an :class:`EpochShuffle` that checkpoints its place in the epoch.

    ``state_dict()`` is ``{"epoch", "batches", "batches_per_epoch"}``: the batches of the current epoch handed
    out so far. After ``load_state_dict``, the next epoch iterated, if it is the saved one, starts at the next
    batch, in the same order; the epoch keeps its full ``len()``, as Lightning counts the restored batches
    against it. Batches are counted when handed out, not when workers prepare them, and Lightning does not read
    ahead of a loader with a length: at a checkpoint the count is the batches the model has trained on.
    """

    sampler: EpochShuffle

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffle, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
        self.epoch = self.batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator:
        # A generator: none of this runs until the first batch is drawn. Lightning creates the iterator before it
        # sets the sampler's epoch and, for some strategies, before it restores a checkpoint.
        resume, self._resume = self._resume, None
        self.epoch = self.sampler.epoch
        self.batches = resume["batches"] if resume is not None and resume["epoch"] == self.epoch else 0
        self.sampler.skip = self.batches * self.batch_size
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "batches_per_epoch": len(self)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict["batches_per_epoch"] != len(self):
            raise ValueError(
                f"the checkpoint's training loader had {state_dict['batches_per_epoch']} batches per epoch, this one "
                f"has {len(self)}: the data changed (corpus, seq_len, batch_size, number of ranks). Resume with the "
                "data settings of the checkpointed run, or start a new run from its weights."
            )
        self._resume = dict(state_dict)


class WindowDataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``/``"val"`` :class:`TokenWindows`), filled by a subclass's ``setup``.

    The training loader is a :class:`ResumableLoader`: a run resumed from a mid-epoch checkpoint continues at
    the next batch. Under data parallelism it shards the windows itself (see :class:`EpochShuffle`).
    """

    seq_len: int
    batch_size: int
    num_workers: int
    seed: int
    splits: dict[str, TokenWindows]
    _train_loader: ResumableLoader | None = None
    _train_position: dict[str, int] | None = None

    def train_dataloader(self) -> ResumableLoader:
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) or {}
        sampler = EpochShuffle(len(self.splits["train"]), self.seed, kwargs.get("num_replicas", 1),
                               kwargs.get("rank", 0))
        self._train_loader = ResumableLoader(self.splits["train"], self.batch_size, sampler, self.num_workers)
        if self._train_position is not None:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None
        return self._train_loader

    # Lightning checkpoints the loader's state itself, with the fit loop, but on an epoch-based run whose
    # configure_optimizers reads trainer.estimated_stepping_batches (as MoELanguageModel's schedule does) it
    # builds the loader before restoring and never hands the state back (Lightning issue #20550). The data
    # module's own state is restored in time in every case; when both arrive, they hold the same position.
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_loader" not in state_dict:
            return
        if self._train_loader is not None:  # strategies that restore after building the loaders
            self._train_loader.load_state_dict(state_dict["train_loader"])
        else:
            self._train_position = state_dict["train_loader"]

    def val_dataloader(self) -> DataLoader:
        # One fixed shuffled order: a `limit_val_batches` prefix then samples the whole split (both domains)
        # instead of its first documents, and every validation run sees the same windows.
        val = self.splits["val"]
        order = torch.randperm(len(val), generator=split_generator(self.seed)).tolist()
        return DataLoader(Subset(val, order), self.batch_size, num_workers=self.num_workers)
