"""Oracle routing: every token goes to an expert chosen outside the model (e.g. from its task label).

Legend: B batch, S sequence, T = B*S tokens, E experts, K = 1 slot.

Used by the task-routing capacity sweep (arXiv 2606.14398, Thm 4.2): with the router fixed to "task k -> expert
e(k)", expert k sees only task k, so the width it needs can be measured apart from learning to route.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.gating import Router, Routing


class OracleRouter(Router):
    """Top-1 routing read from :meth:`assign`, with weight 1 and one-hot scores; no parameters, no aux loss.

    The assignment is an *input* of the next forward, like the tokens: call ``assign(experts_BS)`` before each
    forward (the :class:`~lightning_moe.studies.task_routing.module.TaskRoutingLM` does it from the batch's task
    labels). A forward without a matching assignment raises rather than silently routing to expert 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self._experts_BS: Tensor | None = None

    def build(self) -> None:
        if self.top_k != 1:
            raise ValueError(f"OracleRouter routes each token to one expert; set top_k: 1 (got {self.top_k}).")

    def assign(self, experts_BS: Tensor) -> None:
        """Expert id of each token of the next forward (int, in [0, E))."""
        if experts_BS.is_floating_point() or experts_BS.dim() != 2:
            raise TypeError(f"assign takes integer expert ids [batch, seq], got {experts_BS.dtype} "
                            f"{tuple(experts_BS.shape)}.")
        if experts_BS.numel() and (experts_BS.min() < 0 or experts_BS.max() >= self.num_experts):
            raise ValueError(f"assigned expert ids must lie in [0, {self.num_experts}), got "
                             f"[{int(experts_BS.min())}, {int(experts_BS.max())}].")
        self._experts_BS = experts_BS.long()

    def forward(self, x_BSD: Tensor) -> Routing:
        if self._experts_BS is None or self._experts_BS.shape != x_BSD.shape[:2]:
            got = None if self._experts_BS is None else tuple(self._experts_BS.shape)
            raise ValueError(f"OracleRouter needs assign(experts_BS) of shape {tuple(x_BSD.shape[:2])} before the "
                             f"forward, got {got}.")
        experts_TK = self._experts_BS.reshape(-1, 1).to(x_BSD.device)
        scores_TE = torch.nn.functional.one_hot(experts_TK[:, 0], self.num_experts).float()
        return Routing(experts_TK, torch.ones_like(experts_TK, dtype=x_BSD.dtype), scores_TE)
