"""Router geometry and router–expert score–activation coupling (geometric-coupling spec §2.2–2.3; baselines
§4.11).

Legend: E experts (router rows), D model width, F expert width, N sampled (token, selected expert) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_moe.utils import check_positive_int

DECILES = 10  # points of the score -> response curves (the paper's Fig. 2 bins by score decile)

def router_geometry(rows_ED: Tensor, center: bool = False) -> dict[str, Tensor]:
    """Geometry of router rows (or K-Means centroids), all in float64.

    * ``mean_cosine``: signed mean off-diagonal cosine Σ_{i≠j} cos(r_i, r_j) / (E(E−1)) — the Fig. 3 number of
      arXiv 2605.12476 (``sagearc/OLMo-core: compare_router_vectors.py``); NaN when E = 1.
    * ``nn_cosine``: mean over rows of the cosine to the nearest other row.
    * ``effective_rank``: exp(−Σ p_k log p_k), p_k = σ_k² / Σσ² over the singular values (E for orthogonal rows
      of equal norm, 1 for rank one).
    * ``common_energy``: E·‖mean row‖² / ‖W‖_F² (1 when all rows are equal, 0 when they cancel).

    Args:
        rows_ED: one row per expert.
        center: subtract the mean row before the cosines and the effective rank (OLMo-core's "centered" variant);
            ``common_energy`` is always of the raw rows.
    """
    W = rows_ED.detach().double()
    E = W.shape[0]
    common = E * W.mean(0).square().sum() / W.square().sum().clamp_min(1e-300)
    if center:
        W = W - W.mean(0, keepdim=True)
    U = F.normalize(W, dim=1)
    cos_EE = U @ U.T
    off_EE = ~torch.eye(E, dtype=torch.bool, device=W.device)
    sigma2 = torch.linalg.svdvals(W).square()
    p = sigma2 / sigma2.sum().clamp_min(1e-300)
    p = p[p > 0]
    nearest_E = cos_EE.masked_fill(~off_EE, float("-inf")).max(1).values
    return {
        "mean_cosine": cos_EE[off_EE].mean(),  # mean of no pairs = NaN when E = 1
        "nn_cosine": nearest_E.mean() if E > 1 else cos_EE.new_tensor(float("nan")),
        "effective_rank": torch.exp(-(p * p.log()).sum()),
        "common_energy": common,
    }


def paired_alignment(a_ED: Tensor, b_ED: Tensor, absolute: bool = False) -> dict[str, Tensor]:
    """How much row i of ``a`` points along row i of ``b`` rather than along the other rows (float64): the
    spec's accumulated-history check, e.g. ``a`` = a router row's change since the start, ``b`` = the mean input
    routed to its expert.

    * ``matched``: mean_i cos(a_i, b_i);
    * ``mismatched``: mean over i ≠ j of cos(a_i, b_j) (NaN with one usable row): the baseline, far from zero
      when the rows of either side share a direction;
    * ``match_rate``: share of rows i whose best-aligned row of ``b`` is b_i (chance 1 / rows).

    Rows where either side is zero (an expert that got no token, a router row that never moved) have no
    direction and are left out; with none left every value is NaN.

    Args:
        absolute: compare |cos|, for directions whose sign is arbitrary (singular vectors).
    """
    if a_ED.ndim != 2 or a_ED.shape != b_ED.shape:
        raise ValueError(f"paired_alignment compares row i of a with row i of b, so both must be [E, D] of one shape, "
                         f"got {tuple(a_ED.shape)} and {tuple(b_ED.shape)}.")
    # A NaN row (RoutedMean of an expert without tokens) fails ``> 0`` too.
    valid_E = (a_ED.detach().abs().sum(1) > 0) & (b_ED.detach().abs().sum(1) > 0)
    A = F.normalize(a_ED.detach().double()[valid_E], dim=1)
    B = F.normalize(b_ED.detach().double()[valid_E], dim=1)
    n = A.shape[0]
    if n == 0:
        return {k: torch.tensor(float("nan"), dtype=torch.float64) for k in ("matched", "mismatched", "match_rate")}
    cos_EE = A @ B.T
    if absolute:
        cos_EE = cos_EE.abs()
    diag_E = torch.eye(n, dtype=torch.bool, device=cos_EE.device)
    own_E = torch.arange(n, device=cos_EE.device)
    return {
        "matched": cos_EE.diagonal().mean(),
        "mismatched": cos_EE[~diag_E].mean(),  # mean of no pairs = NaN for one row
        "match_rate": (cos_EE.argmax(1) == own_E).double().mean(),
    }


def top_right_singular_ED(weight_EFD: Tensor) -> Tensor:
    """The top right-singular vector of each expert's [F, D] projection, [E, D] float64 (sign arbitrary): the
    input direction the expert's projection amplifies most."""
    return torch.linalg.svd(weight_EFD.detach().double(), full_matrices=False).Vh[:, 0, :]


class RoutedMean(Metric):
    """The mean input routed to each expert, μ_e = Σ_{n: e_n = e} x_n / count_e, over (token, selected expert)
    pairs (a token routed to K experts counts once for each); NaN rows for experts with no pair. Sums, so DDP
    reduction is exact.

    Args:
        num_experts: number of experts E.
        dim: input width D.
    """

    full_state_update = False

    def __init__(self, num_experts: int, dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("dim", dim)
        self.add_state("sum_ED", default=torch.zeros(num_experts, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count_E", default=torch.zeros(num_experts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_ND: Tensor, experts_N: Tensor) -> None:
        if x_ND.shape[:1] != experts_N.shape or x_ND.shape[1:] != self.sum_ED.shape[1:]:
            raise ValueError(
                f"RoutedMean needs x [N, {self.sum_ED.shape[1]}] and experts [N], got shapes {tuple(x_ND.shape)} "
                f"and {tuple(experts_N.shape)}."
            )
        self.sum_ED.index_add_(0, experts_N, x_ND.detach().double())
        self.count_E += torch.bincount(experts_N, minlength=self.count_E.numel()).double()

    def compute(self) -> Tensor:
        return self.sum_ED / self.count_E[:, None]  # 0 / 0 = NaN for an expert without a pair


def rankdata(x_N: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method="average")``), float64."""
    n = x_N.numel()
    order = torch.argsort(x_N, stable=True)
    sorted_x = x_N[order]
    # Tie groups: each run of equal sorted values gets the mean of the ranks it spans.
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty(n, dtype=torch.float64, device=x_N.device)
    ranks[order] = avg[inverse]
    return ranks


def decile_means(x_N: Tensor, y_N: Tensor) -> Tensor:
    """Mean of ``y`` within each decile of ``x`` (deciles by rank, ties shared by average rank), float64 [10]."""
    n = x_N.numel()
    decile_N = (rankdata(x_N) - 1).mul(DECILES / n).long().clamp_max(DECILES - 1)
    sums = torch.zeros(DECILES, dtype=torch.float64, device=y_N.device).index_add_(0, decile_N, y_N.double())
    return sums / torch.bincount(decile_N, minlength=DECILES).double()


def spearman(x_N: Tensor, y_N: Tensor) -> Tensor:
    """Spearman's ρ: the Pearson correlation of average ranks (exact with ties); NaN if either side is constant."""
    rx, ry = rankdata(x_N), rankdata(y_N)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.square().sum() * ry.square().sum()).sqrt()


def projection_norms_N(x_ND: Tensor, experts_N: Tensor, weight_EFD: Tensor) -> Tensor:
    """‖x_n · W_{e_n}ᵀ‖₂ for each (token, selected expert) pair, computed per expert (memory O(N·F)), fp32."""
    norms_N = torch.empty(x_ND.shape[0], dtype=torch.float32, device=x_ND.device)
    for e in torch.unique(experts_N).tolist():
        sel = experts_N == e
        norms_N[sel] = (x_ND[sel].float() @ weight_EFD[e].float().T).norm(dim=1)
    return norms_N


def zscore_per_group(y_N: Tensor, groups_N: Tensor, min_count: int = 2) -> tuple[Tensor, Tensor]:
    """Standardise ``y`` within each group (population std); returns (z, kept mask). Groups with fewer than
    ``min_count`` samples or zero spread are dropped: their z-score is undefined."""
    num_groups = int(groups_N.max()) + 1
    y = y_N.double()
    count_G = torch.bincount(groups_N, minlength=num_groups).double()
    sum_G = torch.zeros(num_groups, dtype=torch.float64, device=y.device).index_add_(0, groups_N, y)
    mean_G = sum_G / count_G.clamp_min(1)
    dev = y - mean_G[groups_N]
    var_G = torch.zeros_like(mean_G).index_add_(0, groups_N, dev.square()) / count_G.clamp_min(1)
    keep_N = (count_G[groups_N] >= min_count) & (var_G[groups_N] > 0)
    return dev / var_G[groups_N].clamp_min(1e-300).sqrt(), keep_N


class ScoreActivationCoupling(Metric):
    """Spearman ρ between the selected expert's routing weight and that expert's activation norm, z-scored per
    expert within the layer (arXiv 2605.12476 Fig. 2; ``sagearc/OLMo-core: plot_router_score_coupling.py``:
    x = dispatch weight, y = ‖h·W_gateᵢᵀ‖₂ z-scored per expert; paper ρ = 0.43).

    Ranks do not decompose into sums, so this metric keeps its (bounded, sampled) pairs in ``cat`` states:
    under DDP they are gathered from every rank before ranking, which is exact. Keep the sample small.

    ``compute()`` returns ``spearman`` and ``decile_means`` (mean z-scored norm per weight decile, for plots).

    Args:
        num_experts: number of experts E.
    """

    full_state_update = False

    def __init__(self, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        self.num_experts = num_experts
        self.add_state("weights", default=[], dist_reduce_fx="cat")
        self.add_state("norms", default=[], dist_reduce_fx="cat")
        self.add_state("experts", default=[], dist_reduce_fx="cat")

    def update(self, weights_N: Tensor, norms_N: Tensor, experts_N: Tensor) -> None:
        if not weights_N.shape == norms_N.shape == experts_N.shape:
            raise ValueError(
                f"weights, norms and experts must have one entry per pair, got shapes {tuple(weights_N.shape)}, "
                f"{tuple(norms_N.shape)}, {tuple(experts_N.shape)}."
            )
        self.weights.append(weights_N.detach().double().reshape(-1))
        self.norms.append(norms_N.detach().double().reshape(-1))
        self.experts.append(experts_N.detach().long().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.weights, list) and not self.weights:
            raise ValueError("no (weight, norm) pairs were recorded; update the metric first.")
        # Lists of per-update tensors before a DDP sync, one gathered tensor after it.
        w, y, e = dim_zero_cat(self.weights), dim_zero_cat(self.norms), dim_zero_cat(self.experts)
        z, keep = zscore_per_group(y, e)
        w, z = w[keep], z[keep]
        if w.numel() < 2:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"spearman": nan, "decile_means": nan.repeat(DECILES)}
        return {"spearman": spearman(w, z), "decile_means": decile_means(w, z)}
