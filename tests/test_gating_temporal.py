"""The beta memory's scan kernels and hand-written gradient against the step-by-step recurrence."""

import pytest
import torch

from lightning_moe.gating import leaky_integrate
from lightning_moe.gating import temporal
from lightning_moe.gating.temporal import chunked_scan, sequential_scan


def loop_reference(x_BSD, logit_beta_D, h0_BD=None):
    beta_D = torch.sigmoid(logit_beta_D)
    h = h0_BD if h0_BD is not None else torch.zeros_like(x_BSD[:, 0])
    out = []
    for t in range(x_BSD.shape[1]):
        h = beta_D * h + x_BSD[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


KERNELS = {"sequential": lambda x, logit_beta, h0, c: sequential_scan(x, logit_beta, h0), "chunked": chunked_scan}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("S,chunk", [(1, 8), (7, 8), (8, 8), (37, 8), (64, 64), (300, 64)])
def test_kernel_equals_the_recurrence(kernel, S, chunk):
    x, logit_beta, h0 = torch.randn(2, S, 5), torch.randn(5) * 2, torch.randn(2, 5)
    got = KERNELS[kernel](x, logit_beta, h0, chunk)
    torch.testing.assert_close(got, loop_reference(x, logit_beta, h0), rtol=1e-5, atol=1e-5)


def test_reverse_sequential_scan_runs_the_recurrence_backwards_in_time():
    x, logit_beta = torch.randn(2, 9, 4), torch.randn(4)
    got = sequential_scan(x, logit_beta, reverse=True)
    torch.testing.assert_close(got, loop_reference(x.flip(1), logit_beta).flip(1))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_gradients_equal_autograd_through_the_recurrence(kernel, with_h0, monkeypatch):
    # The CPU runs the sequential kernel; the chunked one (accelerators) is swapped in to check its backward too.
    if kernel == "chunked":
        monkeypatch.setattr(temporal, "sequential_scan", lambda x, logit_beta, h0, reverse: temporal.chunked_scan(
            x.flip(1), logit_beta, h0, 8).flip(1) if reverse else temporal.chunked_scan(x, logit_beta, h0, 8))
    x, logit_beta, h0 = torch.randn(2, 37, 5), torch.randn(5) * 2, torch.randn(2, 5) if with_h0 else None
    upstream = torch.randn(2, 37, 5)
    grads = []
    for fn in (leaky_integrate, loop_reference):
        inputs = [t.clone().requires_grad_() for t in (x, logit_beta, h0) if t is not None]
        grads.append(torch.autograd.grad((fn(*inputs) * upstream).sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_long_sequences_with_extreme_betas_stay_finite_and_close_to_float64():
    x = torch.randn(1, 1000, 3)
    logit_beta = torch.tensor([-30.0, 0.0, 12.0])  # beta ~ 0, 0.5, ~1
    want = loop_reference(x.double(), logit_beta.double()).float()
    # fp32 sigmoid(12) is 1 - 6.1e-6 to ~1 %, so the recurrence's beta^1000 is off by ~1e-4 relative (the
    # reference's own loop shares this); the chunked form takes log beta = logsigmoid exactly (~1e-5).
    h = leaky_integrate(x, logit_beta)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, want, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(chunked_scan(x, logit_beta), want, rtol=1e-5, atol=1e-4)


def test_without_initial_state_the_scan_starts_from_zero():
    x, logit_beta = torch.randn(2, 9, 4), torch.randn(4)
    zeros = torch.zeros(2, 4)
    torch.testing.assert_close(leaky_integrate(x, logit_beta, None, 4), leaky_integrate(x, logit_beta, zeros, 4))


def test_scan_runs_in_fp32_under_bf16_autocast():
    x, logit_beta = torch.randn(1, 40, 4), torch.full((4,), 3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = leaky_integrate(x, logit_beta)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, loop_reference(x, logit_beta), rtol=1e-5, atol=1e-5)
