"""RoutingAlarms: each alarm fires on its constructed failure, stays quiet on a healthy run, survives resume."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_moe.callbacks import ALARMS, RoutingAlarms
from lightning_moe.gating import SigmoidTopK, SoftmaxTopK
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TINY, TinyLMData

LAYER = "model.blocks.0.ffn"


class DetachedRouter(SoftmaxTopK):
    """A bug: the gate's weight is detached, so the router never learns."""

    def logits(self, x_TD):
        return F.linear(x_TD, self.layer.weight.detach())


class AlwaysExpertZero(SoftmaxTopK):
    """A collapsed router: expert 0 wins every token by a wide margin."""

    def logits(self, x_TD):
        return super().logits(x_TD) + torch.tensor([30.0, 0.0, 0.0, 0.0])


class SoftmaxedLogits(SoftmaxTopK):
    """A bug: the router hands its probabilities on as logits (what the z-loss reads)."""

    def route(self, logits_TE, extra_losses=None):
        routing = super().route(logits_TE, extra_losses)
        routing.logits_TE = routing.scores_TE
        return routing


class NoStateUpdate(MoELanguageModel):
    """A module that forgets to apply stateful routers' statistics (no RouterStateUpdate either)."""

    def on_before_optimizer_step(self, optimizer):
        pass


def fit(router=None, steps=12, module=MoELanguageModel, alarms=None, ckpt_path=None, root=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    alarms = alarms if alarms is not None else RoutingAlarms(every_n_steps=2)
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, log_every_n_steps=2, callbacks=[alarms], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=root, accelerator="cpu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = module(**TINY, router=router, warmup_steps=1)
        trainer.fit(model, datamodule=TinyLMData(batches=12), ckpt_path=ckpt_path)
    messages = [str(w.message) for w in record if "RoutingAlarms" in str(w.message)]
    return alarms, messages, trainer


def fired(alarms):
    return {kind: where for kind, where in alarms.fired.items() if where}


def test_healthy_run_raises_no_alarm():
    alarms, messages, _ = fit()
    assert fired(alarms) == {} and messages == []
    assert alarms.logged == {f"train/alarm/{kind}": 0.0 for kind in ALARMS}


def test_detached_router_gets_no_gradient():
    alarms, messages, _ = fit(DetachedRouter())
    assert fired(alarms) == {"no_router_grad": [LAYER]}
    assert alarms.logged["train/alarm/no_router_grad"] == 1.0
    assert len([m for m in messages if "[no_router_grad]" in m]) == 1


def test_router_without_balance_loss():
    alarms, messages, _ = fit(SoftmaxTopK(load_balancing_weight=0.0), steps=2)
    assert fired(alarms) == {"no_balance_loss": [LAYER]}
    assert alarms.logged["train/alarm/no_balance_loss"] == 1.0


def test_bias_balanced_router_needs_no_balance_loss():
    alarms, _, _ = fit(SigmoidTopK(), steps=2)
    assert fired(alarms) == {}


def test_frozen_stateful_router():
    alarms, messages, _ = fit(SigmoidTopK(), module=NoStateUpdate)
    assert fired(alarms) == {"stale_router_state": [LAYER + ".router"]}
    assert any("RouterStateUpdate" in m for m in messages)


def test_router_that_always_picks_expert_zero_collapses():
    alarms, messages, _ = fit(AlwaysExpertZero(), steps=6)
    assert fired(alarms)["collapse"] == [LAYER]
    assert any("top expert serves 100% of tokens (threshold 75%)" in m for m in messages)


def test_softmaxed_logits():
    alarms, _, _ = fit(SoftmaxedLogits(), steps=2)
    assert fired(alarms) == {"softmaxed_logits": [LAYER]}


def test_alarm_state_survives_resume(tmp_path):
    # Windows at steps 2 and 4 build a collapse streak of 2 (patience 3); the window at step 6 after resuming
    # completes it. A fresh callback over steps 5-6 alone would have a streak of 1.
    alarms, _, trainer = fit(AlwaysExpertZero(), steps=4, root=tmp_path)
    assert "collapse" not in fired(alarms)
    assert alarms.streaks[f"collapse:{LAYER}"] == 2
    trainer.save_checkpoint(tmp_path / "4.ckpt")
    resumed, _, _ = fit(AlwaysExpertZero(), steps=6, ckpt_path=tmp_path / "4.ckpt", root=tmp_path)
    assert resumed.fired["collapse"] == [LAYER]
    assert resumed.streaks[f"collapse:{LAYER}"] == 3


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="collapse_share must be a number in \\(0, 1\\), got 1.5"):
        RoutingAlarms(collapse_share=1.5)
    with pytest.raises(ValueError, match="patience must be > 0, got 0"):
        RoutingAlarms(patience=0)


class KillsExpertSeven(SoftmaxTopK):
    """Routes to all 8 experts for its first 4 forwards, then never again to expert 7 (a dying expert)."""

    calls = 0

    def logits(self, x_TD):
        KillsExpertSeven.calls += 1
        logits_TE = super().logits(x_TD)
        return logits_TE - 1e4 * (KillsExpertSeven.calls > 4) * F.one_hot(torch.tensor(7), 8)


def test_an_expert_dying_during_training_is_a_collapse():
    KillsExpertSeven.calls = 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    alarms = RoutingAlarms(every_n_steps=2, sample_every=1)  # every batch: the windows below count on it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pl.Trainer(max_steps=10, limit_val_batches=0, callbacks=[alarms], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(
            MoELanguageModel(**{**TINY, "num_experts": 8}, router=KillsExpertSeven(), warmup_steps=1),
            datamodule=TinyLMData(batches=12))
    # Windows at steps 2 and 4 saw expert 7; those at 6, 8 and 10 did not: 3 windows with more dead experts.
    assert alarms.first_dead == {LAYER: 0.0} and alarms.fired["collapse"] == [LAYER]
    assert any("1 dead experts (first window: 0)" in str(w.message) for w in record)


def test_alarms_never_change_what_the_model_learns():
    def trained(callbacks):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = MoELanguageModel(**TINY, warmup_steps=1)
        pl.Trainer(max_steps=4, limit_val_batches=0, callbacks=callbacks, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(
            model, datamodule=TinyLMData())
        return model.state_dict()

    plain, watched = trained([]), trained([RoutingAlarms(every_n_steps=1)])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
