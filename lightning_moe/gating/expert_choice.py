"""Expert-choice routing (Zhou et al. 2022; baselines spec §4.7): each expert picks its top tokens.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K slots per token (K = E here),
G groups of n tokens, k tokens per expert per group.

Representation: a token may get 0, 1 or many experts, but :class:`Routing` is a fixed ``[T, K]``. We use
``K = E`` slots, slot ``e`` of every token being expert ``e``; the weight is the gate value where expert ``e``
chose the token and exactly 0 elsewhere, and ``Routing.mask_TK`` marks the real assignments. Every backend
computes this correctly as it stands (a zero-weight slot adds ``0 * FFN_e(x)``, and no gradient reaches the
unchosen scores), and the shape does not depend on the data. The price: the experts backend runs all E experts
on every token, ``E / c`` times the FLOPs of the routed assignments. That is fine for the small ablations this
router is for; count loads with ``Routing.expert_counts`` (it honours the mask).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_moe.gating.base import Router, Routing
from lightning_moe.utils import check_choice, check_positive

Grouping = Literal["sequence", "position"]
GROUPINGS: tuple[str, ...] = ("sequence", "position")


class ExpertChoice(Router):
    """Softmax token-expert scores ``S = softmax(X W)``; in each group of n tokens every expert takes the k
    tokens with its highest scores, ``k = n * c / E`` (rounded, at least 1, at most n), weighted by their score.
    Perfect balance by construction, no aux loss. The layer's ``top_k`` is not used: ``c`` sets the compute.

    Args:
        capacity_factor: ``c``, the average number of experts per token (2 in the paper's EC-CF2 runs).
        group: which tokens compete for an expert. ``sequence``: the S tokens of one sequence (the paper's
            setting; a token's routing then depends on later tokens, so it is not causal). ``position``: the B
            tokens at the same position across the batch, which never looks ahead in time (but routes a token
            by its batch neighbours, and at batch size 1 sends every token to every expert).
        allow_non_causal: permit ``group='sequence'`` inside a causal model (``causal`` set by the model, as
            :class:`lightning_moe.models.MoETransformer` does), for a deliberate non-causal ablation.
    """

    def __init__(
        self, capacity_factor: float = 2.0, group: Grouping = "sequence", allow_non_causal: bool = False
    ) -> None:
        super().__init__()
        check_positive("capacity_factor", capacity_factor)
        check_choice("group", group, GROUPINGS)
        self.capacity_factor = capacity_factor
        self.group = group
        self.allow_non_causal = allow_non_causal

    def build(self) -> None:
        self.check_causality()
        self.layer = nn.Linear(self.d_model, self.num_experts, bias=False)
        nn.init.normal_(self.layer.weight, std=self.d_model**-0.5)

    def check_causality(self) -> None:
        if self.causal and self.group == "sequence" and not self.allow_non_causal:
            raise ValueError(
                "ExpertChoice(group='sequence') lets each expert pick tokens across the whole sequence, so a "
                "token's routing depends on later tokens; it cannot run in a causal model. Use group='position', "
                "or set allow_non_causal=True for a deliberate non-causal ablation."
            )

    def tokens_per_expert(self, group_size: int) -> int:
        """``k`` for a group of ``group_size`` tokens."""
        return max(1, min(group_size, round(group_size * self.capacity_factor / self.num_experts)))

    def forward(self, x_BSD: Tensor) -> Routing:
        self.check_causality()  # ``causal`` may have been set after binding
        B, S, D = x_BSD.shape
        E = self.num_experts
        logits_BSE = self.layer(x_BSD).float()
        scores_BSE = torch.softmax(logits_BSE, dim=-1)
        scores_GnE = scores_BSE if self.group == "sequence" else scores_BSE.transpose(0, 1)
        k = self.tokens_per_expert(scores_GnE.shape[1])
        gates_GkE, tokens_GkE = torch.topk(scores_GnE, k, dim=1)
        weights_GnE = torch.zeros_like(scores_GnE).scatter(1, tokens_GkE, gates_GkE)
        chosen_GnE = torch.zeros_like(scores_GnE, dtype=torch.bool).scatter(1, tokens_GkE, True)
        if self.group == "position":
            weights_GnE, chosen_GnE = weights_GnE.transpose(0, 1), chosen_GnE.transpose(0, 1)
        T = B * S
        experts_TK = torch.arange(E, device=x_BSD.device).expand(T, E).contiguous()
        return Routing(
            experts_TK, weights_GnE.reshape(T, E), scores_BSE.reshape(T, E), logits_BSE.reshape(T, E),
            mask_TK=chosen_GnE.reshape(T, E),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}, group={self.group!r}"
