"""Exact resume: a run resumed from the checkpoint its ModelCheckpoint wrote mid-epoch reproduces the rest of the
uninterrupted run bit for bit — the batches, per-step losses, every parameter and router buffer, and the load
monitor's state — with the shipped ByteCorpusDataModule, whose training loader resumes mid-epoch.

(A checkpoint written by ``trainer.save_checkpoint`` after a ``max_steps`` fit has returned is not a mid-epoch
one: Lightning has closed the epoch by then, and a run resumed from it starts the next epoch.)

Stateful routers are the point: the sign-rule bias (SigmoidTopK), the EMA centroids (KMeansRouter) and the
precision estimate (TransitionRouter) live in buffers that must round-trip through the checkpoint, and their
per-step accumulators must be empty when it is taken. Runs are compared with torch.equal, which relies on
conftest's one intra-op thread (CPU reductions in a fixed order).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.callbacks import LoadBalanceMonitor
from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.data.windows import EpochShuffle, ResumableLoader
from lightning_moe.gating import KMeansRouter, SigmoidTopK, TransitionRouter
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TINY

ROUTERS = {
    "sigmoid_topk": lambda: SigmoidTopK(bias_update_rate=1e-2),
    "kmeans": lambda: KMeansRouter(),
    "transition": lambda: TransitionRouter(beta=True, precision=True, anticipation=True),
}


class LossRecorder(pl.Callback):
    """The training loss and tokens of every optimizer step, keyed by the global step it was taken at."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step has already advanced past this batch's optimizer step.
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()
        self.tokens[trainer.global_step - 1] = batch["tokens"].clone()


def _data(batch_size: int = 2) -> ByteCorpusDataModule:
    # 35 training batches of 2 windows (4 of 16): a few kB of the embedded corpus.
    return ByteCorpusDataModule(seq_len=16, batch_size=batch_size, bytes_per_domain=3000)


def _fit(root, router: str, max_steps: int = -1, max_epochs=None, batch_size=2, ckpt_path=None, save_at=None):
    """Train; with ``save_at``, checkpoint after that optimizer step (into ``root/ckpt``) as a run would."""
    pl.seed_everything(0, workers=True)
    module = MoELanguageModel(**{**TINY, "vocab_size": 256}, router=ROUTERS[router](), warmup_steps=2)
    recorder, monitor = LossRecorder(), LoadBalanceMonitor(every_n_steps=2)
    callbacks = [recorder, monitor]
    if save_at is not None:
        callbacks.append(ModelCheckpoint(root / "ckpt", "{step}", every_n_train_steps=save_at, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=save_at is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=_data(batch_size), ckpt_path=ckpt_path)
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


def _assert_resumed_equals_full(full_run, resumed_run, resumed_steps) -> None:
    full, full_losses, full_monitor, _ = full_run
    resumed, resumed_losses, resumed_monitor, _ = resumed_run
    assert sorted(resumed_losses.losses) == resumed_steps
    for step in resumed_steps:
        assert torch.equal(resumed_losses.tokens[step], full_losses.tokens[step]), f"batch {step} differs"
        assert torch.equal(resumed_losses.losses[step], full_losses.losses[step]), f"loss at step {step} differs"
    _assert_states_equal(full.state_dict(), resumed.state_dict())
    _assert_nested_equal(full_monitor.state_dict(), resumed_monitor.state_dict())


@pytest.mark.parametrize("router", list(ROUTERS))
def test_resume_reproduces_uninterrupted_run(tmp_path, router, recwarn):
    full = _fit(tmp_path, router, max_steps=6, save_at=3)
    resumed = _fit(tmp_path / "resumed", router, max_steps=6, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert not [w for w in recwarn if "not resumable" in str(w.message)]  # Lightning sees a stateful loader
    assert resumed[3].global_step == 6
    assert sorted(full[1].losses) == list(range(6))
    _assert_resumed_equals_full(full, resumed, [3, 4, 5])


def test_epoch_based_resume_continues_mid_epoch_and_into_the_next(tmp_path):
    # 4 batches per epoch; resumed at step 6 (mid epoch 2 of 3). max_epochs makes MoELanguageModel's schedule
    # build the loader before the checkpoint is restored, the case where Lightning drops the loader's own state
    # (issue #20550) and the data module's copy has to carry it.
    full = _fit(tmp_path, "sigmoid_topk", max_epochs=3, batch_size=16, save_at=6)
    resumed = _fit(tmp_path / "resumed", "sigmoid_topk", max_epochs=3, batch_size=16,
                   ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert sorted(full[1].losses) == list(range(12))
    _assert_resumed_equals_full(full, resumed, list(range(6, 12)))


def _loader(n=10, batch_size=2, seed=3) -> ResumableLoader:
    return ResumableLoader(list(range(n)), batch_size, EpochShuffle(n, seed))


def test_loader_resumes_at_the_next_batch_in_the_same_order():
    first = _loader()
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(2)]
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    resumed.sampler.set_epoch(1)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).view(5, 2).tolist()
    assert seen + [b.tolist() for b in resumed] == order
    # The saved position is spent: the next pass is a whole epoch again.
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == 5


def test_loader_state_from_other_data_is_refused():
    state = _loader(n=10).state_dict()
    with pytest.raises(ValueError, match="5 batches per epoch, this one has 6"):
        _loader(n=12).load_state_dict(state)


def test_ranks_share_out_the_single_process_batches():
    # Rank r of R takes positions r, r + R, ... of the epoch's permutation: each step's two rank batches of 2 are
    # the single process's batch of 4.
    n, seed = 11, 5
    single = [b.tolist() for b in ResumableLoader(list(range(n)), 4, EpochShuffle(n, seed))]
    ranks = [[b.tolist() for b in ResumableLoader(list(range(n)), 2, EpochShuffle(n, seed, 2, r))] for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])
        assert batch[0::2] == ranks[0][step] and batch[1::2] == ranks[1][step]


def test_loader_counts_batches_handed_out_not_prefetched_by_workers():
    loader = ResumableLoader(list(range(10)), 2, EpochShuffle(10, 3), num_workers=1)
    it = iter(loader)
    first = [next(it).tolist() for _ in range(2)]  # the worker has prepared more by now (prefetch_factor=2)
    assert loader.state_dict()["batches"] == 2
    resumed = _loader()
    resumed.load_state_dict(loader.state_dict())
    del it
    assert first + [b.tolist() for b in resumed] == [b.tolist() for b in _loader()]
