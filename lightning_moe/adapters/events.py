"""``RoutingEvent``: what one MoE layer decided for one forward pass, in a form every monitor understands.

Legend: T tokens (flattened batch*sequence, row-major), K selected slots per token, E experts, D layer input width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RoutingEvent:
    """One layer's routing for one forward pass, produced by a :class:`~lightning_moe.adapters.Tap`.

    Tensors are references to what the model computed (no copies); consumers must not modify them.

    Attributes:
        layer: module path of the MoE layer inside the tapped model (``model.blocks.0.ffn``).
        experts_TK: int64 expert id of each token's K slots.
        weights_TK: mixing weight of each slot.
        scores_TE: the router's per-expert scores (softmax probabilities for softmax routers), if known.
        mask_T: bool, True for tokens that count (padding is False); None = every token counts.
        mask_TK: bool, which slots are real assignments, for routers whose number of experts per token varies
            (expert choice pads to K = E slots with weight 0); None = every slot is one.
        x_TD: the layer's input tokens, only when the tap was attached with ``capture_inputs=True``.
        skipped_TK: bool, slots the router sent to a skip / zero-computation expert (ZAYA's skip class,
            LongCat-Flash's identity experts): no real expert computes them, so they are False in ``mask_TK``,
            their ``experts_TK`` entry is a placeholder 0, and they are counted here instead; None = no such slot.
        dropped_TK: bool, slots a capacity router chose but dropped because the expert was full (Switch
            Transformers, NLLB-MoE): ``experts_TK`` keeps the chosen expert, ``mask_TK`` is False; None = no drops.
    """

    layer: str
    experts_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor | None = None
    mask_T: Tensor | None = None
    mask_TK: Tensor | None = None
    x_TD: Tensor | None = None
    skipped_TK: Tensor | None = None
    dropped_TK: Tensor | None = None
    # Derived tensors, computed once for every monitor that asks (an event is read by several).
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.experts_TK.shape[0]

    def kept_TK(self, token_mask_T: Tensor | None = None) -> Tensor | None:
        """Which (token, slot) pairs count: real slots of tokens in ``mask_T`` and ``token_mask_T``; None = all."""
        keep_TK = self.mask_TK
        for m in (self.mask_T, token_mask_T):
            if m is not None:
                m_TK = m.reshape(-1, 1).expand_as(self.experts_TK)
                keep_TK = m_TK if keep_TK is None else keep_TK & m_TK
        return keep_TK

    def kept_T(self, token_mask_T: Tensor | None = None) -> Tensor | None:
        """Which tokens count: those with at least one counted slot (see :meth:`kept_TK`); None = all."""
        keep_TK = self.kept_TK(token_mask_T)
        return None if keep_TK is None else keep_TK.any(dim=1)

    def routing_mass_TE(self, num_experts: int) -> Tensor:
        """Each token's routing distribution over experts, in fp32, summing to 1 per token.

        From ``scores_TE`` when present (renormalised, so sigmoid routers' scores become a distribution, as
        OLMo-core does before its balance loss; baselines §4.3); otherwise the slot weights scattered onto their
        experts and renormalised.
        """
        key = ("mass", num_experts)
        if key not in self._derived:
            self._derived[key] = self._routing_mass_TE(num_experts)
        return self._derived[key]

    def _routing_mass_TE(self, num_experts: int) -> Tensor:
        if self.scores_TE is not None:
            # clamp: cosine scores (K-Means) can be negative; a token whose scores sum below zero would otherwise
            # get a mass of ±1e38 from the clamped denominator. Softmax and sigmoid scores are unchanged.
            mass_TE = self.scores_TE.detach().float().clamp_min(0)
        else:
            mass_TE = torch.zeros(self.num_tokens, num_experts, device=self.weights_TK.device)
            mass_TE.scatter_add_(1, self.experts_TK, self.weights_TK.detach().float())
        # clamp: a token whose scores are all zero keeps zero mass instead of NaN.
        return mass_TE / mass_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def top1_experts_T(self) -> Tensor:
        """Each token's highest-weight expert (slot order is not trusted: not every router sorts its slots)."""
        if self.experts_TK.shape[1] == 1:
            return self.experts_TK[:, 0]
        return self.experts_TK.gather(1, self.weights_TK.detach().argmax(dim=1, keepdim=True)).squeeze(1)
