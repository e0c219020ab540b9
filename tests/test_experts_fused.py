"""The fused CPU experts path against the sorted (grouped GEMM) path it replaced on CPU, and a dense FFN."""

import pytest
import torch

from lightning_moe.experts import Experts
from lightning_moe.layers import DenseFFN
from tests.helpers import assert_close_to_scale, fixed_routing

# fp32: both paths do the same GEMMs on the same rows; only the order of the K-slot sum (expert order here, slot
# order there) and of the weight-gradient dot product differ, so they agree to a few ulps of the values' scale.
# bf16: both round every GEMM output to 8 mantissa bits (eps 2^-8 = 3.9e-3) but at different points (the fused
# path takes the slot weight's gradient from dL/da . a, the sorted path from dL/dy . y), so a few bf16 ulps.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
T, D, F_FF = 12, 8, 16


def _setup(E, K, activation, dtype, allowed=None):
    torch.manual_seed(0)
    experts = Experts(D, F_FF, E, activation).to(dtype)
    routing = fixed_routing(T, E, K, allowed)
    routing.weights_TK = routing.weights_TK.detach().to(dtype).requires_grad_()
    x_TD = torch.randn(T, D, dtype=dtype, requires_grad=True)
    g_TD = torch.randn(T, D, dtype=dtype)
    return experts, routing, x_TD, g_TD


def _outputs_and_grads(path, experts, routing, x_TD, g_TD):
    y_TD = path(x_TD, routing)
    inputs = [x_TD, routing.weights_TK, *experts.parameters()]
    return y_TD, torch.autograd.grad(y_TD, inputs, g_TD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_matches_sorted_path_output_and_every_gradient(activation, dtype):
    experts, routing, x_TD, g_TD = _setup(8, 2, activation, dtype)
    y, grads = _outputs_and_grads(experts._fused_forward, experts, routing, x_TD, g_TD)
    y_ref, grads_ref = _outputs_and_grads(experts._sorted_forward, experts, routing, x_TD, g_TD)
    assert_close_to_scale(y, y_ref, TOL[dtype])
    assert len(grads) == (5 if activation == "swiglu" else 4)  # x, weights, w1, w2 (, v1)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close_to_scale(got, want, TOL[dtype])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_expert_without_tokens_gets_zero_weight_gradient(activation):
    experts, routing, x_TD, g_TD = _setup(4, 1, activation, torch.float32, allowed=[0, 2])
    y, grads = _outputs_and_grads(experts._fused_forward, experts, routing, x_TD, g_TD)
    y_ref, grads_ref = _outputs_and_grads(experts._sorted_forward, experts, routing, x_TD, g_TD)
    assert_close_to_scale(y, y_ref, TOL[torch.float32])
    for got, want in zip(grads, grads_ref):
        assert_close_to_scale(got, want, TOL[torch.float32])
    F = F_FF
    for g in grads[2:]:  # weight grads: experts 1 and 3 saw no token, so exactly zero
        assert torch.count_nonzero(g[F : 2 * F]) == 0 and torch.count_nonzero(g[3 * F :]) == 0


def test_cpu_forward_takes_the_fused_path():
    experts, routing, x_TD, _ = _setup(4, 2, "gelu", torch.float32)
    y = experts(x_TD, routing)
    assert type(y.grad_fn).__name__ == "_FusedExpertsBackward"


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_one_expert_equals_dense_ffn_with_gradients(activation):
    experts = Experts(D, F_FF, 1, activation)
    dense = DenseFFN(D, F_FF, activation)
    with torch.no_grad():
        dense.w1.weight.copy_(experts.mlp.w1)
        dense.w2.weight.copy_(experts.mlp.w2.T)
        if activation == "swiglu":
            dense.v1.weight.copy_(experts.mlp.v1)
    routing = fixed_routing(T, 1, 1)
    with torch.no_grad():
        routing.weights_TK.fill_(1.0)  # one expert at weight 1 is the dense FFN
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    y = experts(x, routing)
    gx, gw1 = torch.autograd.grad(y, [x, experts.mlp.w1], g)
    y_dense = dense(x)
    gx_dense, gw1_dense = torch.autograd.grad(y_dense, [x, dense.w1.weight], g)
    for got, want in ((y, y_dense), (gx, gx_dense), (gw1, gw1_dense)):
        assert_close_to_scale(got, want, TOL[torch.float32])


def test_fused_bf16_under_autocast_runs_in_bf16():
    experts, routing, x_TD, _ = _setup(4, 2, "swiglu", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x_TD, routing)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x_TD.grad.dtype == torch.float32 and experts.mlp.w1.grad.dtype == torch.float32
