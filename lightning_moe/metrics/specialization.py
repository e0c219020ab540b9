"""Expert specialisation against a per-token label: task, domain or token id (baselines spec §4.11).

Legend: T tokens, K slots per token, E experts, C label classes, V vocabulary (token ids as classes).

Counts n_{c,e} are (token, slot) assignments of class c to expert e; the joint is p(c,e) = n_{c,e} / Σn.
Tokens with a negative label (e.g. the ``-100`` ignore index, or masked padding) are not counted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.metrics.common import check_ids, pair_counts_RC, row_sums_RE
from lightning_moe.utils import check_positive_int


def _entropy(p: Tensor) -> Tensor:
    nz = p[p > 0]
    return -(nz * nz.log()).sum()


def specialization_stats(joint_CE: Tensor) -> dict[str, Tensor]:
    """Scalar specialisation statistics of a label x expert count (or summed-probability) table.

    * ``mi``: I(C;E) = Σ p(c,e) log[p(c,e) / (p(c) p(e))] in nats.
    * ``nmi``: the **arithmetic** normalisation 2I / (H(C) + H(E)) (scikit-learn's default); ``nmi_geometric``:
      I / sqrt(H(C) H(E)). As in scikit-learn, both are 1 when C and E each take one value and 0 when I = 0.
    * ``purity_expert`` = (1/n) Σ_e max_c n_{c,e} (how pure each expert is); ``purity_class`` =
      (1/n) Σ_c max_e n_{c,e} (task purity: "each class goes to one expert").
    """
    n = joint_CE.double()
    total = n.sum()
    if total <= 0:
        raise ValueError("no labelled routing decisions were counted; update the metric with at least one token.")
    p = n / total
    pc, pe = p.sum(1), p.sum(0)
    outer = pc[:, None] * pe[None, :]
    nz = p > 0
    mi = (p[nz] * (p[nz] / outer[nz]).log()).sum().clamp_min(0)  # clamp: rounding can give -1e-17
    hc, he = _entropy(pc), _entropy(pe)
    if hc == 0 and he == 0:
        nmi = nmi_geo = torch.ones((), dtype=torch.float64)
    else:
        nmi = 2 * mi / (hc + he)
        nmi_geo = mi / (hc * he).sqrt() if hc * he > 0 else torch.zeros((), dtype=torch.float64)
    return {
        "mi": mi,
        "nmi": nmi,
        "nmi_geometric": nmi_geo,
        "purity_expert": n.max(0).values.sum() / total,
        "purity_class": n.max(1).values.sum() / total,
    }


def share_matrix_CE(joint_CE: Tensor) -> Tensor:
    """OLMoE domain specialisation DS(e, c) = n_{c,e} / Σ_j n_{c,j} (rows sum to 1; uniform = 1/E).

    arXiv 2409.02060 §5; ``allenai/OLMoE: scripts/run_routing_analysis.py``. Rows of unseen classes are 0.
    """
    n = joint_CE.double()
    return n / n.sum(1, keepdim=True).clamp_min(1e-300)


def conditional_entropy_C(joint_CE: Tensor) -> Tensor:
    """H(E | C=c) / log E per class: 0 = the class always uses one expert, 1 = it spreads uniformly."""
    share = share_matrix_CE(joint_CE)
    E = share.shape[1]
    h = -(share * share.clamp_min(1e-300).log()).sum(1)
    return h / math.log(E) if E > 1 else torch.zeros_like(h)


class LabelSpecialization(Metric):
    """Label x expert counts of one layer, three ways: all K slots, top-1 slot only, and soft (summed routing
    probability, the form Mod-Squad maximises); baselines §4.11 says to log both counting rules.

    ``compute()`` returns :func:`specialization_stats` of each table (suffix ``""``, ``_top1``, ``_soft``) and the
    all-K ``share_CE`` matrix (for plots).

    Args:
        num_labels: number of label classes C (labels must lie in [0, C); negative labels are ignored).
        num_experts: number of experts E.
    """

    full_state_update = False

    def __init__(self, num_labels: int, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_labels", num_labels)
        check_positive_int("num_experts", num_experts)
        self.num_labels, self.num_experts = num_labels, num_experts
        for name in ("joint_CE", "top1_CE", "soft_CE"):
            zeros_CE = torch.zeros(num_labels, num_experts, dtype=torch.float64)
            self.add_state(name, default=zeros_CE, dist_reduce_fx="sum")

    def update(
        self, labels_T: Tensor, experts_TK: Tensor, top1_T: Tensor, mass_TE: Tensor, mask_TK: Tensor | None = None
    ) -> None:
        """Args: labels per token (negative = skip the token), the K expert ids, the top-1 expert, the routing
        distribution ``[T, E]``, and which slots are real assignments (None = all)."""
        labels_T = labels_T.reshape(-1)
        check_ids("label", labels_T, self.num_labels, "raise num_labels or remap the labels")
        check_ids("expert id", experts_TK, self.num_experts, "num_experts must match the layer")
        E = self.num_experts
        # One count for both tables: columns [0, E) are the K slots' experts, [E, 2E) the top-1 expert.
        cols_TX = torch.cat([experts_TK, top1_T[:, None] + E], dim=1)
        keep_TX = None if mask_TK is None else torch.cat([mask_TK, mask_TK.any(1, keepdim=True)], dim=1)
        counts_CX = pair_counts_RC(labels_T[:, None].expand_as(cols_TX), cols_TX, self.num_labels, 2 * E, keep_TX)
        self.joint_CE += counts_CX[:, :E]
        self.top1_CE += counts_CX[:, E:]
        self.soft_CE += row_sums_RE(labels_T, mass_TE, self.num_labels)

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for suffix, table in (("", self.joint_CE), ("_top1", self.top1_CE), ("_soft", self.soft_CE)):
            out.update({k + suffix: v for k, v in specialization_stats(table).items()})
        out["share_CE"] = share_matrix_CE(self.joint_CE)
        return out


class TokenSpecialization(Metric):
    """OLMoE token-id (vocabulary) specialisation of one layer: for each token id, the share of its occurrences
    routed (top-1) to its most frequent expert, averaged over the ids seen.

    ``allenai/OLMoE: scripts/run_moe_analysis.py`` (``do_token_analysis``, "Average probability"); baselines
    §4.11. Also returns the occurrence-weighted version (= top-1 class purity over token ids).

    Args:
        vocab_size: number of token ids V (state is ``[V, E]`` float64: 25 MB at V=50k, E=64).
        num_experts: number of experts E.
    """

    full_state_update = False

    def __init__(self, vocab_size: int, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("num_experts", num_experts)
        self.vocab_size, self.num_experts = vocab_size, num_experts
        zeros_VE = torch.zeros(vocab_size, num_experts, dtype=torch.float64)
        self.add_state("top1_VE", default=zeros_VE, dist_reduce_fx="sum")

    def update(self, token_ids_T: Tensor, top1_T: Tensor) -> None:
        token_ids_T = token_ids_T.reshape(-1)
        check_ids("token id", token_ids_T, self.vocab_size, "set vocab_size to the tokenizer's vocabulary size")
        self.top1_VE += pair_counts_RC(token_ids_T, top1_T, self.vocab_size, self.num_experts)

    def compute(self) -> dict[str, Tensor]:
        occurrences_V = self.top1_VE.sum(1)
        seen_V = occurrences_V > 0
        if not seen_V.any():
            raise ValueError("no tokens were counted; update the metric with at least one token.")
        top_V = self.top1_VE.max(1).values
        return {
            "token_specialization": (top_V[seen_V] / occurrences_V[seen_V]).mean(),
            "token_specialization_weighted": top_V.sum() / occurrences_V.sum(),
        }
