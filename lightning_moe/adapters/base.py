"""``Tap``: the forward hooks that turn one MoE module's routing into :class:`RoutingEvent` s.

Legend: T tokens, K slots per token, E experts, F expert width, D layer input width.

A tap never changes what the model computes: its hooks only keep references to tensors the model already made
(plus, for some backends, one softmax over the router logits), so attaching one costs a Python call per layer per
forward. Write a subclass for a model family we do not know and pass it to the monitors' ``adapters`` argument.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters.events import RoutingEvent

Sink = Callable[[RoutingEvent], None]
# Which input projection of an expert an activation norm is taken from: ``gate`` is the pre-activation gate
# projection (``w1`` / the first half of ``gate_up_proj``), ``up`` the linear branch of a GLU (``v1``).
Projection = Literal["gate", "up"]


class Tap:
    """A hook on one MoE module that emits a :class:`RoutingEvent` per forward.

    Subclasses implement :meth:`matches` (for automatic discovery), :attr:`num_experts` and :meth:`_register`;
    :meth:`router_weight_ED` and :meth:`expert_weight_EFD` are optional (geometry and coupling metrics need them).

    Args:
        name: the layer name events carry (the module path inside the model, for discovered taps).
        module: the MoE module to hook.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__}: module must be an nn.Module, got {type(module).__name__}.")
        self.name, self.module = name, module
        self._handles: list[RemovableHandle] = []

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this adapter understands ``module`` (used by :func:`~lightning_moe.adapters.find_taps`)."""
        return False

    @property
    def num_experts(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, sink: Sink, capture_inputs: bool = False) -> Tap:
        """Start sending this layer's events to ``sink``.

        Args:
            sink: called with each :class:`RoutingEvent`, inside the model's forward.
            capture_inputs: also hand over the layer input ``x_TD`` (a reference, no copy); only the router–expert
                coupling metric needs it.
        """
        if self._handles:
            raise ValueError(
                f"tap {self.name!r} is already attached; call remove() first, or create a second tap for a second sink."
            )
        self._handles = self._register(sink, capture_inputs)
        return self

    def _guarded(self, hook: Callable) -> Callable:
        """``hook`` that never breaks the host model's forward: if it cannot read the block (an unknown call
        convention, an unexpected output), the tap warns once, naming the block and its family, and removes
        itself; the model's forward continues untouched."""

        @functools.wraps(hook)
        def guarded(*args, **kwargs):
            if not self._handles:
                return None  # already removed in this same forward
            try:
                return hook(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - a guest never raises inside the host's forward
                self.remove()
                warnings.warn(
                    f"{type(self).__name__} cannot read MoE block {self.name!r} (family {type(self.module).__name__}): "
                    f"{type(err).__name__}: {err}. The tap removed itself and this layer reports no routing; write "
                    "a Tap subclass for this family and pass it in `adapters`.",
                    stacklevel=2,
                )
                return None

        return guarded

    def remove(self) -> None:
        """Remove the hooks; the model runs exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:  # pragma: no cover - abstract
        raise NotImplementedError

    def router_weight_ED(self) -> Tensor | None:
        """The router's expert rows (linear router weights, or centroids), or None when the router has none."""
        return None

    def expert_weight_EFD(self, projection: Projection) -> Tensor | None:
        """One input projection of every expert as ``[E, F, D]``, or None when the layout is unknown."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, num_experts={self.num_experts}, attached={self.attached})"


def find_rows_ED(module: nn.Module, num_experts: int, d_model: int) -> Tensor | None:
    """A router's expert rows: ``module.layer.weight`` (the linear-router convention of MegaBlocks and ours), else
    the first parameter or persistent buffer shaped ``[E, D]`` (e.g. K-Means centroids). Non-persistent buffers
    are per-step accumulators, not rows, so they are skipped (``state_dict`` leaves them out)."""
    layer = getattr(module, "layer", None)
    if isinstance(layer, nn.Linear) and layer.weight.shape == (num_experts, d_model):
        return layer.weight
    return next((t for t in module.state_dict(keep_vars=True).values() if t.shape == (num_experts, d_model)), None)
