"""Router–expert score–activation coupling pooled over layers, with its significance (arXiv 2605.12476 Fig. 2;
geometric-coupling spec §2.2–2.3).

The paper's evidence for "a router row and its expert accumulate the same routed-token history" is a Spearman ρ
between the router's score of the selected expert and that expert's response to the token, z-scored per expert
within each layer, pooled over all layers (``sagearc/OLMo-core: plot_router_score_coupling.py``; paper ρ = 0.43,
p = 1.2e-81). This module measures every variant the spec asks for:

* score ``x``: ``weight`` (the slot's dispatch weight, the authors' x) or ``logit`` (the raw router-row dot
  product ``h·r_e``, the quantity whose gradient is parallel to ``h``; for K-Means the centroid dot product);
* response ``y``: ``gate_norm`` = ‖h·W_gateᵀ‖₂ (pre-activation, the authors' script, our headline),
  ``up_norm`` = ‖h·W_upᵀ‖₂ (the GLU's linear branch: the paper's cleaner prediction, no activation derivative),
  ``gate_act`` = mean SiLU(h·W_gateᵀ) (the digest's "mean gate-neuron activation").

No scipy: ranks come from :func:`lightning_moe.metrics.geometry.rankdata`, the p-value from Student's t with
n − 2 degrees of freedom (scipy's ``spearmanr``), computed in log space so a p of 1e-300 is still a number.

Legend: N (token, selected expert) pairs, L layers, E experts per layer, G = L·E (layer, expert) groups,
F expert width, D model width.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_moe.metrics.geometry import DECILES, decile_means, projection_norms_N, spearman, zscore_per_group
from lightning_moe.utils import check_positive_int

COUPLING_SCORES: tuple[str, ...] = ("weight", "logit")
COUPLING_RESPONSES: tuple[str, ...] = ("gate_norm", "up_norm", "gate_act")
_TINY = 1e-300  # keeps Lentz's continued fraction away from division by zero


def _log_betacf(a: float, b: float, x: float) -> float:
    """log of the continued fraction of the regularised incomplete beta I_x(a, b) (modified Lentz; Numerical
    Recipes ``betacf``); converges fast for x < (a + 1) / (a + b + 2), the only branch the caller uses."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.log(h)


def log_betainc(a: float, b: float, x: float) -> float:
    """Natural log of the regularised incomplete beta function I_x(a, b), accurate for tiny values."""
    if x <= 0.0:
        return -math.inf
    if x >= 1.0:
        return 0.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return log_front - math.log(a) + _log_betacf(a, b, x)
    # The other tail by symmetry, I_x(a, b) = 1 − I_{1−x}(b, a); here I is not tiny, so linear space is exact.
    return math.log1p(-math.exp(log_front - math.log(b) + _log_betacf(b, a, 1.0 - x)))


def correlation_log10_p(rho: float, n: int) -> float:
    """log10 of the two-sided p-value of H0 "no correlation" for a (rank) correlation ``rho`` of ``n`` pairs:
    t = ρ·√((n−2)/(1−ρ²)) with n − 2 degrees of freedom, p = I_{df/(df+t²)}(df/2, 1/2) — what scipy's
    ``spearmanr`` reports. −inf for |ρ| = 1, NaN for n < 3 or a NaN ρ."""
    if n < 3 or math.isnan(rho):
        return math.nan
    if abs(rho) >= 1.0:
        return -math.inf
    df = n - 2
    # df / (df + t²) simplifies to 1 − ρ², which avoids overflowing t for ρ near 1.
    return log_betainc(df / 2.0, 0.5, 1.0 - rho * rho) / math.log(10.0)


def coupling_stats(x_N: Tensor, y_N: Tensor, groups_N: Tensor) -> dict[str, Tensor | float | int]:
    """Spearman ρ of ``x`` against ``y`` z-scored within each group, its pair count ``n``, ``log10_p`` and the
    ``deciles`` curve (mean z per x decile; rising = coupled). Groups with fewer than two pairs or a constant
    ``y`` have no z-score and are left out (``n`` counts what is left)."""
    z_N, keep_N = zscore_per_group(y_N, groups_N)
    x, z = x_N.double()[keep_N], z_N[keep_N]
    n = int(x.numel())
    if n < 3:
        return {"rho": math.nan, "n": n, "log10_p": math.nan, "deciles": torch.full((DECILES,), math.nan)}
    rho = float(spearman(x, z))
    return {"rho": rho, "n": n, "log10_p": correlation_log10_p(rho, n), "deciles": decile_means(x, z)}


def expert_responses_N(x_ND: Tensor, experts_N: Tensor, gate_EFD: Tensor, up_EFD: Tensor) -> dict[str, Tensor]:
    """Every response of :data:`COUPLING_RESPONSES` for each (token, selected expert) pair, fp32."""
    gate_act_N = torch.empty(x_ND.shape[0], dtype=torch.float32, device=x_ND.device)
    for e in torch.unique(experts_N).tolist():
        sel = experts_N == e
        gate_act_N[sel] = F.silu(x_ND[sel].float() @ gate_EFD[e].float().T).mean(dim=1)
    return {
        "gate_norm": projection_norms_N(x_ND, experts_N, gate_EFD),
        "up_norm": projection_norms_N(x_ND, experts_N, up_EFD),
        "gate_act": gate_act_N,
    }


class LayerCoupling(Metric):
    """The (token, selected expert) pairs of L layers, for :func:`coupling_stats` pooled over layers, per layer,
    and per (layer, expert) group.

    Ranks do not decompose into sums, so the pairs are kept in ``cat`` states (gathered from every rank under DDP
    before ranking, which is exact); they grow with the evaluated tokens, so evaluate a bounded set.

    ``compute()`` returns ``{"<score>/<response>": {"pooled": stats, "layers": [stats per layer],
    "median_group_rho": float}}`` for every score of :data:`COUPLING_SCORES` and response of :data:`COUPLING_RESPONSES`, with
    ``stats`` from :func:`coupling_stats` (z-scored per (layer, expert) in every case, as the authors do), and
    ``median_group_rho`` the median ρ over (layer, expert) groups with at least ``min_group_pairs`` pairs; and
    ``"negative_weight_fraction"``: the share of pairs with a negative dispatch weight (cosine scores used as
    mixing weights, K-Means ``mixing='scores'``, can flip an expert's output; spec §4.8).

    Args:
        num_layers: number of layers L.
        num_experts: experts per layer E.
        min_group_pairs: pairs a (layer, expert) group needs to enter ``median_group_rho`` (the authors use 128).
    """

    full_state_update = False

    def __init__(self, num_layers: int, num_experts: int, min_group_pairs: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_experts", num_experts)
        check_positive_int("min_group_pairs", min_group_pairs)
        self.num_layers, self.num_experts, self.min_group_pairs = num_layers, num_experts, min_group_pairs
        for name in ("groups", *COUPLING_SCORES, *COUPLING_RESPONSES):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, layer: int, experts_N: Tensor, scores: dict[str, Tensor], responses: dict[str, Tensor]) -> None:
        """Add one layer's pairs: ``scores`` has every key of :data:`COUPLING_SCORES`, ``responses`` every key of
        :data:`COUPLING_RESPONSES`, each one value per pair."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must lie in [0, num_layers={self.num_layers}), got {layer!r}.")
        given = {**scores, **responses}
        missing = [k for k in (*COUPLING_SCORES, *COUPLING_RESPONSES) if k not in given]
        if missing:
            raise ValueError(f"update() is missing {missing}; give scores {COUPLING_SCORES} and responses {COUPLING_RESPONSES}.")
        bad = {k: tuple(v.shape) for k, v in given.items() if v.shape != experts_N.shape}
        if bad:
            raise ValueError(
                f"every score and response needs one value per pair, shaped like experts_N "
                f"{tuple(experts_N.shape)}; got {bad}."
            )
        if experts_N.numel() and not 0 <= int(experts_N.min()) <= int(experts_N.max()) < self.num_experts:
            raise ValueError(f"expert ids must lie in [0, num_experts={self.num_experts}).")
        self.groups.append((layer * self.num_experts + experts_N.detach().long()).reshape(-1))
        for k in (*COUPLING_SCORES, *COUPLING_RESPONSES):
            getattr(self, k).append(given[k].detach().double().reshape(-1))

    def compute(self) -> dict[str, Any]:
        if isinstance(self.groups, list) and not self.groups:
            raise ValueError("no (score, response) pairs were recorded; update the metric first.")
        groups_N = dim_zero_cat(self.groups)
        layer_N = groups_N // self.num_experts
        values = {k: dim_zero_cat(getattr(self, k)) for k in (*COUPLING_SCORES, *COUPLING_RESPONSES)}
        counts_G = torch.bincount(groups_N, minlength=self.num_layers * self.num_experts)
        big_groups = torch.nonzero(counts_G >= self.min_group_pairs).flatten().tolist()
        out: dict[str, Any] = {"negative_weight_fraction": float((values["weight"] < 0).double().mean())}
        for s in COUPLING_SCORES:
            for r in COUPLING_RESPONSES:
                x_N, y_N = values[s], values[r]
                group_rhos = [float(spearman(x_N[groups_N == g], y_N[groups_N == g])) for g in big_groups]
                group_rhos = [v for v in group_rhos if not math.isnan(v)]  # constant x or y inside a group
                out[f"{s}/{r}"] = {
                    "pooled": coupling_stats(x_N, y_N, groups_N),
                    "layers": [
                        coupling_stats(x_N[layer_N == i], y_N[layer_N == i], groups_N[layer_N == i])
                        for i in range(self.num_layers)
                    ],
                    "median_group_rho": statistics.median(group_rhos) if group_rhos else math.nan,
                }
        return out
