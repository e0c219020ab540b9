"""Data parallelism on CPU (2 gloo processes): training the MoE language model leaves stateful router buffers
bit-identical on both ranks, and equal to one process taking the same global batches.

The shipped data module deals each epoch's permutation out by stride (rank r takes positions r, r + 2, ...),
so the two ranks' batches of 2 windows make up exactly the single process's batch of 4. Router statistics are
summed over ranks before each update, so both runs update from the same counts; what differs is float
summation order (DDP averages two half-batch gradients, one process reduces all tokens at once), which is
where the tolerance below comes from.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.gating import KMeansRouter, SigmoidTopK, TransitionRouter
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TINY

STEPS = 4
# No per-rank aux loss that is non-linear in the batch (a Switch balance loss of half a batch is not half the
# loss of the whole batch): with it DDP would train a different objective, not just sum in another order.
ROUTERS = {
    "sigmoid": lambda: SigmoidTopK(bias_update_rate=1e-2),
    "kmeans": lambda: KMeansRouter(bias_update_rate=1e-2),
    "transition": lambda: TransitionRouter(beta=False, precision=True, anticipation=False, load_balancing_weight=0),
}


def tiny_lm(router: str, **model_kwargs) -> MoELanguageModel:
    pl.seed_everything(0)
    return MoELanguageModel(**{**TINY, "vocab_size": 256, **model_kwargs}, router=ROUTERS[router](), warmup_steps=2)


def tiny_data(batch_size: int) -> ByteCorpusDataModule:
    return ByteCorpusDataModule(seq_len=16, batch_size=batch_size, bytes_per_domain=3000)


class SaveOutcome(pl.Callback):
    """Each rank writes its per-step losses and final full state (``rank<r>.pt``) into ``out``."""

    def __init__(self, out) -> None:
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        # full_tensor(): under FSDP2 parameters are shards (DTensors); gather them (every rank must call it).
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in pl_module.state_dict().items()}
        sharded = any(hasattr(p, "full_tensor") for p in pl_module.parameters())
        # The last value each routing monitor logged (lightning_moe.callbacks' monitors keep them in ``logged``).
        monitors = {k: v for cb in trainer.callbacks for k, v in getattr(cb, "logged", {}).items()}
        outcome = {"losses": torch.stack(self.losses), "state": state, "sharded": sharded, "monitors": monitors}
        torch.save(outcome, self.out / f"rank{trainer.global_rank}.pt")


def train(router: str, out, devices: int = 1, strategy="auto", batch_size: int = 4, callbacks=(), ckpt_path=None,
          steps: int = STEPS, gradient_clip_val: float | None = None, **model_kwargs) -> pl.Trainer:
    """Train ``steps`` steps (in all, counting a resumed checkpoint's); every rank saves its outcome into ``out``
    (see :func:`outcomes`)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[SaveOutcome(out), *callbacks], default_root_dir=out,
                         gradient_clip_val=gradient_clip_val)
    trainer.fit(tiny_lm(router, **model_kwargs), datamodule=tiny_data(batch_size), ckpt_path=ckpt_path)
    return trainer


def outcomes(out, devices: int = 1) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


def assert_ranks_identical(ranks: list[dict]) -> None:
    for key, value in ranks[0]["state"].items():
        for other in ranks[1:]:
            assert torch.equal(value, other["state"][key]), f"{key} differs between the ranks"


def assert_matches_single_process(ranks: list[dict], single: dict) -> None:
    """Per-step loss (mean over ranks) and the final state against one process with the whole global batch.

    Measured over the three routers after 4 steps: losses within 4.8e-7 (one fp32 ulp at ~6), parameters within
    5.3e-7, centroids within 3e-8, precision variances within 1.2e-7; the sign-rule bias, a function of integer
    counts only, is bit-identical. The tolerance allows a few ulps more.
    """
    torch.testing.assert_close(torch.stack([r["losses"] for r in ranks]).mean(0), single["losses"], rtol=1e-5,
                               atol=1e-6)
    for key, value in single["state"].items():
        if key.endswith("expert_bias"):
            assert torch.equal(ranks[0]["state"][key], value), f"{key} differs from the single process's"
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_two_ranks_match_each_other_and_one_process(router, tmp_path):
    # fork: the ranks inherit this process's imports instead of paying for them again.
    train(router, tmp_path / "ddp", devices=2, strategy="ddp_fork", batch_size=2)
    train(router, tmp_path / "single", batch_size=4)
    ranks, (single,) = outcomes(tmp_path / "ddp", 2), outcomes(tmp_path / "single")
    assert any(k.endswith(("expert_bias", "centroids_ED", "precision_var_E")) for k in single["state"])
    assert_ranks_identical(ranks)
    assert_matches_single_process(ranks, single)
