"""Per-dimension leaky integration along the sequence (transitions spec §1.1, §7.5).

Legend: B batch, S sequence, D model width, C chunk length.

``h_t = beta * h_{t-1} + x_t`` with ``h_{-1} = h0`` is linear, so its gradient is the same recurrence run
backwards in time: with ``g_t = dL/dh_t + beta * g_{t+1}``, ``dL/dx_t = g_t``, ``dL/dh0 = beta * g_0`` and
``dL/dbeta = sum_t g_t * h_{t-1}``. :class:`_LeakyIntegrate` computes both passes with that recurrence and keeps
no autograd graph of the steps. Autograd through a per-step loop stores two nodes per step and each step's
slice backward writes a full-size zero tensor; autograd through the chunked closed form also differentiates
its ``[D, C, C]`` decay matrix, another ``O(B * S * C * D)`` product. On a 2-core CPU (B=256, S=63, D=64,
forward + backward) the hand-written adjoint takes ~3 ms against ~30 ms for either (``benchmarks/``).

Two kernels run the recurrence: a step-by-step loop (CPU, where it is the fastest of the two for every S we
measured up to 2048: no Python overhead worth the ``C``-times larger products of the chunked form) and the
chunked closed form ``h_t = sum_{k<=t} beta^(t-k) x_k + beta^(t+1) h0`` (accelerators, where S / C launches
beat 2S): inside a chunk of C steps it is one product with the decay matrix ``L_d[t, k] = beta_d^(t-k)
[k <= t]``, and the chunk's last state seeds the next. Powers are taken as ``exp((t-k) * log beta)`` and only
for ``k <= t`` (exponent <= 0), so nothing overflows however long the sequence; the alternative
``cumsum(x_k * beta^-k)`` blows up after a few hundred steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def leaky_integrate(
    x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None = None, chunk_size: int = 64
) -> Tensor:
    """``h_BSD`` with ``h_t = sigmoid(logit_beta) * h_{t-1} + x_t`` and ``h_{-1} = h0`` (zeros if None).

    Computed in at least fp32 and differentiable (once) in ``x``, ``logit_beta`` and ``h0``; returns that dtype.
    ``chunk_size`` is the chunk length C of the accelerator kernel (unused on CPU).
    """
    # Autocast would run the decay products in bf16 (8 mantissa bits: beta^t drifts within a few dozen steps).
    with torch.autocast(x_BSD.device.type, enabled=False):
        dtype = torch.promote_types(x_BSD.dtype, torch.float32)
        h0_BD = h0_BD.to(dtype) if h0_BD is not None else None
        return _LeakyIntegrate.apply(x_BSD.to(dtype), logit_beta_D.to(dtype), h0_BD, chunk_size)


class _LeakyIntegrate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None, chunk_size: int) -> Tensor:
        h_BSD = _scan(x_BSD, logit_beta_D, h0_BD, chunk_size)
        ctx.save_for_backward(h_BSD, logit_beta_D, h0_BD)
        ctx.chunk_size = chunk_size
        return h_BSD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h_BSD: Tensor):
        h_BSD, logit_beta_D, h0_BD = ctx.saved_tensors
        g_BSD = _scan(grad_h_BSD.contiguous(), logit_beta_D, None, ctx.chunk_size, reverse=True)
        beta_D = torch.sigmoid(logit_beta_D)
        grad_h0_BD = beta_D * g_BSD[:, 0] if h0_BD is not None else None
        # dL/dbeta = sum_t g_t h_{t-1}; h_{-1} = h0 (zero without one); d beta / d logit = beta (1 - beta).
        grad_beta_D = (g_BSD[:, 1:] * h_BSD[:, :-1]).sum(dim=(0, 1))
        if h0_BD is not None:
            grad_beta_D = grad_beta_D + (g_BSD[:, 0] * h0_BD).sum(0)
        return g_BSD, grad_beta_D * beta_D * (1 - beta_D), grad_h0_BD, None


def _scan(x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None, chunk_size: int, reverse: bool = False) -> Tensor:
    if x_BSD.device.type == "cpu":
        return sequential_scan(x_BSD, logit_beta_D, h0_BD, reverse)
    if reverse:
        return chunked_scan(x_BSD.flip(1), logit_beta_D, h0_BD, chunk_size).flip(1)
    return chunked_scan(x_BSD, logit_beta_D, h0_BD, chunk_size)


@torch.no_grad()
def sequential_scan(
    x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None = None, reverse: bool = False
) -> Tensor:
    """The recurrence step by step, in place into one output (from the last step back with ``reverse``)."""
    S, beta_D = x_BSD.shape[1], torch.sigmoid(logit_beta_D)
    h_BSD = torch.empty_like(x_BSD)
    steps = range(S - 1, -1, -1) if reverse else range(S)
    prev_BD = h0_BD
    for t in steps:
        if prev_BD is None:
            h_BSD[:, t] = x_BSD[:, t]
        else:
            torch.addcmul(x_BSD[:, t], beta_D, prev_BD, out=h_BSD[:, t])
        prev_BD = h_BSD[:, t]
    return h_BSD


def chunked_scan(
    x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None = None, chunk_size: int = 64
) -> Tensor:
    """The recurrence in closed form, one decay-matrix product per chunk of ``chunk_size`` steps. Plain tensor
    ops: :class:`_LeakyIntegrate` runs it without a graph; autograd through it is the slower baseline of
    ``benchmarks/bench_transitions.py``."""
    S = x_BSD.shape[1]
    log_beta_D = F.logsigmoid(logit_beta_D)  # log(sigmoid) without the rounding of sigmoid near 1
    C = max(1, min(chunk_size, S))
    steps_C = torch.arange(C, device=x_BSD.device)
    lag_CC = steps_C.unsqueeze(1) - steps_C.unsqueeze(0)  # t - k
    # Clamp before exp so the masked (k > t) entries are exp(0) = 1, not an overflow, then zero them.
    decay_DCC = torch.exp(lag_CC.clamp(min=0).to(x_BSD.dtype) * log_beta_D[:, None, None]).masked_fill(lag_CC < 0, 0.0)
    carry_CD = torch.exp((steps_C + 1).to(x_BSD.dtype).unsqueeze(1) * log_beta_D)  # beta^(i+1): weight of the seed
    h_BD = h0_BD
    chunks = []
    for start in range(0, S, C):
        x_BcD = x_BSD[:, start : start + C]
        c = x_BcD.shape[1]
        h_BcD = torch.einsum("dtk,bkd->btd", decay_DCC[:, :c, :c], x_BcD)
        if h_BD is not None:
            h_BcD = h_BcD + carry_CD[:c] * h_BD.unsqueeze(1)
        chunks.append(h_BcD)
        h_BD = h_BcD[:, -1]
    return torch.cat(chunks, dim=1)


def capped_integrate(current_BSE: Tensor, logit_beta_E: Tensor, cap: float) -> Tensor:
    """``U_BSE`` with ``U_t = min(sigmoid(logit_beta) * U_{t-1} + current_t, cap)`` and ``U_{-1} = 0``: the
    paper's early logit-space membrane (transitions spec §1.1 B; the reference writes the cap as
    ``U - relu(U - theta)``). The cap makes it nonlinear, so it runs step by step (S is short where it is used)."""
    beta_E = torch.sigmoid(logit_beta_E).to(current_BSE.dtype)
    u_BE = torch.zeros_like(current_BSE[:, 0])
    states = []
    for t in range(current_BSE.shape[1]):
        u_BE = torch.clamp(beta_E * u_BE + current_BSE[:, t], max=cap)
        states.append(u_BE)
    return torch.stack(states, dim=1)
