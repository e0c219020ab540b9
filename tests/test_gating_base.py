"""The shared router contract: masked counts, per-step accumulators, DDP reduction, the state-update callback."""

import lightning.pytorch as pl
import pytest
import torch

import lightning_moe.gating.base as base
from lightning_moe import MoELayer
from lightning_moe.callbacks import router_state
from lightning_moe.callbacks.router_state import RouterStateUpdate
from lightning_moe.gating import (
    KMeansRouter,
    Routing,
    SigmoidTopK,
    TransitionRouter,
    sequence_balance_loss,
    sign_rule_update_,
    switch_load_balancing_loss,
)
from lightning_moe.layers import update_router_states
from lightning_moe.models import MoETransformer
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TinyLMData

STATEFUL = {
    "sigmoid": lambda: SigmoidTopK(),
    "kmeans": lambda: KMeansRouter(),
    "precision": lambda: TransitionRouter(beta=False, precision=True, anticipation=False),
}


def test_expert_counts_skip_masked_slots():
    r = Routing(torch.tensor([[0, 1], [0, 1]]), torch.ones(2, 2), torch.zeros(2, 2),
                mask_TK=torch.tensor([[True, False], [True, True]]))
    assert r.expert_counts(3).tolist() == [2, 1, 0]


def test_sign_rule_leaves_the_bias_alone_without_counts():
    bias = torch.tensor([0.1, -0.2])
    sign_rule_update_(bias, torch.zeros(2), 1e-3)
    torch.testing.assert_close(bias, torch.tensor([0.1, -0.2]))


def observed_layer(name):
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=STATEFUL[name]()).train()
    layer(torch.randn(2, 6, 8))
    layer.aux_losses.clear()
    return layer


@pytest.mark.parametrize("name", STATEFUL)
def test_update_state_sums_every_accumulator_over_ranks(name, monkeypatch):
    layer = observed_layer(name)
    router = layer.router
    if router.wants_token_errors:
        router.observe_errors(torch.rand(12), layer.routing)
    reduced = []
    monkeypatch.setattr(base, "all_reduce_sum_", lambda *ts: reduced.extend(ts))
    pending = [getattr(router, n) for n in router._pending]
    router.update_state()
    assert pending and [id(t) for t in reduced] == [id(t) for t in pending]


@pytest.mark.parametrize("name", STATEFUL)
def test_update_twice_after_one_observe_applies_one_update(name):
    layer = observed_layer(name)
    if layer.router.wants_token_errors:
        layer.router.observe_errors(torch.rand(12), layer.routing)
    update_router_states(layer)
    once = {k: v.clone() for k, v in layer.router.state_dict().items()}
    update_router_states(layer)
    for k, v in layer.router.state_dict().items():
        torch.testing.assert_close(v, once[k])


@pytest.mark.parametrize("name", STATEFUL)
def test_accumulators_stay_out_of_the_state_dict(name):
    router = observed_layer(name).router
    assert not [k for k in router.state_dict() if k.startswith("pending")]


def test_decoder_marks_its_routers_causal():
    model = MoETransformer(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4,
                           router=SigmoidTopK())
    assert model.blocks[0].ffn.router.causal and not SigmoidTopK().causal


class UserModule(pl.LightningModule):
    """A user's own module with one MoE layer and no router-state handling of its own."""

    def __init__(self):
        super().__init__()
        self.layer = MoELayer(8, 16, num_experts=4, top_k=2, router=SigmoidTopK(bias_update_rate=0.01))

    def training_step(self, batch, batch_idx):
        return self.layer(batch["tokens"].float().unsqueeze(-1).expand(-1, -1, 8)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, callbacks, tmp_path, steps=1):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=TinyLMData().train_dataloader())


def test_callback_updates_a_user_module_once_per_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(router_state, "update_router_states", lambda m: (calls.append(m), update_router_states(m)))
    module = UserModule()
    fit(module, [RouterStateUpdate()], tmp_path, steps=2)
    assert len(calls) == 2 and module.layer.router.expert_bias.abs().sum() > 0


def test_callback_leaves_modules_that_update_themselves(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(router_state, "update_router_states", lambda m: calls.append(m))
    module = MoELanguageModel(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4,
                              router=SigmoidTopK(bias_update_rate=0.01))
    fit(module, [RouterStateUpdate()], tmp_path)
    assert calls == [] and module.model.blocks[0].ffn.router.expert_bias.abs().sum() > 0


def test_switch_loss_is_the_sequence_loss_of_one_sequence_with_normalised_scores():
    scores_TE = torch.softmax(torch.randn(6, 4), dim=-1)
    experts_TK = torch.topk(scores_TE, 2).indices
    torch.testing.assert_close(switch_load_balancing_loss(scores_TE, experts_TK),
                               sequence_balance_loss(scores_TE.unsqueeze(0), experts_TK.unsqueeze(0)))
    assert switch_load_balancing_loss(torch.tensor([[0.8, 0.2], [0.6, 0.4]]), torch.tensor([[0], [0]])).item() == \
        pytest.approx(1.4)

