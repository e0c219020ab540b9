"""Fixtures shared by tests: fixed routings and a tiny in-memory language-model data module."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_moe.gating.base import Routing


# A one-layer MoE language model small enough for many Lightning fits per test file.
TINY = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=32)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Absolute error relative to the tensor's scale: a weight gradient is a sum over tokens, so an element near
    zero can carry the rounding of its larger terms (and bf16 rounds at 8 mantissa bits)."""
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


def fixed_routing(T: int, E: int, K: int, allowed: list[int] | None = None, seed: int = 0) -> Routing:
    """Distinct experts per token drawn from ``allowed`` (default all), random positive weights with grad."""
    g = torch.Generator().manual_seed(seed)
    allowed_t = torch.tensor(allowed if allowed is not None else list(range(E)))
    experts_TK = torch.stack([allowed_t[torch.randperm(len(allowed_t), generator=g)[:K]] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=g).requires_grad_()
    return Routing(experts_TK, weights_TK, torch.full((T, E), 1.0 / E))


class TinyLMData(pl.LightningDataModule):
    """Random token batches with two domain labels, for fast Lightning smoke tests."""

    vocab_size = 32

    def __init__(self, batches: int = 8, batch_size: int = 2, seq_len: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab_size, (batches * batch_size, seq_len + 1), generator=g)
        domains = (torch.arange(seq_len) >= seq_len // 2).long().expand(batches * batch_size, -1)
        self.items = [
            {"tokens": t[:-1], "labels": t[1:], "domain_ids": d} for t, d in zip(tokens, domains)
        ]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items[: 2 * self.batch_size], self.batch_size)
