"""Per-dimension leaky integration along the sequence, all positions at once (transitions spec §1.1, §7.5).

Legend: B batch, S sequence, D model width, C chunk length.

``h_t = beta * h_{t-1} + x_t`` with ``h_{-1} = h0`` has the closed form
``h_t = sum_{k<=t} beta^(t-k) x_k + beta^(t+1) h0``. Inside a chunk of C steps that is one matrix product with
the decay matrix ``L_d[t, k] = beta_d^(t-k) [k <= t]``; the chunk's last state seeds the next chunk. So the cost is
``O(B * S * C * D)`` with a Python loop over ``S / C`` chunks, never over time steps. Powers are taken as
``exp((t-k) * log beta)`` and only for ``k <= t`` (exponent <= 0), so nothing overflows however long the
sequence; the alternative ``cumsum(x_k * beta^-k)`` blows up after a few hundred steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def leaky_integrate(
    x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None = None, chunk_size: int = 64
) -> Tensor:
    """``h_BSD`` with ``h_t = sigmoid(logit_beta) * h_{t-1} + x_t`` and ``h_{-1} = h0`` (zeros if None).

    Computed in at least fp32 and differentiable in ``x``, ``logit_beta`` and ``h0``; returns that dtype.
    """
    # Autocast would run the decay products in bf16 (8 mantissa bits: beta^t drifts within a few dozen steps).
    with torch.autocast(x_BSD.device.type, enabled=False):
        return _leaky_integrate(x_BSD, logit_beta_D, h0_BD, chunk_size)


def _leaky_integrate(x_BSD: Tensor, logit_beta_D: Tensor, h0_BD: Tensor | None, chunk_size: int) -> Tensor:
    B, S, D = x_BSD.shape
    dtype = torch.promote_types(x_BSD.dtype, torch.float32)
    x_BSD = x_BSD.to(dtype)
    log_beta_D = F.logsigmoid(logit_beta_D.to(dtype))  # log(sigmoid) without underflow for very negative logits
    C = max(1, min(chunk_size, S))
    steps_C = torch.arange(C, device=x_BSD.device)
    lag_CC = steps_C.unsqueeze(1) - steps_C.unsqueeze(0)  # t - k
    # Clamp before exp so the masked (k > t) entries are exp(0) = 1, not an overflow, then zero them.
    decay_DCC = torch.exp(lag_CC.clamp(min=0).to(dtype) * log_beta_D[:, None, None]).masked_fill(lag_CC < 0, 0.0)
    carry_CD = torch.exp((steps_C + 1).to(dtype).unsqueeze(1) * log_beta_D)  # beta^(i+1): weight of the seed state
    h_BD = h0_BD.to(dtype) if h0_BD is not None else None
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
