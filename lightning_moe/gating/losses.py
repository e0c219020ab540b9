"""Balancing losses (formulas and normalisations in the baselines spec, §4.3–4.4 and §4.6).

Legend: T tokens, E experts, K selected slots per token, B batch (groups), S sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _balance_loss_per_group(scores_BSE: Tensor, experts_BSK: Tensor) -> Tensor:
    """``E * sum_i f_i * P_i`` for each of B groups of S tokens -> ``[B]``; ``f_i = count_i / (K*S)``."""
    B, S, K = experts_BSK.shape
    E = scores_BSE.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BSE.device)
    counts_BE.scatter_add_(1, experts_BSK.reshape(B, S * K), torch.ones(B, S * K, dtype=torch.float32, device=scores_BSE.device))
    f_BE = counts_BE / (K * S)
    P_BE = scores_BSE.float().mean(dim=1)
    return E * torch.sum(f_BE * P_BE, dim=-1)


def switch_load_balancing_loss(scores_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """Switch Transformer loss generalised to top-k: ``E * sum_i f_i * P_i``, ``f_i = count_i / (K*T)``.

    Dividing the counts by K (not only by T) keeps the value at exactly 1 under perfectly uniform routing for any
    K, so the loss weight is the loss value at balance (HF's Mixtral port omits it and sits at K instead).
    Gradients flow only through ``P_i``; the counts are not differentiable.
    """
    return _balance_loss_per_group(scores_TE.unsqueeze(0), experts_TK.unsqueeze(0))[0]


def sequence_balance_loss(scores_BSE: Tensor, experts_BSK: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (unweighted): per sequence ``sum_i f_i * P_i`` with
    ``f_i = E/(K*S) * count_i``, ``P_i = mean_t s'_{i,t}`` and ``s' = s / sum_j s_j``, averaged over the batch.

    ``experts_BSK`` is the routed selection (for a bias-balanced router: the bias-shifted top-k, as Megatron-Core
    and OLMo-core take it). Scores are renormalised per token first because sigmoid scores do not sum to 1; the
    value is then 1 under perfectly uniform routing, as for :func:`switch_load_balancing_loss`.
    """
    scores_BSE = scores_BSE.float()
    normalised_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)
    return _balance_loss_per_group(normalised_BSE, experts_BSK).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: the mean over tokens of ``logsumexp(z_t)**2``, in fp32 (exp overflows bf16 early)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
