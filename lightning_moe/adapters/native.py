"""Taps for lightning-moe's own :class:`~lightning_moe.layers.MoELayer` and for a
:class:`~lightning_moe.gating.Router` that a model calls itself (a router-only or dense-mixture model).

Legend: T tokens, K slots, E experts, F expert width, D model width.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters.base import Projection, Sink, Tap, find_rows_ED
from lightning_moe.adapters.events import RoutingEvent
from lightning_moe.gating.base import Router, Routing
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


class RouterTap(Tap):
    """Reads the :class:`~lightning_moe.gating.Routing` a lightning-moe router returns, from a forward hook on the
    router itself: for models that call a router outside an :class:`MoELayer` (whose tap already covers its own
    router, so discovery never taps a router twice). The event has one token per routed input position.

    Args:
        name: layer name carried by the events.
        module: the bound :class:`Router`.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, Router):
            raise TypeError(f"RouterTap needs a lightning_moe Router, got {type(module).__name__}.")
        super().__init__(name, module)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, Router) and module.is_bound

    @property
    def num_experts(self) -> int:
        return self.module.num_experts

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        def hook(router: Router, args: tuple, r: Routing) -> None:
            x_TD = args[0].detach().reshape(-1, router.d_model) if capture_inputs else None
            sink(RoutingEvent(self.name, r.experts_TK, r.weights_TK, r.scores_TE, mask_TK=r.mask_TK, x_TD=x_TD))

        return [self.module.register_forward_hook(self._guarded(hook))]

    def router_weight_ED(self) -> Tensor | None:
        return find_rows_ED(self.module, self.num_experts, self.module.d_model)
