"""Balancing losses (formulas and normalisations in the baselines spec, §4.3–4.4).

Legend: T tokens, E experts, K selected slots per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_load_balancing_loss(scores_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """Switch Transformer loss generalised to top-k: ``E * sum_i f_i * P_i``, ``f_i = count_i / (K*T)``.

    Dividing the counts by K (not only by T) keeps the value at exactly 1 under perfectly uniform routing for any
    K, so the loss weight is the loss value at balance (HF's Mixtral port omits it and sits at K instead).
    Gradients flow only through ``P_i``; the counts are not differentiable.
    """
    T, K = experts_TK.shape
    E = scores_TE.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E).to(torch.float32)
    f_E = counts_E / (K * T)
    P_E = scores_TE.float().mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: the mean over tokens of ``logsumexp(z_t)**2``, in fp32 (exp overflows bf16 early)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
