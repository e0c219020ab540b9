"""Routing around labelled domain switches (transitions spec §2, §4, §7.5).

Legend: B batch, S sequence, T = B*S tokens, E experts, C domain labels, W window, O = 2W+1 offsets,
N switches in a batch, X packed state columns.

A *switch* is a position s with label[s-1] != label[s] (both labels >= 0). Offset o is the position s+o
relative to it, counted only while it stays inside the outgoing run (o < 0) or the incoming run (o >= 0), so a
second switch nearby never leaks into the window. With labels aligned to the *input* tokens (our batches'
``domain_ids``), offset -1 is the reference's "transition step": the input is still the old domain and the
token to predict is the first of the new one (transitions.md §2, §4).

"Correct expert" of domain d follows the reference's ``identify_domain_experts`` (lm_experiment.py, §4):
the expert whose mean routing probability rises most on d's tokens, argmax_e(mean_d[e] − mean_{¬d}[e]), where
mean_{¬d} pools every other domain's tokens (with two domains this is exactly argmax(mean_B − mean_A)). It is
identified from all tokens seen by the metric, or fixed by the caller (toy tasks where the target is known).
At every offset the correct expert is the one of the *incoming* domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.metrics.common import check_ids, row_sums_RE
from lightning_moe.utils import check_non_negative, check_positive_int, count_ids

COVERAGE = 0.99


def experts_for_coverage(p: Tensor) -> Tensor:
    """The paper's "experts needed for 99% coverage", K = log(0.01) / log(1 − p) (transitions.md §2, §3.4): the
    independent draws from the gate needed to hit the correct expert with probability 0.99. As in
    lm_experiment.py, K = 1 when p >= 0.999 and 999 when p <= 0.001."""
    p = p.double()
    k = math.log(1 - COVERAGE) / torch.log1p(-p.clamp(0.001, 0.999))
    return torch.where(p >= 0.999, torch.ones_like(k), torch.where(p <= 0.001, torch.full_like(k, 999.0), k))


def mass_coverage_T(mass_TE: Tensor) -> Tensor:
    """Per token, the fewest experts whose routing mass sums to >= 99% (largest first)."""
    cum_TE = mass_TE.sort(dim=-1, descending=True).values.cumsum(-1)
    # 1e-6: a mass of exactly 0.99 on the first experts must count as covered despite fp32 rounding.
    return ((cum_TE < COVERAGE - 1e-6).sum(-1) + 1).clamp_max(mass_TE.shape[-1])


def check_transition_args(
    num_labels: int, window: int, correct_experts: Sequence[int] | None, num_experts: int | None = None
) -> None:
    """Validate the arguments shared by :class:`TransitionRouting` and its monitor (``num_experts=None``: the
    expert ids of ``correct_experts`` are checked later, once the layer is known)."""
    check_positive_int("num_labels", num_labels)
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an integer, got {type(window).__name__} {window!r}.")
    check_non_negative("window", window)
    if correct_experts is None:
        return
    bound = num_experts if num_experts is not None else float("inf")
    if len(correct_experts) != num_labels or not all(0 <= int(e) < bound for e in correct_experts):
        raise ValueError(
            f"correct_experts={list(correct_experts)!r} must give one expert id in [0, {bound}) per label "
            f"({num_labels} labels); or leave it None to identify them from the data."
        )


class SwitchWindows(NamedTuple):
    """The label-only part of a :class:`TransitionRouting` update, shared by every layer fed the same labels."""

    labels_T: Tensor  # flattened labels (negative = ignored)
    count_C: Tensor  # tokens per label
    b_N: Tensor  # sequence of each switch
    pos_NO: Tensor  # position of each (switch, offset), clamped into the sequence
    rows_NO: Tensor  # state row o*C + incoming label of each counted (switch, offset); -1 = not counted


def switch_windows(labels_BS: Tensor, num_labels: int, window: int) -> SwitchWindows:
    """Locate the switches of ``labels_BS`` ``[B, S]`` and the offsets -W..+W around each that count (module
    docstring)."""
    labels_BS = labels_BS.long()
    check_ids("label", labels_BS, num_labels, "raise num_labels or remap the labels")
    S, C, W = labels_BS.shape[1], num_labels, window
    labels_T = labels_BS.reshape(-1)
    count_C = count_ids(labels_T.masked_fill((labels_T < 0) | (labels_T >= C), C), C + 1)[:C]
    prev_BS1, next_BS1 = labels_BS[:, :-1], labels_BS[:, 1:]
    b_N, s_N = ((next_BS1 != prev_BS1) & (next_BS1 >= 0) & (prev_BS1 >= 0)).nonzero(as_tuple=True)
    s_N = s_N + 1  # first position of the incoming domain
    offsets_O = torch.arange(-W, W + 1, device=labels_BS.device)
    pos_NO = s_N[:, None] + offsets_O
    inside_NO = (pos_NO >= 0) & (pos_NO < S)
    pos_NO = pos_NO.clamp(0, S - 1)
    # Offset o counts while every label from the switch out to s+o is the outgoing (o < 0) or the incoming
    # (o >= 0) domain: in range, same label, and (cumulative product) no other switch in between.
    new_N = labels_BS[b_N, s_N]
    expect_NO = torch.where(offsets_O < 0, labels_BS[b_N, s_N - 1][:, None], new_N[:, None])
    same_NO = (labels_BS[b_N[:, None], pos_NO] == expect_NO) & inside_NO
    ok_NO = torch.cat([same_NO[:, :W].flip(1).cumprod(1).flip(1), same_NO[:, W:].cumprod(1)], dim=1).bool()
    rows_NO = ((offsets_O + W) * C + new_N[:, None]).masked_fill(~ok_NO, -1)
    return SwitchWindows(labels_T, count_C, b_N, pos_NO, rows_NO)


class TransitionRouting(Metric):
    """Routing mass on the correct expert at offsets −W..+W around labelled domain switches, for one layer.

    ``compute()`` returns, per offset (vectors of length O, index i = offset i − W):

    * ``p_correct``: mean routing probability on the incoming domain's correct expert (the soft quantity of
      routing_entropy.py);
    * ``acc_correct``: fraction of tokens whose argmax expert is the correct one (what the paper calls
      "probability mass", transitions.md §7.1 — report both);
    * ``k99``: :func:`experts_for_coverage` of ``p_correct`` (the paper's K);
    * ``coverage99``: mean over tokens of :func:`mass_coverage_T` (the experts a token really needs for 99%);

    plus ``count`` (tokens behind ``p_correct`` per offset, to pool offsets), ``mass_OE`` (mean routing
    distribution per offset, for plots), ``label_mass_CE`` (mean routing distribution of each label's tokens),
    ``correct_C`` (−1 for unseen domains) and ``offsets``. All states are sums, so DDP reduction is exact.

    Args:
        num_labels: number of domain labels C (labels in [0, C); negative = ignored).
        num_experts: number of experts E.
        window: W, offsets −W..+W around each switch.
        correct_experts: the correct expert of each label (length C), when known; default: identified from data.
    """

    full_state_update = False

    def __init__(
        self,
        num_labels: int,
        num_experts: int,
        window: int = 4,
        correct_experts: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_transition_args(num_labels, window, correct_experts, num_experts)
        self.num_labels, self.num_experts, self.window = num_labels, num_experts, window
        self.correct_experts = list(correct_experts) if correct_experts is not None else None
        C, E, O = num_labels, num_experts, 2 * window + 1
        # Packed so each update is one scatter per state: per label [mass over E | token count]; per (offset,
        # incoming label) [mass over E | argmax counts over E | token count | summed 99%-coverage].
        self.add_state("label_CX", default=torch.zeros(C, E + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("window_OCX", default=torch.zeros(O, C, 2 * E + 2, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels_BS: Tensor, mass_TE: Tensor, windows: SwitchWindows | None = None) -> None:
        """Args: per-token domain labels ``[B, S]``, each token's routing distribution ``[B*S, E]``, and
        optionally ``switch_windows(labels_BS, num_labels, window)`` when the caller feeds several layers the same
        labels (it depends on the labels only)."""
        if labels_BS.dim() != 2 or mass_TE.shape != (labels_BS.numel(), self.num_experts):
            raise ValueError(
                f"labels must be [batch, seq] and routing mass [batch*seq, num_experts={self.num_experts}], got "
                f"{tuple(labels_BS.shape)} and {tuple(mass_TE.shape)}."
            )
        if windows is None:
            windows = switch_windows(labels_BS, self.num_labels, self.window)
        B, S = labels_BS.shape
        C, E, W = self.num_labels, self.num_experts, self.window
        mass_TE = mass_TE.detach().float()
        self.label_CX[:, :E] += row_sums_RE(windows.labels_T, mass_TE, C)
        self.label_CX[:, E] += windows.count_C
        if windows.b_N.numel() == 0:
            return
        m_NOE = mass_TE.reshape(B, S, E)[windows.b_N[:, None], windows.pos_NO]
        top1_NOE = torch.zeros_like(m_NOE).scatter_(2, m_NOE.argmax(-1, keepdim=True), 1.0)
        coverage_NO1 = mass_coverage_T(m_NOE).unsqueeze(-1).float()
        values_NOX = torch.cat([m_NOE, top1_NOE, torch.ones_like(coverage_NO1), coverage_NO1], dim=2)
        self.window_OCX += row_sums_RE(windows.rows_NO, values_NOX, (2 * W + 1) * C).view(self.window_OCX.shape)

    def correct_experts_C(self) -> Tensor:
        """The correct expert of each label (−1 for labels never seen), see the module docstring."""
        E = self.num_experts
        mass_CE, n_C = self.label_CX[:, :E], self.label_CX[:, E]
        if self.correct_experts is not None:
            return torch.tensor(self.correct_experts, dtype=torch.long, device=mass_CE.device)
        mean_CE = mass_CE / n_C.clamp_min(1)[:, None]
        rest_n_C = n_C.sum() - n_C
        # With a single domain seen there is no contrast: its correct expert is its most probable one.
        rest_CE = (mass_CE.sum(0) - mass_CE) / rest_n_C.clamp_min(1)[:, None]
        correct_C = (mean_CE - rest_CE).argmax(1)
        return torch.where(n_C > 0, correct_C, -1)

    def compute(self) -> dict[str, Tensor]:
        E = self.num_experts
        X = self.window_OCX
        mass_OCE, top1_OCE, n_OC, coverage_OC = X[..., :E], X[..., E : 2 * E], X[..., 2 * E], X[..., 2 * E + 1]
        correct_C = self.correct_experts_C()
        labels = torch.nonzero(correct_C >= 0).squeeze(1)

        def on_correct(t_OCE: Tensor) -> Tensor:  # summed over labels, each at its own correct expert
            return t_OCE[:, labels, correct_C[labels]].sum(1)

        n_O = n_OC[:, labels].sum(1)
        p_O = on_correct(mass_OCE) / n_O  # NaN at offsets that no switch reached
        all_n_O = n_OC.sum(1)
        return {
            "p_correct": p_O,
            "acc_correct": on_correct(top1_OCE) / n_O,
            "k99": experts_for_coverage(p_O),
            "coverage99": coverage_OC.sum(1) / all_n_O,
            "count": n_O,
            "mass_OE": mass_OCE.sum(1) / all_n_O[:, None],
            "label_mass_CE": self.label_CX[:, :E] / self.label_CX[:, E:],  # NaN rows for unseen labels
            "correct_C": correct_C,
            "offsets": torch.arange(-self.window, self.window + 1),
        }
