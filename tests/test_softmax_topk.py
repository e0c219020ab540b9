"""SoftmaxTopK routing and the Switch / z-loss formulas on tiny inputs."""

import math

import pytest
import torch

from lightning_moe import MoELayer, SoftmaxTopK
from lightning_moe.gating import router_z_loss, switch_load_balancing_loss


def bound(router, d=4, e=4, k=2):
    router.bind(d, e, k)
    return router


def test_load_balancing_loss_is_one_under_uniform_routing():
    T, E, _K = 8, 4, 2
    scores_TE = torch.full((T, E), 1.0 / E)
    experts_TK = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert chosen 4 times
    assert switch_load_balancing_loss(scores_TE, experts_TK).item() == pytest.approx(1.0)


def test_weighted_load_balancing_loss_equals_its_weight_at_balance():
    router = bound(SoftmaxTopK(load_balancing_weight=0.01, z_loss_weight=0.0), d=4, e=4, k=2)
    # Uniform probabilities and equal counts per expert: perfectly balanced routing.
    scores = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert router.aux_losses(scores, experts, torch.zeros(4, 4))["load_balancing"].item() == pytest.approx(0.01)


def test_load_balancing_loss_closed_form_on_fixed_routing():
    # T=2, E=2, K=1: both tokens to expert 0 -> f = (1, 0); P = mean probs = (0.7, 0.3) -> 2 * 0.7 = 1.4
    scores_TE = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    experts_TK = torch.tensor([[0], [0]])
    assert switch_load_balancing_loss(scores_TE, experts_TK).item() == pytest.approx(1.4)


def test_z_loss_equals_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_topk_selects_highest_probabilities_and_renormalises():
    router = bound(SoftmaxTopK(z_loss_weight=0, load_balancing_weight=0), d=2, e=3, k=2)
    with torch.no_grad():
        router.layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    r = router(torch.tensor([[[2.0, 1.0]]]))
    assert r.experts_TK.tolist() == [[0, 1]]
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(r.weights_TK, (p[:2] / p[:2].sum()).unsqueeze(0))
    assert r.aux_losses == {}


def test_without_renormalisation_weights_are_probabilities():
    router = bound(SoftmaxTopK(normalize_weights=False), d=4, e=4, k=2)
    r = router(torch.randn(1, 3, 4))
    torch.testing.assert_close(r.weights_TK, r.scores_TE.gather(1, r.experts_TK))


def test_softmax_runs_in_fp32_for_bf16_inputs():
    router = bound(SoftmaxTopK(), d=8, e=4, k=2).to(torch.bfloat16)
    r = router(torch.randn(1, 5, 8, dtype=torch.bfloat16))
    assert r.scores_TE.dtype == torch.float32 and r.aux_losses["z_loss"].dtype == torch.float32


def test_jitter_only_in_training():
    router = bound(SoftmaxTopK(jitter=0.5), d=4, e=4, k=1)
    x = torch.randn(1, 6, 4)
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, router(x).logits_TE)
    router.train()
    assert not torch.equal(router(x).logits_TE, router(x).logits_TE)


def test_layer_exposes_weighted_aux_losses_for_user_training_step():
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=SoftmaxTopK(load_balancing_weight=0.1, z_loss_weight=0.01))
    layer(torch.randn(2, 3, 8))
    lb, z = layer.aux_losses["load_balancing"], layer.aux_losses["z_loss"]
    r = layer.routing
    torch.testing.assert_close(lb, 0.1 * switch_load_balancing_loss(r.scores_TE, r.experts_TK))
    torch.testing.assert_close(z, 0.01 * router_z_loss(r.logits_TE))
    torch.testing.assert_close(layer.aux_loss, lb + z)
    layer.aux_loss.backward()
    assert layer.router.layer.weight.grad.abs().sum() > 0


def test_router_cannot_be_shared_between_layers():
    router = SoftmaxTopK()
    MoELayer(8, 16, 4, 2, router=router)
    with pytest.raises(ValueError, match="already bound"):
        MoELayer(8, 16, 4, 2, router=router)


@pytest.mark.parametrize("field", ["jitter", "load_balancing_weight", "z_loss_weight"])
def test_negative_weights_are_rejected_with_the_field_name(field):
    with pytest.raises(ValueError, match=field):
        SoftmaxTopK(**{field: -1.0})


def test_a_frozen_gate_keeps_its_random_weights_while_the_experts_learn():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=SoftmaxTopK(frozen=True))
    gate = layer.router.layer.weight.detach().clone()
    experts = [p.detach().clone() for p in layer.experts.parameters()]
    trainable = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    out = layer(torch.randn(2, 5, 8))
    (out.square().mean() + sum(layer.routing.aux_losses.values())).backward()
    optimizer.step()
    assert not layer.router.layer.weight.requires_grad and layer.router.layer.weight.grad is None
    assert torch.equal(layer.router.layer.weight, gate)
    assert all(not torch.equal(p, q) for p, q in zip(layer.experts.parameters(), experts))
