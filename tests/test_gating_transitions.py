"""TransitionRouter: beta memory, precision weighting, anticipation, and their eight compositions."""

import itertools
import math

import pytest
import torch

from lightning_moe import MoELayer
from lightning_moe.gating import Routing, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import feed_back_errors, update_router_states
from tests.test_gating_temporal import loop_reference

NO_LOSSES = dict(load_balancing_weight=0.0, z_loss_weight=0.0)


def bound(router, d=4, e=4, k=2):
    router.bind(d, e, k)
    return router


# ---- beta -------------------------------------------------------------------------------------------------------


def test_beta_starts_at_init_beta_and_routes_on_the_memory():
    router = bound(TransitionRouter(beta=True, precision=False, anticipation=False, **NO_LOSSES))
    torch.testing.assert_close(router.beta_D, torch.full((4,), 0.9))
    x = torch.randn(2, 6, 4)
    h = loop_reference(x, router.logit_beta.detach())
    torch.testing.assert_close(router(x).logits_TE, router.layer(h.reshape(-1, 4)), rtol=1e-5, atol=1e-5)


def test_ema_memory_scales_the_input_by_one_minus_beta():
    router = bound(TransitionRouter(beta=True, anticipation=False, memory_form="ema", init_beta=0.8, **NO_LOSSES))
    x = torch.randn(1, 5, 4)
    h = loop_reference(0.2 * x, router.logit_beta.detach())
    torch.testing.assert_close(router(x).logits_TE, router.layer(h.reshape(-1, 4)), rtol=1e-5, atol=1e-5)


def test_beta_is_learned_through_the_sequence():
    router = bound(TransitionRouter(beta=True, anticipation=False))
    router(torch.randn(2, 6, 4)).weights_TK.sum().backward()
    assert router.logit_beta.grad.abs().sum() > 0


def carrying_router():
    return bound(TransitionRouter(beta=True, anticipation=False, carry_state=True, chunk_size=4, **NO_LOSSES)).train()


def test_carried_windows_equal_one_long_sequence():
    router = carrying_router()
    x = torch.randn(2, 12, 4)
    whole = router(x).logits_TE.view(2, 12, 4)
    first = router(x[:, :5])
    router.observe(x[:, :5].reshape(-1, 4), first)
    second = router(x[:, 5:])
    got = torch.cat([first.logits_TE.view(2, 5, 4), second.logits_TE.view(2, 7, 4)], dim=1)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def test_carried_memory_is_detached_between_windows():
    router = carrying_router()
    x1 = torch.randn(2, 5, 4, requires_grad=True)
    router.observe(x1.detach().reshape(-1, 4), router(x1))
    assert not router.memory_BD.requires_grad
    router(torch.randn(2, 5, 4)).logits_TE.sum().backward()
    assert x1.grad is None


def test_evaluation_and_reset_start_from_zero_memory():
    router = carrying_router()
    x1, x2 = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    fresh = router(x2).logits_TE
    router.observe(x1.reshape(-1, 4), router(x1))
    assert not torch.allclose(router(x2).logits_TE, fresh)
    torch.testing.assert_close(router.eval()(x2).logits_TE, fresh)
    router.train().reset_memory()
    torch.testing.assert_close(router(x2).logits_TE, fresh)


def test_carried_memory_survives_a_state_dict_round_trip():
    router = carrying_router()
    x = torch.randn(3, 5, 4)
    router.observe(x.reshape(-1, 4), router(x))
    other = carrying_router()
    other.load_state_dict(router.state_dict())
    torch.testing.assert_close(other.memory_BD, router.memory_BD)


def test_carrying_into_a_different_batch_size_is_refused():
    router = carrying_router()
    x = torch.randn(2, 5, 4)
    router.observe(x.reshape(-1, 4), router(x))
    with pytest.raises(ValueError, match="had 2 rows, this one has 3; keep the batch size fixed"):
        router(torch.randn(3, 5, 4))


# ---- precision ----------------------------------------------------------------------------------------------


def precision_only(**kwargs):
    return TransitionRouter(beta=False, precision=True, anticipation=False, **NO_LOSSES, **kwargs)


def precision_router(**kwargs):
    return bound(precision_only(**kwargs))


def test_precision_scales_the_logits():
    router = precision_router()
    router.precision_var_E.copy_(torch.tensor([0.5, 1.0, 2.0, 0.0]))
    x = torch.randn(1, 3, 4)
    pi = 1 / (torch.tensor([0.5, 1.0, 2.0, 0.0]) + 1e-4)
    torch.testing.assert_close(router(x).logits_TE, router.layer(x.reshape(-1, 4)) * pi)


def test_log_shift_adds_centred_log_precision():
    router = precision_router(precision_form="log_shift")
    router.precision_var_E.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    x = torch.randn(1, 3, 4)
    log_pi = -torch.log(torch.tensor([0.5, 1.0, 2.0, 4.0]) + 1e-4)
    torch.testing.assert_close(router(x).logits_TE, router.layer(x.reshape(-1, 4)) + log_pi - log_pi.mean())


def test_precision_estimate_update_equals_the_formula():
    router = precision_router(precision_decay=0.9, precision_init_var=0.5)
    routing = Routing(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.zeros(2, 4))
    router.observe(torch.zeros(2, 4), routing)
    router.observe_errors(torch.tensor([2.0, 4.0]), routing)
    router.update_state()
    # err_0 = (0.75*2 + 0.5*4) / 1.25 = 2.8, err_1 = 2, err_2 = 4; expert 3 routed nothing and keeps 0.5.
    want = torch.tensor([0.9 * 0.5 + 0.1 * 2.8, 0.9 * 0.5 + 0.1 * 2.0, 0.9 * 0.5 + 0.1 * 4.0, 0.5])
    torch.testing.assert_close(router.precision_var_E, want)
    router.update_state()  # nothing new observed: one update only
    torch.testing.assert_close(router.precision_var_E, want)


def test_feed_back_errors_reaches_precision_routers_in_a_layer():
    layer = MoELayer(4, 8, num_experts=4, top_k=2, router=precision_only(precision_decay=0.5)).train()
    layer(torch.randn(2, 3, 4))
    error_BS = torch.rand(2, 3)
    feed_back_errors(layer, error_BS)
    w_TE = torch.zeros(6, 4).scatter_add_(1, layer.routing.experts_TK, layer.routing.weights_TK.detach())
    torch.testing.assert_close(layer.router.pending_error_E, w_TE.T @ error_BS.flatten())
    update_router_states(layer)
    assert not torch.allclose(layer.router.precision_var_E, torch.ones(4))


def test_feed_back_errors_rejects_a_reduced_loss():
    layer = MoELayer(4, 8, num_experts=4, top_k=2, router=precision_only())
    layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="got 1 per-token errors for 6 routed tokens"):
        feed_back_errors(layer, torch.tensor(1.0))


def test_missing_error_feedback_is_warned_about():
    layer = MoELayer(4, 8, num_experts=4, top_k=2, router=precision_only()).train()
    layer(torch.randn(1, 3, 4))
    with pytest.warns(UserWarning, match="feed_back_errors"):
        update_router_states(layer)


# ---- anticipation -------------------------------------------------------------------------------------------


def test_anticipation_aux_loss_is_half_the_next_input_mse():
    router = bound(TransitionRouter(beta=True, anticipation=True, **NO_LOSSES))
    x = torch.randn(2, 6, 4)
    r = router(x)
    h = loop_reference(x, router.logit_beta.detach())
    xhat = router.predictor(torch.cat([x, h], dim=-1))
    want = 0.5 * ((xhat[:, :-1] - x[:, 1:]) ** 2).mean()
    torch.testing.assert_close(r.aux_losses["anticipation"], want, rtol=1e-5, atol=1e-6)


def test_additive_and_direct_anticipation_logits():
    x = torch.randn(1, 5, 4)
    add = bound(TransitionRouter(beta=False, anticipation=True, **NO_LOSSES))
    xhat = add.predictor(x).reshape(-1, 4)
    torch.testing.assert_close(add(x).logits_TE, add.layer(x.reshape(-1, 4)) + add.anticipation_layer(xhat))
    direct = bound(TransitionRouter(beta=False, anticipation=True, anticipation_form="direct", **NO_LOSSES))
    torch.testing.assert_close(direct(x).logits_TE, direct.layer(direct.predictor(x).reshape(-1, 4)))
    assert not hasattr(direct, "anticipation_layer")


def test_anticipation_target_is_detached():
    router = bound(TransitionRouter(beta=False, anticipation=True, **NO_LOSSES))
    for p in router.predictor.parameters():
        torch.nn.init.zeros_(p)  # xhat = 0 whatever x is: only the target could carry a gradient to x
    x = torch.randn(1, 5, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(router(x).aux_losses["anticipation"], x, materialize_grads=True)
    assert (grad == 0).all()


def test_single_position_has_no_anticipation_target():
    router = bound(TransitionRouter(beta=True, anticipation=True))
    assert router(torch.randn(2, 1, 4)).aux_losses["anticipation"].item() == 0.0


# ---- composition --------------------------------------------------------------------------------------------

SUBSETS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("beta,precision,anticipation", SUBSETS, ids=lambda v: "on" if v else "off")
def test_every_subset_trains_through_a_moe_layer(beta, precision, anticipation):
    router = TransitionRouter(beta=beta, precision=precision, anticipation=anticipation)
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=router).train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    assert x.grad.abs().sum() > 0 and router.layer.weight.grad.abs().sum() > 0
    assert ("anticipation" in layer.aux_losses) == anticipation
    assert hasattr(router, "logit_beta") == beta and hasattr(router, "precision_var_E") == precision
    assert hasattr(router, "predictor") == anticipation
    feed_back_errors(layer, torch.rand(2, 6))
    update_router_states(layer)


def test_all_mechanisms_off_is_the_softmax_router():
    plain = bound(SoftmaxTopK())
    composed = bound(TransitionRouter(beta=False, precision=False, anticipation=False))
    composed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 4)
    a, b = plain(x), composed(x)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)
    assert a.experts_TK.equal(b.experts_TK) and a.aux_losses.keys() == b.aux_losses.keys()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=False, carry_state=True), "carry_state=True needs beta=True"),
        (dict(init_beta=1.0), r"init_beta must lie in \(0, 1\), got 1.0"),
        (dict(precision_decay=0.0), r"precision_decay must lie in \(0, 1\)"),
        (dict(precision_form="multiply"), "Unknown precision_form 'multiply'; choose one of 'scale', 'log_shift'"),
        (dict(anticipation_form="replace"), "Unknown anticipation_form 'replace'"),
        (dict(memory_form="lif"), "Unknown memory_form 'lif'"),
        (dict(precision_eps=0.0), "precision_eps must be > 0"),
        (dict(anticipation_weight=-0.5), "anticipation_weight must be >= 0"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransitionRouter(**kwargs)


def test_chunk_size_must_be_a_positive_integer():
    with pytest.raises(TypeError, match="chunk_size must be an integer, got float 8.5"):
        TransitionRouter(chunk_size=8.5)


def test_init_beta_is_logit_of_point_nine():
    router = bound(TransitionRouter())
    torch.testing.assert_close(router.logit_beta, torch.full((4,), math.log(9.0)))


@pytest.mark.parametrize("flags", [dict(beta=False), dict(beta=True), dict(beta=True, carry_state=True),
                                   dict(beta=True, memory_form="capped_logit", anticipation=False)])
def test_every_configuration_returns_one_routing_type(flags):
    from lightning_moe.gating import MemoryRouting

    router = bound(TransitionRouter(**flags, **NO_LOSSES))
    routing = router(torch.randn(2, 5, 4))
    assert type(routing) is MemoryRouting
    assert (routing.memory_BD is not None) == flags.get("carry_state", False)


def test_queued_expert_errors_average_over_ranks_step_by_step():
    # Two ranks queue three steps each; summing their pending buffers (what update_state's all-reduce does) and
    # applying gives three sequential EMA steps on the per-step mean error of the two ranks.
    routers = []
    errors = torch.rand(2, 3, 4)
    for rank in range(2):
        router = TransitionRouter(precision=True, precision_init_var=0.5)
        router.bind(16, 4, 4)
        for t in range(3):
            router.observe_expert_errors(errors[rank, t])
        routers.append(router)
    merged = routers[0]
    for name in ("pending_ema_E", "pending_steps", "pending_sources"):
        getattr(merged, name).add_(getattr(routers[1], name))
    merged.apply_pending()
    var = torch.full((4,), 0.5)
    for t in range(3):
        var = 0.95 * var + 0.05 * errors[:, t].mean(0)
    torch.testing.assert_close(merged.precision_var_E, var)
