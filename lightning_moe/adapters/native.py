"""Tap for lightning-moe's own :class:`~lightning_moe.layers.MoELayer`.

Legend: T tokens, K slots, E experts, F expert width, D model width.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters.base import Projection, Sink, Tap, find_rows_ED
from lightning_moe.adapters.events import RoutingEvent
from lightning_moe.layers import MoELayer


class MoELayerTap(Tap):
    """Reads ``MoELayer.routing`` (which the layer stores on every forward) from a forward hook.

    Args:
        name: layer name carried by the events.
        module: the :class:`MoELayer`.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, MoELayer):
            raise TypeError(f"MoELayerTap needs a lightning_moe MoELayer, got {type(module).__name__}.")
        super().__init__(name, module)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, MoELayer)

    @property
    def num_experts(self) -> int:
        return self.module.experts.num_experts

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        d_model = self.module.d_model

        def hook(layer: MoELayer, args: tuple, output: Tensor) -> None:
            r = layer.routing
            x_TD = args[0].detach().reshape(-1, d_model) if capture_inputs else None
            sink(RoutingEvent(self.name, r.experts_TK, r.weights_TK, r.scores_TE, mask_TK=r.mask_TK, x_TD=x_TD))

        return [self.module.register_forward_hook(hook)]

    def router_weight_ED(self) -> Tensor | None:
        w = find_rows_ED(self.module.router, self.num_experts, self.module.d_model)
        # Under FSDP2 the weight is a shard between steps: gather it (a collective; monitors read it on every rank).
        return w.full_tensor() if hasattr(w, "full_tensor") else w

    def expert_weight_EFD(self, projection: Projection) -> Tensor:
        mlp = self.module.experts.mlp
        # A GELU expert has one input projection, so ``up`` and ``gate`` are both w1 there.
        return mlp.per_expert("v1" if projection == "up" and mlp.v1 is not None else "w1")
