"""Routing consistency across training: how much of a fixed probe set's routing survives between two checks.

Legend: T tokens (the probe set, flattened), K selected slots per token, E experts.

* Router saturation (OLMoE, Muennighoff et al. 2024, arXiv 2409.02060 §5): the mean over tokens of
  ``|topk_t ∩ topk_ref| / K`` — 1 when every token keeps its K experts, 0 when none does.
* Routing fluctuation (StableMoE, Dai et al. 2022, arXiv 2204.08396 §2.2): the share of tokens whose top-1 expert
  changed between two checks.

Both compare two routings of the *same* tokens, given as ``experts_TK`` with the slots ordered by weight,
highest first (:func:`order_by_weight`), so column 0 is the top-1 expert. A token's K experts are distinct (top-k
selection), so the overlap count never counts one expert twice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def order_by_weight(experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """``experts_TK`` with each token's slots sorted by weight, highest first (column 0 = top-1 expert).

    Slot order is not trusted (not every router sorts its slots); the sort is stable so equal weights keep the
    router's slot order and the result is reproducible."""
    order_TK = weights_TK.detach().float().argsort(dim=1, descending=True, stable=True)
    return experts_TK.gather(1, order_TK)


def _check_pair(experts_TK: Tensor, ref_TK: Tensor) -> None:
    if experts_TK.shape != ref_TK.shape or experts_TK.dim() != 2:
        raise ValueError(
            f"experts_TK {tuple(experts_TK.shape)} and ref_TK {tuple(ref_TK.shape)} must be the same [tokens, K] "
            "shape: route the same probe tokens with the same top-k at both checks."
        )


def overlap_T(experts_TK: Tensor, ref_TK: Tensor) -> Tensor:
    """Per token, ``|experts ∩ ref| / K`` in float64 (exact: a count of at most K divided by K)."""
    _check_pair(experts_TK, ref_TK)
    shared_T = (experts_TK.unsqueeze(2) == ref_TK.unsqueeze(1)).any(dim=2).sum(dim=1)
    return shared_T.double() / experts_TK.shape[1]


def top1_changed_T(experts_TK: Tensor, ref_TK: Tensor) -> Tensor:
    """Per token, 1.0 where the top-1 expert (column 0) differs from the reference's, else 0.0 (float64)."""
    _check_pair(experts_TK, ref_TK)
    return (experts_TK[:, 0] != ref_TK[:, 0]).double()


def router_saturation(experts_TK: Tensor, ref_TK: Tensor, keep_T: Tensor | None = None) -> Tensor:
    """Mean over the kept tokens of ``|topk ∩ topk_ref| / K`` (OLMoE's router saturation), float64 scalar."""
    return _mean(overlap_T(experts_TK, ref_TK), keep_T)


def routing_fluctuation(experts_TK: Tensor, ref_TK: Tensor, keep_T: Tensor | None = None) -> Tensor:
    """Share of the kept tokens whose top-1 expert changed (StableMoE's routing fluctuation), float64 scalar."""
    return _mean(top1_changed_T(experts_TK, ref_TK), keep_T)


def _mean(values_T: Tensor, keep_T: Tensor | None) -> Tensor:
    if keep_T is not None:
        values_T = values_T[keep_T.reshape(-1).to(values_T.device)]
    if values_T.numel() == 0:
        raise ValueError("no token to compare: keep_T is all False, or the probe is empty; pass at least one token.")
    return values_T.mean()


class RoutingOverlap(Metric):
    """Router saturation and routing fluctuation accumulated over batches of token pairs.

    ``update(experts_TK, ref_TK, keep_T=None)`` adds one batch (slots ordered by weight, see
    :func:`order_by_weight`); ``compute()`` returns ``{"saturation", "fluctuation"}``. The states are sums (of
    overlaps, of top-1 changes, of tokens), so a DDP sync over ranks that each hold part of the tokens gives
    exactly the single-process value.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("overlap_sum", "changed_sum", "tokens"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, experts_TK: Tensor, ref_TK: Tensor, keep_T: Tensor | None = None) -> None:
        overlap, changed = overlap_T(experts_TK, ref_TK), top1_changed_T(experts_TK, ref_TK)
        if keep_T is not None:
            keep = keep_T.reshape(-1).to(overlap)
            overlap, changed = overlap * keep, changed * keep
            self.tokens += keep.sum()
        else:
            self.tokens += overlap.numel()
        self.overlap_sum += overlap.sum()
        self.changed_sum += changed.sum()

    def compute(self) -> dict[str, Tensor]:
        if self.tokens <= 0:
            raise ValueError("RoutingOverlap has no token; call update() with at least one kept token first.")
        return {"saturation": self.overlap_sum / self.tokens, "fluctuation": self.changed_sum / self.tokens}
