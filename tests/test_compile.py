"""``torch.compile(MoELayer)`` forward and backward on CPU agree with eager."""

import pytest
import torch

from lightning_moe import MoELayer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_layer_matches_eager_forward_and_backward(dtype):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=4, top_k=2, activation="swiglu").to(dtype)
    x = torch.randn(2, 6, 16, dtype=dtype, requires_grad=True)

    def step(fn):
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        y = fn(x)
        y.float().square().sum().backward()
        return [y, x.grad, *(p.grad for p in layer.parameters())]

    # aot_eager traces forward and backward through AOTAutograd like inductor does, without a C++ compile
    # (seconds per kernel on a small CPU).
    compiled = step(torch.compile(layer, backend="aot_eager"))
    eager = step(layer)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(compiled, eager):
        scale = max(1.0, want.float().abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
