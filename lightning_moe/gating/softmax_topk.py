"""Softmax top-k token-choice router (Switch top-1, GShard/Mixtral top-2, any top-k).

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K selected slots.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.gating.base import Router, Routing
from lightning_moe.gating.losses import router_z_loss, switch_load_balancing_loss
from lightning_moe.utils import check_non_negative


class SoftmaxTopK(Router):
    """Linear gate, softmax in fp32, top-k selection.

    The classic token-choice routers are configurations of this one class (K is the layer's ``top_k``):
    Switch Transformer = K=1 with ``load_balancing_weight=0.01`` (plus ``jitter=0.01`` for its input noise);
    GShard-style top-2 = K=2, ``normalize_weights=True`` and the load-balancing loss (dropless: no capacity and
    no random second-expert dispatch); Mixtral = K=2 renormalised; ST-MoE adds ``z_loss_weight=0.001``.

    Args:
        normalize_weights: renormalise the K selected probabilities to sum to 1 (Mixtral); otherwise the raw
            probabilities mix the experts (Switch, K=1).
        jitter: multiplicative input noise ``x * U(1-jitter, 1+jitter)`` during training (Switch §2.4); 0 = off.
        load_balancing_weight: weight of the Switch load-balancing loss (1.0 at uniform routing, so the weighted
            loss equals this weight at balance); 0 = off.
        z_loss_weight: weight of the ST-MoE router z-loss; 0 = off.
        frozen: keep the random initial gate fixed (its weight gets no gradient) while the experts learn: the
            random-router floor of routing studies (what expert specialisation or router-expert coupling arises
            without a learned router).
    """

    def __init__(
        self,
        normalize_weights: bool = True,
        jitter: float = 0.0,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        check_non_negative("jitter", jitter)
        check_non_negative("load_balancing_weight", load_balancing_weight)
        check_non_negative("z_loss_weight", z_loss_weight)
        self.normalize_weights = normalize_weights
        self.jitter = jitter
        self.load_balancing_weight = load_balancing_weight
        self.z_loss_weight = z_loss_weight
        self.frozen = frozen

    def build(self) -> None:
        # Named ``layer`` like MegaBlocks' LearnedRouter so ``router.layer.weight [E, D]`` moves between backends.
        self.layer = nn.Linear(self.d_model, self.num_experts, bias=False)
        nn.init.normal_(self.layer.weight, std=self.d_model**-0.5)
        self.layer.weight.requires_grad_(not self.frozen)

    def logits(self, x_TD: Tensor) -> Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return self.layer(x_TD)

    def forward(self, x_BSD: Tensor) -> Routing:
        return self.route(self.logits(x_BSD.reshape(-1, x_BSD.shape[-1])))

    def route(self, logits_TE: Tensor, extra_losses: dict[str, Tensor] | None = None) -> Routing:
        """Softmax, top-k and the configured aux losses (plus ``extra_losses``) for already-computed logits;
        routers that only change how the logits are made (:class:`TransitionRouter`) reuse this."""
        # Softmax in fp32: in bf16 the probabilities of a 64-expert router lose most of their mantissa.
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, experts_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        if self.normalize_weights and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        losses = self.aux_losses(scores_TE, experts_TK, logits_TE)
        losses.update(extra_losses or {})
        return Routing(experts_TK, weights_TK, scores_TE, logits_TE, losses)

    def aux_losses(self, scores_TE: Tensor, experts_TK: Tensor, logits_TE: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.load_balancing_weight > 0:
            losses["load_balancing"] = self.load_balancing_weight * switch_load_balancing_loss(scores_TE, experts_TK)
        if self.z_loss_weight > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        return losses
