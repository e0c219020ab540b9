"""Auxiliary-loss-free balancing (baselines spec §4.5-4.6): a per-expert bias used only to *select* experts,
moved by the sign rule once per optimizer step; and the DeepSeek-V3 sigmoid router built on it.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K selected slots.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.gating.base import Router, Routing, sign_rule_update_
from lightning_moe.gating.losses import sequence_balance_loss
from lightning_moe.utils import check_non_negative, check_positive


class BiasBalancedRouter(Router):
    """Base of routers that pick ``top-k(scores + expert_bias)`` and balance load with the sign rule.

    The bias (buffer ``expert_bias [E]``) never enters the mixing weights and receives no gradient: after each
    optimizer step ``b_i += rate * sign(mean(c) - c_i)``, where ``c_i`` counts the (token, slot) assignments of
    expert ``i`` summed over the step's micro-batches and all ranks.

    Args:
        bias_update_rate: the sign-rule step ``u`` (``gamma``); 0 freezes the bias.
    """

    def __init__(self, bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        check_non_negative("bias_update_rate", bias_update_rate)
        self.bias_update_rate = bias_update_rate

    def build(self) -> None:
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        # int64 counts: exact at any batch size, and untouched when the module is cast to bf16.
        self.register_pending("pending_counts_E", torch.zeros(self.num_experts, dtype=torch.int64))

    def select(self, scores_TE: Tensor) -> Tensor:
        """``experts_TK`` = top-k of the biased scores; selection is not differentiable, so no graph is kept."""
        with torch.no_grad():
            return torch.topk(scores_TE + self.expert_bias.to(scores_TE.dtype), self.top_k, dim=-1).indices

    def observe(self, x_TD: Tensor, routing: Routing) -> None:
        self.pending_counts_E += routing.expert_counts(self.num_experts)

    def apply_pending(self) -> None:
        sign_rule_update_(self.expert_bias, self.pending_counts_E, self.bias_update_rate)


class SigmoidTopK(BiasBalancedRouter):
    """DeepSeek-V3 routing: sigmoid affinities, bias-shifted top-k selection, unbiased renormalised weights.

    ``s = sigmoid(W x)``; experts = ``top-k(s + b)``; weights = the selected ``s`` divided by their sum, times
    ``route_scale``. Balancing comes from the bias (see :class:`BiasBalancedRouter`), optionally helped by the
    sequence-wise balance loss ``alpha * sum_i f_i P_i`` per sequence, averaged over the batch
    (:func:`lightning_moe.gating.losses.sequence_balance_loss`, aux-loss key ``sequence_balance``).

    Args:
        bias_update_rate: the sign-rule step ``u`` (1e-3 in Wang et al. 2024 and DeepSeek-V3); 0 freezes the bias.
        sequence_balance_weight: ``alpha`` of the sequence-wise balance loss (DeepSeek-V3 uses 1e-4); 0 = off.
        normalize_weights: divide the K selected scores by their sum (DeepSeek-V3; skipped for K = 1, where it
            would cut the gate's gradient); otherwise the raw sigmoid scores mix the experts.
        route_scale: constant factor on the mixing weights (DeepSeek-V3's 671B model uses 2.5).
    """

    def __init__(
        self,
        bias_update_rate: float = 1e-3,
        sequence_balance_weight: float = 0.0,
        normalize_weights: bool = True,
        route_scale: float = 1.0,
    ) -> None:
        super().__init__(bias_update_rate)
        check_non_negative("sequence_balance_weight", sequence_balance_weight)
        check_positive("route_scale", route_scale)
        self.sequence_balance_weight = sequence_balance_weight
        self.normalize_weights = normalize_weights
        self.route_scale = route_scale

    def build(self) -> None:
        super().build()
        # Named ``layer`` like MegaBlocks' LearnedRouter so ``router.layer.weight [E, D]`` moves between backends.
        self.layer = nn.Linear(self.d_model, self.num_experts, bias=False)
        nn.init.normal_(self.layer.weight, std=self.d_model**-0.5)

    def forward(self, x_BSD: Tensor) -> Routing:
        B, S, D = x_BSD.shape
        logits_TE = self.layer(x_BSD.reshape(-1, D))
        # Sigmoid in fp32, like the softmax router: the selection compares scores that differ by ~u = 1e-3.
        scores_TE = torch.sigmoid(logits_TE.float())
        experts_TK = self.select(scores_TE)
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.normalize_weights and self.top_k > 1:
            # Not for K = 1: the weight would be exactly 1 and the gate would get no gradient at all.
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * self.route_scale
        losses: dict[str, Tensor] = {}
        if self.sequence_balance_weight > 0:
            losses["sequence_balance"] = self.sequence_balance_weight * sequence_balance_loss(
                scores_TE.view(B, S, -1), experts_TK.view(B, S, -1)
            )
        return Routing(experts_TK, weights_TK, scores_TE, logits_TE, losses)
