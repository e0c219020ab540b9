"""Routing diagnostics: expert co-activation (OLMoE, arXiv 2409.02060 §5) and top-k decision margins.

Legend: T tokens, K selected slots per token, E experts, B histogram bins (+1 for margins below zero).

Both metrics keep only sum-reduced states (counts), so under DDP the synchronised value is exactly the value of
one process over all ranks' tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.metrics.common import check_ids

# Margin histogram resolution: 1000 bins of width 0.001 over [0, 1]; quantiles are reported as the upper edge of
# the bin where they fall, so they are exact to 0.001. Margins below 0 (a selection not made by score order, e.g.
# a bias-shifted top-k) share one extra bin in front, reported as 0.
MARGIN_BINS = 1000


class CoActivation(Metric):
    """How often experts are selected together for the same token, accumulated over batches (K >= 2).

    ``update(experts_TK, keep_TK=None)`` counts, for every token, each ordered pair of its distinct selected
    experts (``pairs_EE``) and each selected expert (``counts_E``); ``compute()`` returns ``P_EE`` with
    ``P[i, j] = P(E_j | E_i)``, the share of the tokens routed to expert i that are also routed to expert j (0 on
    the diagonal and in the rows of experts never selected).

    Args:
        num_experts: experts E of the layer.
    """

    full_state_update = False

    def __init__(self, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}.")
        self.num_experts = num_experts
        self.add_state("pairs_EE", default=torch.zeros(num_experts, num_experts, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("counts_E", default=torch.zeros(num_experts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, experts_TK: Tensor, keep_TK: Tensor | None = None) -> None:
        check_ids("expert id", experts_TK, self.num_experts, f"num_experts={self.num_experts} must match the layer")
        weight_TK = torch.ones(experts_TK.shape, dtype=torch.float64, device=experts_TK.device)
        if keep_TK is not None:
            weight_TK = weight_TK * keep_TK
        # hit_TE[t, e] = 1 when token t selected expert e (clamped: a router that repeats an expert in two slots
        # still selects it once); pairs = hit^T hit counts co-selections, its diagonal the selections themselves.
        hit_TE = torch.zeros(experts_TK.shape[0], self.num_experts, dtype=torch.float64, device=experts_TK.device)
        hit_TE = hit_TE.scatter_add_(1, experts_TK, weight_TK).clamp_(max=1)
        pairs_EE = hit_TE.T @ hit_TE
        self.counts_E += pairs_EE.diagonal()
        self.pairs_EE += pairs_EE.fill_diagonal_(0)

    def compute(self) -> Tensor:
        return self.pairs_EE / self.counts_E.clamp_min(1).unsqueeze(1)


def decision_margins_T(scores_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """Relative top-k boundary margin of each token, fp32 ``[T]``:
    ``(lowest selected score - highest unselected score) / |lowest selected score|``.

    1 when the best unselected expert has score 0, 0 at an exact tie, negative when an unselected expert scores
    higher than a selected one (bias-shifted selection). Needs K < E; the denominator is clamped at the smallest
    normal float so a zero lowest score gives a large finite value, not NaN.
    """
    E, K = scores_TE.shape[1], experts_TK.shape[1]
    if K >= E:
        raise ValueError(f"decision margins need K < E, got K={K} selected of E={E} experts; every expert is chosen.")
    scores_TE = scores_TE.detach().float()
    lowest_T = scores_TE.gather(1, experts_TK).min(dim=1).values
    highest_T = scores_TE.scatter(1, experts_TK, float("-inf")).max(dim=1).values
    return (lowest_T - highest_T) / lowest_T.abs().clamp_min(torch.finfo(torch.float32).tiny)


class MarginHistogram(Metric):
    """Distribution of decision margins (:func:`decision_margins_T`) in a fixed-bin histogram.

    ``update(margins_T, keep_T=None)``; ``compute()`` returns ``p10``, ``p50``, ``p90`` (upper edge of the bin
    where each quantile falls: exact to ``1 / bins``; margins below 0 count as 0), ``near_tie_share`` (share of
    tokens with a margin below ``near_tie``, counted exactly, not from the bins), ``negative_share`` and the
    histogram ``hist_B`` (bin 0: margins < 0; bin b >= 1: ``[(b-1)/bins, b/bins)``, the last bin closed at 1 and
    holding margins above 1 too).

    Args:
        near_tie: margins below this count as near-ties (the top-k choice flips under a relative score change of
            this size).
        bins: histogram bins over [0, 1].
    """

    full_state_update = False

    def __init__(self, near_tie: float = 0.01, bins: int = MARGIN_BINS, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(near_tie, bool) or not isinstance(near_tie, (int, float)) or not 0 < near_tie < 1:
            raise ValueError(f"near_tie must be a number in (0, 1), got {near_tie!r}; 0.01 means a 1% score gap.")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an integer >= 1, got {bins!r}.")
        self.near_tie, self.bins = float(near_tie), bins
        self.add_state("hist_B", default=torch.zeros(bins + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("near_ties", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, margins_T: Tensor, keep_T: Tensor | None = None) -> None:
        margins_T = margins_T.reshape(-1).float()
        weight_T = torch.ones_like(margins_T, dtype=torch.float64)
        if keep_T is not None:
            weight_T = weight_T * keep_T.reshape(-1)
        # floor(m * bins) + 1: bin b >= 1 holds [(b-1)/bins, b/bins); negatives go to bin 0, m >= 1 to the last.
        bin_T = torch.where(margins_T < 0, 0, (margins_T * self.bins).floor().clamp(0, self.bins - 1).long() + 1)
        self.hist_B.index_add_(0, bin_T.long(), weight_T)
        self.near_ties += (weight_T * (margins_T < self.near_tie)).sum()

    def compute(self) -> dict[str, Tensor]:
        total = self.hist_B.sum()
        if total <= 0:
            raise ValueError("no margin was counted; update the metric with at least one token.")
        cdf_B = self.hist_B.cumsum(0) / total
        out = {}
        for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
            b = int(torch.searchsorted(cdf_B, torch.tensor(q, dtype=cdf_B.dtype, device=cdf_B.device)))
            out[name] = torch.tensor(b / self.bins, dtype=torch.float64)  # upper edge of bin b; bin 0 -> 0
        out["near_tie_share"] = self.near_ties / total
        out["negative_share"] = self.hist_B[0] / total
        out["hist_B"] = self.hist_B.clone()
        return out
