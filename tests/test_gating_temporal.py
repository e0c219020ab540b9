"""The chunked parallel scan of the beta memory against the step-by-step recurrence."""

import pytest
import torch

from lightning_moe.gating import leaky_integrate


def loop_reference(x_BSD, logit_beta_D, h0_BD=None):
    beta_D = torch.sigmoid(logit_beta_D)
    h = h0_BD if h0_BD is not None else torch.zeros_like(x_BSD[:, 0])
    out = []
    for t in range(x_BSD.shape[1]):
        h = beta_D * h + x_BSD[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("S,chunk", [(1, 8), (7, 8), (8, 8), (37, 8), (64, 64), (300, 64)])
def test_scan_equals_the_recurrence(S, chunk):
    x, logit_beta, h0 = torch.randn(2, S, 5), torch.randn(5) * 2, torch.randn(2, 5)
    torch.testing.assert_close(leaky_integrate(x, logit_beta, h0, chunk), loop_reference(x, logit_beta, h0),
                               rtol=1e-5, atol=1e-5)


def test_scan_gradients_equal_the_recurrence_gradients():
    x, logit_beta, h0 = torch.randn(2, 37, 5), torch.randn(5) * 2, torch.randn(2, 5)
    upstream = torch.randn(2, 37, 5)
    grads = []
    for fn in (lambda *a: leaky_integrate(*a, chunk_size=8), loop_reference):
        inputs = [t.clone().requires_grad_() for t in (x, logit_beta, h0)]
        grads.append(torch.autograd.grad((fn(*inputs) * upstream).sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_long_sequences_with_extreme_betas_stay_finite_and_exact():
    x = torch.randn(1, 1000, 3)
    logit_beta = torch.tensor([-30.0, 0.0, 12.0])  # beta ~ 0, 0.5, ~1
    h = leaky_integrate(x, logit_beta)
    assert torch.isfinite(h).all()
    # Against a float64 loop: over 1000 steps at beta ~ 1 the fp32 loop itself drifts by ~1e-3, the scan by ~1e-5.
    want = loop_reference(x.double(), logit_beta.double()).float()
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-4)


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
