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


def fit_two_layer_lm(root, callback: pl.Callback, max_steps: int, ckpt_path=None, save_at: int | None = None):
    """A seeded 2-layer byte LM fitted with ``callback`` (and a checkpoint every ``save_at`` steps); returns the
    module. The shared run of the monitors' resume tests."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_moe.data.byte_corpus import ByteCorpusDataModule
    from lightning_moe.modules import MoELanguageModel

    pl.seed_everything(0, workers=True)
    module = MoELanguageModel(**{**TINY, "vocab_size": 256, "n_layers": 2}, warmup_steps=2)
    callbacks = [callback]
    if save_at is not None:
        callbacks.append(ModelCheckpoint(root / "ckpt", "{step}", every_n_train_steps=save_at, save_top_k=-1))
    pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=save_at is not None, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
               callbacks=callbacks, default_root_dir=root, accelerator="cpu").fit(
        module, datamodule=ByteCorpusDataModule(seq_len=16, batch_size=2, bytes_per_domain=3000), ckpt_path=ckpt_path)
    return module


class PoisonAtStep2(pl.Callback):
    """Fills the second MoE layer's router weights with NaN at the start of optimizer step 2."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            from lightning_moe import moe_layers

            with torch.no_grad():
                moe_layers(pl_module.model)[1].router.layer.weight.fill_(float("nan"))


def fit_poisoned_at_step_2(tmp_path) -> pl.Trainer:
    """Fit a 2-layer tiny LM for 5 steps with :class:`PoisonAtStep2`; the caller expects it to raise."""
    from lightning_moe.modules import MoELanguageModel

    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[PoisonAtStep2()])
    trainer.fit(MoELanguageModel(**{**TINY, "n_layers": 2}), datamodule=TinyLMData())
    return trainer
