"""The routing contract shared by every gating strategy.

Shape legend (used across routing code):
    T tokens (flattened batch*sequence), E experts, K selected slots per token,
    B batch, S sequence, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    """What a router decided for one forward pass.

    Attributes:
        experts_TK: int64 expert id of each token's K slots.
        weights_TK: mixing weight of each slot (what multiplies the expert output).
        scores_TE: the router's per-expert scores (probabilities for softmax routers); what balance losses
            and metrics read.
        logits_TE: pre-normalisation logits, when the router has them (z-loss reads these).
        aux_losses: the router's auxiliary losses for this pass, already multiplied by their weights.
    """

    experts_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Base class of gating strategies.

    A router is built with its own hyper-parameters only; the MoE layer that owns it calls :meth:`bind` with the
    layer's dimensions, so a YAML ``class_path`` swap never repeats ``d_model`` or ``num_experts``.

    ``forward`` takes ``x_BSD`` (sequence structure matters for temporal routers) and returns a :class:`Routing`
    over the ``T = B*S`` flattened tokens. Stateful routers keep their state in buffers, collect statistics in
    :meth:`observe` during training and change state only in :meth:`update_state`, which runs once per optimizer
    step (see :func:`lightning_moe.layers.update_router_states`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.d_model = 0
        self.num_experts = 0
        self.top_k = 0

    @property
    def is_bound(self) -> bool:
        return self.num_experts > 0

    def bind(self, d_model: int, num_experts: int, top_k: int) -> None:
        """Give the router its layer's dimensions and build its parameters."""
        if self.is_bound:
            raise ValueError(
                f"{type(self).__name__} is already bound to a layer (d_model={self.d_model}, "
                f"num_experts={self.num_experts}); give each MoELayer its own router instance."
            )
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.build()

    def build(self) -> None:
        """Create parameters and buffers; ``d_model``, ``num_experts`` and ``top_k`` are set."""

    def forward(self, x_BSD: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, x_TD: Tensor, routing: Routing) -> None:
        """Accumulate statistics for the next :meth:`update_state` (training only, under no_grad)."""

    def update_state(self) -> None:
        """Apply the accumulated statistics once per optimizer step; all-reduce them first under DDP."""

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum tensors over data-parallel ranks in place, so replicas take identical state updates."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
