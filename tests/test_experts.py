"""Native dropless experts against a per-token reference, and against a dense FFN at E=1."""

import pytest
import torch

from lightning_moe.experts import Experts, reference_experts
from lightning_moe.experts.native import _grouped_mm_ok
from lightning_moe.layers import DenseFFN, MoELayer
from tests.helpers import assert_close_to_scale, fixed_routing

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(out.dtype)
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("empty", [False, True], ids=["all-used", "empty-experts"])
@pytest.mark.parametrize("E,K", [(1, 1), (4, 1), (8, 2), (8, 8)])
def test_native_matches_per_token_reference(E, K, empty, activation, dtype):
    if empty and E == K:
        pytest.skip("every expert is selected when K == E, so none can be empty")
    T, D, F = 12, 8, 16
    experts = Experts(D, F, E, activation).to(dtype)
    allowed = list(range(0, E, 2)) if empty else None  # odd-numbered experts get no token
    routing = fixed_routing(T, E, K, allowed)
    routing.weights_TK = routing.weights_TK.detach().to(dtype).requires_grad_()
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    params = [p for p in experts.parameters()]
    out, ref = experts(x, routing), reference_experts(experts, x, routing)
    tol = TOL[dtype]
    assert_close_to_scale(out, ref, tol)
    inputs = [x, routing.weights_TK, *params]
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert_close_to_scale(got, want, tol)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="torch.nn.functional.grouped_mm needs torch >= 2.9; older torch always takes the loop")
def test_grouped_path_is_taken_for_aligned_sizes():
    assert _grouped_mm_ok(torch.zeros(4, 8), 16)
    assert _grouped_mm_ok(torch.zeros(4, 8, dtype=torch.bfloat16), 16)
    assert not _grouped_mm_ok(torch.zeros(4, 6), 16)  # 24-byte rows: not a multiple of 16 bytes
    assert not _grouped_mm_ok(torch.zeros(4, 4, dtype=torch.bfloat16), 16)


def test_loop_fallback_matches_reference_for_unaligned_width():
    experts = Experts(6, 10, 4, "swiglu")
    routing = fixed_routing(9, 4, 2)
    x = torch.randn(9, 6, requires_grad=True)
    out, ref = experts(x, routing), reference_experts(experts, x, routing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, [x, experts.mlp.w1]), _grads(ref, [x, experts.mlp.w1])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_equals_dense_ffn(activation):
    D, F = 8, 16
    layer = MoELayer(D, F, num_experts=1, top_k=1, activation=activation)
    dense = DenseFFN(D, F, activation)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.mlp.w1)
        dense.w2.weight.copy_(layer.experts.mlp.w2.T)
        if activation == "swiglu":
            dense.v1.weight.copy_(layer.experts.mlp.v1)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(10, 8), (2, 5, 8), (2, 3, 2, 8)])
def test_layer_keeps_input_shape_and_matches_reference(shape):
    layer = MoELayer(8, 16, num_experts=4, top_k=2)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == x.shape
    ref = reference_experts(layer.experts, x.reshape(-1, 8), layer.routing)
    torch.testing.assert_close(y.reshape(-1, 8), ref, atol=1e-5, rtol=1e-5)


def test_shared_expert_adds_dense_output():
    layer = MoELayer(8, 16, num_experts=4, top_k=2, shared_d_ff=12)
    x = torch.randn(6, 8)
    routed = reference_experts(layer.experts, x, layer.router(x.view(1, 6, 8)))
    torch.testing.assert_close(layer(x), routed + layer.shared_expert(x), atol=1e-5, rtol=1e-5)


def test_parameter_names_follow_megablocks_layout():
    layer = MoELayer(8, 16, num_experts=4, top_k=2)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "router.layer.weight": (4, 8),
        "experts.mlp.w1": (64, 8),
        "experts.mlp.w2": (64, 8),
        "experts.mlp.v1": (64, 8),
    }

