"""Find the MoE layers of any model and tap them with the right adapter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lightning_moe.adapters.base import Sink, Tap
from lightning_moe.adapters.events import RoutingEvent
from lightning_moe.adapters.huggingface import HuggingFaceCapacityTap, HuggingFaceGatingTap, HuggingFaceMoeTap
from lightning_moe.adapters.megablocks import MegaBlocksTap
from lightning_moe.adapters.native import MoELayerTap, RouterTap

# Tried in order; the first whose ``matches`` accepts a module taps it (an MoELayer before the router inside it).
DEFAULT_ADAPTERS: tuple[type[Tap], ...] = (
    MoELayerTap, HuggingFaceMoeTap, HuggingFaceCapacityTap, HuggingFaceGatingTap, MegaBlocksTap, RouterTap
)


def find_taps(
    model: nn.Module, adapters: Sequence[type[Tap]] | None = None, layers: Sequence[str] | None = None
) -> list[Tap]:
    """Build (unattached) taps for every MoE layer of ``model``, in module order.

    A matched module's children are not searched, so one layer never yields two taps.

    Args:
        model: any module (a LightningModule, a Hugging Face model, ...).
        adapters: Tap classes to try, in order; default :data:`DEFAULT_ADAPTERS`. Put your own first to override.
        layers: keep only these layer names (module paths in ``model``); default all.
    """
    adapters = tuple(adapters) if adapters is not None else DEFAULT_ADAPTERS
    for adapter in adapters:
        if not (isinstance(adapter, type) and issubclass(adapter, Tap)):
            raise TypeError(f"adapters must be Tap subclasses, got {adapter!r}.")
    taps: list[Tap] = []
    inside: str | None = None  # module path of the last matched module: its children are skipped
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        adapter = next((a for a in adapters if a.matches(module)), None)
        if adapter is not None:
            taps.append(adapter(name or type(module).__name__, module))
            inside = name + "."
    if layers is not None:
        found = {t.name for t in taps}
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise ValueError(
                f"layers={list(layers)!r}: no MoE layer named {unknown!r}; the model's MoE layers are "
                f"{sorted(found)!r}."
            )
        taps = [t for t in taps if t.name in set(layers)]
    return taps


def attach_taps(
    model: nn.Module,
    sink: Sink,
    adapters: Sequence[type[Tap]] | None = None,
    layers: Sequence[str] | None = None,
    capture_inputs: bool = False,
) -> list[Tap]:
    """:func:`find_taps` and attach each tap to ``sink``; call ``tap.remove()`` on each to detach."""
    return [tap.attach(sink, capture_inputs) for tap in find_taps(model, adapters, layers)]


@contextmanager
def record_routing(
    model: nn.Module,
    adapters: Sequence[type[Tap]] | None = None,
    layers: Sequence[str] | None = None,
    capture_inputs: bool = False,
) -> Iterator[list[RoutingEvent]]:
    """Collect the routing events of every forward inside the ``with`` block (outside Lightning, e.g. analysis).

    >>> with record_routing(model) as events:  # doctest: +SKIP
    ...     model(tokens)
    """
    events: list[RoutingEvent] = []
    taps = attach_taps(model, events.append, adapters, layers, capture_inputs)
    try:
        yield events
    finally:
        for tap in taps:
            tap.remove()
