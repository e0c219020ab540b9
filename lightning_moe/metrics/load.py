"""Expert load metrics (baselines spec §4.10).

Legend: T tokens, K slots per token, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.metrics.common import check_ids
from lightning_moe.utils import count_ids, syncs_are_free


def load_stats(counts_E: Tensor, check_empty: bool = True) -> dict[str, Tensor]:
    """Imbalance statistics of per-expert assignment counts.

    * ``cv``: population std / mean of the loads (0 = perfect balance).
    * ``max_over_mean`` = max / mean load; ``maxvio`` = max / mean - 1 (Wang et al. 2024, mean = K*T/E).
    * ``entropy``: H(load shares) / log E in [0, 1] (1 when E = 1).
    * ``dead_experts``: experts with no assignment.

    ``check_empty``: raise when nothing was counted (statistics would be NaN). The test reads a value on the host,
    a stream stall on a GPU: pass False where the counts cannot be empty (a training batch's routing).
    """
    loads = counts_E.double()
    E = loads.numel()
    mean = loads.mean()
    if check_empty and mean <= 0:
        raise ValueError("no routed tokens were counted; update the metric with at least one routing decision.")
    shares = loads / loads.sum()
    if syncs_are_free(shares):
        nz = shares[shares > 0]
        plogp = (nz * nz.log()).sum()
    else:  # xlogy: 0 log 0 = 0 without selecting the non-zero shares (a boolean mask is a host sync on a GPU)
        plogp = torch.special.xlogy(shares, shares).sum()  # same value; the last bit can differ (summation order)
    entropy = -plogp / math.log(E) if E > 1 else torch.ones((), dtype=torch.float64)
    return {
        "cv": loads.std(correction=0) / mean,
        "max_over_mean": loads.max() / mean,
        "maxvio": loads.max() / mean - 1,
        "entropy": entropy,
        "dead_experts": (loads == 0).sum().double(),
    }


def load_percentiles(counts_E: Tensor) -> dict[str, Tensor]:
    """``p50``, ``p90``, ``p99`` of the per-expert loads as share x E (1 = uniform, E = one expert takes all),
    with ``torch.quantile``'s linear interpolation between the E sorted loads."""
    loads = counts_E.double()
    total = loads.sum()
    if total <= 0:
        raise ValueError("no routed tokens were counted; update the metric with at least one routing decision.")
    load_E = loads / total * loads.numel()
    q = torch.quantile(load_E, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64, device=load_E.device))
    return {"p50": q[0], "p90": q[1], "p99": q[2]}


class ExpertLoad(Metric):
    """Per-expert assignment counts of one layer, accumulated over batches (e.g. a whole validation set).

    ``update(experts_TK)`` counts every (token, slot) assignment of one batch; ``compute()`` returns
    :func:`load_stats` of the summed counts (``maxvio`` over all batches = MaxVio_global on a validation set)
    plus ``maxvio_batch``: the MaxVio of each update's own counts, averaged over updates (MaxVio_batch of Wang et
    al. 2024 when each update is one training batch; under DDP, each rank's batch), and the counts ``counts_E``.
    """

    full_state_update = False

    def __init__(self, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        self.num_experts = num_experts
        self.add_state("counts_E", default=torch.zeros(num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("maxvio_batch_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, experts_TK: Tensor) -> None:
        if experts_TK.numel() == 0:
            return  # no assignment, no batch MaxVio to average in
        check_ids("expert id", experts_TK, self.num_experts, f"num_experts={self.num_experts} must match the layer")
        experts_N, E = experts_TK.reshape(-1), self.num_experts
        if not syncs_are_free(experts_N):  # ids unchecked on a GPU (check_ids): out of range is not counted
            experts_N = experts_N.masked_fill((experts_N < 0) | (experts_N >= E), E)
        counts_E = count_ids(experts_N, E + 1)[:E].to(self.counts_E)
        self.counts_E += counts_E
        # max / mean - 1 with mean = sum / E, the same MaxVio as load_stats without its other statistics.
        self.maxvio_batch_sum += counts_E.max() * self.num_experts / counts_E.sum() - 1
        self.batches += 1

    def compute(self) -> dict[str, Tensor]:
        stats = load_stats(self.counts_E)
        stats["maxvio_batch"] = self.maxvio_batch_sum / self.batches
        stats["counts_E"] = self.counts_E.clone()  # synchronised here (states are local again after compute)
        return stats


class SlotCounts(Metric):
    """Shares of a layer's (token, slot) choices that no expert computed: ``skipped_share`` (sent to a skip /
    zero-computation expert) and ``dropped_share`` (dropped by a capacity router), of every slot of the counted
    tokens. Sum-reduced, so exact under DDP."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("skipped", "dropped", "slots"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, skipped_TK: Tensor | None, dropped_TK: Tensor | None, token_mask_T: Tensor | None = None) -> None:
        """Args: the event's ``skipped_TK`` and ``dropped_TK`` (None = none) and which tokens count."""
        shape = (skipped_TK if skipped_TK is not None else dropped_TK).shape
        keep_TK = torch.ones(shape, dtype=torch.bool, device=self.slots.device)
        if token_mask_T is not None:
            keep_TK = keep_TK & token_mask_T.reshape(-1, 1).to(keep_TK.device)
        self.slots += keep_TK.sum()
        if skipped_TK is not None:
            self.skipped += (skipped_TK.to(keep_TK.device) & keep_TK).sum()
        if dropped_TK is not None:
            self.dropped += (dropped_TK.to(keep_TK.device) & keep_TK).sum()

    def compute(self) -> dict[str, Tensor]:
        slots = self.slots.clamp_min(1)
        return {"skipped_share": self.skipped / slots, "dropped_share": self.dropped / slots}
