"""A training process killed with SIGKILL (no exception, no cleanup) resumes from its last checkpoint with nothing
lost: the resumed run's later losses, parameters and router state equal an uninterrupted run's, bit for bit.

Lightning writes a checkpoint to a temporary file and renames it into place (fsspec's transaction; the
temporary file lies in ``tempfile.gettempdir()``), so a kill during a write leaves the previous ``last.ckpt``
whole. That holds when the temporary directory is on the checkpoint folder's filesystem: across filesystems the
"rename" is a copy, which a kill can cut short.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileOpener
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.gating import SigmoidTopK
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TINY

STEPS = 6


class Recorder(pl.Callback):
    """Per-step training losses keyed by global step; with ``hold_after``, the run idles for a minute once that
    many steps are done (and checkpointed), long enough for a test to kill it there."""

    def __init__(self, hold_after: int | None = None) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.hold_after = hold_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hold_after is not None and trainer.global_step >= self.hold_after:
            time.sleep(60)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()


def _train(root, hold_after: int | None = None, ckpt_path=None):
    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = MoELanguageModel(**{**TINY, "vocab_size": 256}, router=SigmoidTopK(bias_update_rate=1e-2),
                              warmup_steps=2)
    recorder = Recorder(hold_after)
    checkpoints = ModelCheckpoint(os.path.join(root, "ckpt"), "{step}", every_n_train_steps=1, save_top_k=-1,
                                  save_last=True)
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, deterministic=True, callbacks=[recorder, checkpoints],
                         default_root_dir=root)
    data = ByteCorpusDataModule(seq_len=16, batch_size=2, bytes_per_domain=3000)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, recorder


def _kill_during_last_ckpt_write(root, at_step: int):
    """Train, and SIGKILL this process halfway through writing ``last.ckpt`` after step ``at_step``."""
    tempfile.tempdir = os.path.join(root, "tmp")  # where Lightning's temporary checkpoint file goes
    os.makedirs(tempfile.tempdir)
    write, step_file = LocalFileOpener.write, os.path.join(root, "ckpt", f"step={at_step}.ckpt")

    def cut_short(self, data):
        if os.path.basename(self.path) == "last.ckpt" and os.path.exists(step_file):
            write(self, data[: len(data) // 2])
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, data)

    LocalFileOpener.write = cut_short
    _train(root)


def _run_killed(target, args, until_exists=None) -> int:
    """Run ``target`` in a forked process (it inherits the imports); SIGKILL it once ``until_exists`` appears."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    deadline = time.monotonic() + 120
    while until_exists is not None and not os.path.exists(until_exists) and process.is_alive():
        assert time.monotonic() < deadline, "the training process never wrote its checkpoint"
        time.sleep(0.02)
    if until_exists is not None:
        os.kill(process.pid, signal.SIGKILL)
    process.join(120)
    return process.exitcode


def _assert_resumed_equals_full(resumed, full, first_step: int) -> None:
    (module, recorder), (full_module, full_recorder) = resumed, full
    assert sorted(recorder.losses) == list(range(first_step, STEPS))
    for step, loss in recorder.losses.items():
        assert torch.equal(loss, full_recorder.losses[step]), f"loss at step {step} differs"
    full_state = full_module.state_dict()
    for key, value in module.state_dict().items():  # parameters and the router's expert_bias
        assert torch.equal(value, full_state[key]), f"{key} differs after the resume"


def _step_of(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    full = _train(tmp_path / "full")
    root = tmp_path / "killed"
    exitcode = _run_killed(_train, (str(root), 2), until_exists=root / "ckpt" / "step=2.ckpt")
    assert exitcode == -signal.SIGKILL
    # Killed once step=2.ckpt appeared: before or after last.ckpt was rewritten with step 2.
    resume_step = _step_of(root / "ckpt" / "last.ckpt")
    assert resume_step in (1, 2)
    _assert_resumed_equals_full(_train(root, ckpt_path="last"), full, resume_step)


def test_checkpoint_cut_off_mid_write_is_never_picked_up(tmp_path):
    full = _train(tmp_path / "full")
    root = tmp_path / "killed"
    assert _run_killed(_kill_during_last_ckpt_write, (str(root), 3)) == -signal.SIGKILL
    # The half-written file is the temporary one; last.ckpt still holds step 2, whole.
    (partial,) = (root / "tmp").iterdir()
    assert 0 < partial.stat().st_size < (root / "ckpt" / "step=3.ckpt").stat().st_size
    assert _step_of(root / "ckpt" / "last.ckpt") == 2
    _assert_resumed_equals_full(_train(root, ckpt_path="last"), full, 2)
