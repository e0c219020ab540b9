"""Tap for MegaBlocks ``MoE`` / ``dMoE`` layers through their router seam.

Legend: S sequence, B batch, T tokens, K slots, E experts, F expert width, H hidden size.

MegaBlocks calls ``scores_TE, weights_TK, experts_TK = self.router(x)`` (any module returning that triple works),
so a forward hook on ``moe.router`` sees exactly what the layer routes. MegaBlocks cannot be imported without its
CUDA extension, so this module never imports it: discovery only recognises MegaBlocks classes when the user has
already imported them (``sys.modules``), and :class:`MegaBlocksTap` works on any module with that seam.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters.base import Projection, Sink, Tap
from lightning_moe.adapters.events import RoutingEvent

MEGABLOCKS_MOE_MODULE = "megablocks.layers.moe"


class MegaBlocksTap(Tap):
    """Routing events from a MegaBlocks ``MoE``/``dMoE`` (or any module whose ``router`` returns
    ``(scores_TE, weights_TK, experts_TK)``).

    Args:
        name: layer name carried by the events.
        module: the MegaBlocks layer.
        sequence_first: MegaBlocks follows Megatron's ``[S, B, H]`` layout, so its token order is
            sequence-major; the tap reorders events to our batch-major token order (``[B, S]`` flattened) so they
            line up with per-token labels. Set False when your model feeds the layer ``[B, S, H]``.
    """

    def __init__(self, name: str, module: nn.Module, sequence_first: bool = True) -> None:
        if not isinstance(getattr(module, "router", None), nn.Module):
            raise TypeError(
                f"MegaBlocksTap needs a module with a `router` submodule returning (scores, weights, indices), "
                f"got {type(module).__name__}."
            )
        super().__init__(name, module)
        self.sequence_first = sequence_first
        E = getattr(getattr(module, "args", None), "moe_num_experts", None)
        self._num_experts = int(E) if E is not None else int(module.router.layer.out_features)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        moe_base = getattr(sys.modules.get(MEGABLOCKS_MOE_MODULE), "MoE", None)
        return isinstance(moe_base, type) and isinstance(module, moe_base)

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def _batch_major(self, t: Tensor, shape: torch.Size) -> Tensor:
        if not self.sequence_first or len(shape) != 3:
            return t
        S, B = shape[0], shape[1]
        return t.reshape(S, B, -1).transpose(0, 1).reshape(S * B, -1)

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        def hook(router: nn.Module, args: tuple, output: tuple) -> None:
            x = args[0]
            scores, weights, experts = output
            # MegaBlocks squeezes the slot dimension when top_k == 1.
            experts_TK = experts.reshape(scores.shape[0], -1).long()
            x_TD = self._batch_major(x.detach().reshape(-1, x.shape[-1]), x.shape) if capture_inputs else None
            sink(RoutingEvent(
                self.name,
                self._batch_major(experts_TK, x.shape),
                self._batch_major(weights.reshape(experts_TK.shape), x.shape),
                self._batch_major(scores, x.shape),
                x_TD=x_TD,
            ))

        return [self.module.router.register_forward_hook(hook)]

    def router_weight_ED(self) -> Tensor | None:
        layer = getattr(self.module.router, "layer", None)
        return layer.weight if isinstance(layer, nn.Linear) else None

    def expert_weight_EFD(self, projection: Projection) -> Tensor | None:
        mlp = getattr(getattr(self.module, "experts", None), "mlp", None)
        w1 = getattr(mlp, "w1", None)
        if not isinstance(w1, Tensor) or w1.dim() != 2 or w1.shape[0] % self.num_experts:
            return None  # only the grouped dMoE layout ``[E*F, H]`` is known
        v1 = getattr(mlp, "v1", None)
        w = v1 if projection == "up" and isinstance(v1, Tensor) else w1
        return w.view(self.num_experts, -1, w.shape[1])

