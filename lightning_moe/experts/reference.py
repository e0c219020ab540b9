"""A per-token reference of the experts computation, for tests: slow, obvious, no sorting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.experts.native import Experts, gelu
from lightning_moe.gating.base import Routing


def reference_experts(experts: Experts, x_TD: Tensor, routing: Routing) -> Tensor:
    """``y_t = sum_k w_tk * FFN_{e_tk}(x_t)``, one token and one slot at a time."""
    w1, w2 = experts.mlp.per_expert("w1"), experts.mlp.per_expert("w2")
    v1 = experts.mlp.per_expert("v1") if experts.mlp.v1 is not None else None
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for k in range(routing.experts_TK.shape[1]):
            e = int(routing.experts_TK[t, k])
            h = x_TD[t] @ w1[e].T
            h = F.silu(h) * (x_TD[t] @ v1[e].T) if v1 is not None else gelu(h)
            y = y + routing.weights_TK[t, k] * (h @ w2[e])
        rows.append(y)
    return torch.stack(rows)
