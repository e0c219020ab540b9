"""Exact resume: stopping after 3 optimizer steps and resuming from the checkpoint reproduces an uninterrupted
6-step run bit for bit — per-step losses, every parameter and router buffer, and the load monitor's state.

Stateful routers are the point: the sign-rule bias (SigmoidTopK), the EMA centroids (KMeansRouter) and the
precision estimate (TransitionRouter) live in buffers that must round-trip through the checkpoint, and their
per-step accumulators must be empty when it is taken. Runs are compared with torch.equal, which relies on
conftest's one intra-op thread (CPU reductions in a fixed order).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.callbacks import LoadBalanceMonitor
from lightning_moe.gating import KMeansRouter, SigmoidTopK, TransitionRouter
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TINY, TinyLMData


ROUTERS = {
    "sigmoid_topk": lambda: SigmoidTopK(bias_update_rate=1e-2),
    "kmeans": lambda: KMeansRouter(),
    "transition": lambda: TransitionRouter(beta=True, precision=True, anticipation=True),
}


class ResumableTinyLMData(TinyLMData):
    """TinyLMData whose training order survives a mid-epoch resume.

    Lightning restores the loop's batch index, but a plain map-style DataLoader restarts at its first batch (it
    warns "your dataloader is not resumable"), so a resumed run would see batches 0, 1, 2 where the
    uninterrupted run sees 3, 4, 5. The data module counts the training batches it handed to the model (in
    ``on_after_batch_transfer``, which sees consumed batches only, not the fetcher's prefetched one), checkpoints
    that count, and starts the resumed loader after them. Only the first epoch is meant to be resumed into; the
    tests stay inside it (6 steps of 8 batches).
    """

    def __init__(self) -> None:
        super().__init__()
        self.consumed = 0
        self.skip = 0

    def train_dataloader(self) -> DataLoader:
        # Same length as the uninterrupted loader (Lightning ends the epoch by the restored batch index against
        # the loader's length, so a shortened loader would end it early): rotate instead of slicing.
        start = self.skip * self.batch_size
        order = list(range(start, len(self.items))) + list(range(start))
        return DataLoader([self.items[i] for i in order], self.batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed = self.skip = state_dict["consumed"]


class LossRecorder(pl.Callback):
    """The training loss and tokens of every optimizer step, keyed by the global step it was taken at."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step has already advanced past this batch's optimizer step.
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()
        self.tokens[trainer.global_step - 1] = batch["tokens"].clone()


def _fit(tmp_path, router: str, max_steps: int, ckpt_path=None, save_to=None):
    pl.seed_everything(0, workers=True)
    # warmup_steps=8 keeps all 6 steps in the linear warmup, whose rate does not depend on the run length. The
    # cosine decay after it is planned over trainer.estimated_stepping_batches, so a max_steps=3 run plans a
    # different decay than the max_steps=6 run it is compared with (its optimizer leaves step 3 at min_lr): that
    # is the schedule following max_steps, not a resume fault, and would hide real resume differences here.
    module = MoELanguageModel(**TINY, router=ROUTERS[router](), warmup_steps=8)
    recorder, monitor = LossRecorder(), LoadBalanceMonitor(every_n_steps=2)
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
        callbacks=[recorder, monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=ResumableTinyLMData(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module, recorder, monitor, trainer


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs after resume"


def _assert_nested_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"monitor state {path} differs after resume"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"monitor state {path} keys differ: {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"monitor state {path} lengths differ: {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"monitor state {path} differs: {a!r} vs {b!r}"


@pytest.mark.parametrize("router", list(ROUTERS))
def test_resume_reproduces_uninterrupted_run(tmp_path, router):
    full, full_losses, full_monitor, _ = _fit(tmp_path / "full", router, max_steps=6)

    ckpt = tmp_path / "half.ckpt"
    _fit(tmp_path / "first", router, max_steps=3, save_to=ckpt)
    resumed, resumed_losses, resumed_monitor, trainer = _fit(tmp_path / "second", router, max_steps=6, ckpt_path=ckpt)

    assert trainer.global_step == 6
    assert sorted(full_losses.losses) == list(range(6))
    assert sorted(resumed_losses.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert torch.equal(resumed_losses.tokens[step], full_losses.tokens[step]), f"batch {step} differs"
        assert torch.equal(resumed_losses.losses[step], full_losses.losses[step]), f"loss at step {step} differs"
    _assert_states_equal(full.state_dict(), resumed.state_dict())
    _assert_nested_equal(full_monitor.state_dict(), resumed_monitor.state_dict())
