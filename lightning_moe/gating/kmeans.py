"""Online K-Means router (arXiv 2605.12476 §6; baselines spec §4.8): no trainable parameters.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K selected slots.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.gating.base import Routing, check_unit_interval
from lightning_moe.gating.loss_free import BiasBalancedRouter
from lightning_moe.utils import check_choice

Mixing = Literal["scores", "sigmoid"]
MIXINGS: tuple[str, ...] = ("scores", "sigmoid")


class KMeansRouter(BiasBalancedRouter):
    """Each expert keeps an EMA centroid ``c_i`` (buffer ``centroids_ED``) of the hidden states routed to it;
    tokens go to ``top-k(cos(c_i, x) + b_i)`` and the bias follows the sign rule ``b_i += gamma * sign(K/E - f_i)``.

    Once per optimizer step, with ``xbar_i`` the mean of the step's tokens routed to ``i`` (each token counted once
    per selected expert, summed over micro-batches and ranks): ``c_i <- alpha * c_i + (1 - alpha) * xbar_i`` for
    every expert that got a token; the others keep their centroid. Centroids start as random unit vectors and
    never receive a gradient, so nothing in the router is trained; the mixing weights still pass gradients to
    the layer input ``x``.

    Cosine scores can be negative, so with ``mixing='scores'`` an expert's output can enter with a flipped sign;
    ``negative_weight_fraction`` holds the share of selected weights < 0 in the last forward (a detached
    diagnostic for metrics; it does not affect routing).

    Args:
        ema_decay: ``alpha`` of the centroid EMA (0.99 in the paper); in [0, 1).
        bias_update_rate: sign-rule step ``gamma`` (1e-3 in the paper); 0 freezes the bias.
        mixing: how the selected experts are weighted. ``scores``: the selected cosine scores themselves
            (identity gating, without the bias); ``sigmoid``: ``sigmoid(x . c_i)`` of the selected experts,
            renormalised to sum 1 (the authors' other variant; never negative).
    """

    def __init__(self, ema_decay: float = 0.99, bias_update_rate: float = 1e-3, mixing: Mixing = "scores") -> None:
        super().__init__(bias_update_rate)
        check_unit_interval("ema_decay", ema_decay, include_zero=True)
        check_choice("mixing", mixing, MIXINGS)
        self.ema_decay = float(ema_decay)
        self.mixing = mixing
        self.negative_weight_fraction = torch.zeros(())

    def build(self) -> None:
        super().build()
        self.register_buffer("centroids_ED", F.normalize(torch.randn(self.num_experts, self.d_model), dim=-1))
        self.register_pending("pending_sums_ED", torch.zeros(self.num_experts, self.d_model))

    def forward(self, x_BSD: Tensor) -> Routing:
        # fp32, with autocast off too: cosines of nearby centroids differ by less than bf16 resolution.
        with torch.autocast(x_BSD.device.type, enabled=False):
            x_TD = x_BSD.reshape(-1, x_BSD.shape[-1]).float()
            centroids_ED = self.centroids_ED.float()
            scores_TE = F.normalize(x_TD, dim=-1) @ F.normalize(centroids_ED, dim=-1).T
            experts_TK = self.select(scores_TE)
            if self.mixing == "scores":
                weights_TK = scores_TE.gather(1, experts_TK)
            else:
                weights_TK = torch.sigmoid(x_TD @ centroids_ED.T).gather(1, experts_TK)
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        self.negative_weight_fraction = (weights_TK.detach() < 0).float().mean()
        return Routing(experts_TK, weights_TK, scores_TE)

    def observe(self, x_TD: Tensor, routing: Routing) -> None:
        super().observe(x_TD, routing)
        K = routing.experts_TK.shape[1]
        self.pending_sums_ED.index_add_(
            0, routing.experts_TK.reshape(-1), x_TD.float().repeat_interleave(K, dim=0).to(self.pending_sums_ED)
        )

    def apply_pending(self) -> None:
        counts_E = self.pending_counts_E.to(self.pending_sums_ED.dtype)
        mean_ED = self.pending_sums_ED / counts_E.clamp(min=1).unsqueeze(-1)
        updated_ED = self.ema_decay * self.centroids_ED + (1 - self.ema_decay) * mean_ED
        self.centroids_ED.copy_(torch.where((counts_E > 0).unsqueeze(-1), updated_ED, self.centroids_ED))
        super().apply_pending()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ema_decay={self.ema_decay}, mixing={self.mixing!r}"
