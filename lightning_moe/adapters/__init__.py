"""Adapters: forward-hook taps that turn any model's MoE routing into :class:`RoutingEvent` s.

``find_taps`` / ``attach_taps`` pick the right adapter per module type: our :class:`MoELayer`, Hugging Face
transformers MoE blocks (sparse-MoE blocks, capacity routers, JetMoE's gates), MegaBlocks ``MoE``/``dMoE``, and
routers a model calls itself. Subclass :class:`Tap` for anything else.
"""

from lightning_moe.adapters.base import Projection, Tap
from lightning_moe.adapters.discovery import DEFAULT_ADAPTERS, attach_taps, find_taps, record_routing
from lightning_moe.adapters.events import RoutingEvent
from lightning_moe.adapters.huggingface import (
    UNREADABLE_FAMILIES,
    HuggingFaceCapacityTap,
    HuggingFaceGatingTap,
    HuggingFaceMoeTap,
)
from lightning_moe.adapters.megablocks import MegaBlocksTap
from lightning_moe.adapters.native import MoELayerTap, RouterTap

__all__ = [
    "DEFAULT_ADAPTERS",
    "HuggingFaceCapacityTap",
    "HuggingFaceGatingTap",
    "HuggingFaceMoeTap",
    "MegaBlocksTap",
    "MoELayerTap",
    "Projection",
    "RouterTap",
    "RoutingEvent",
    "Tap",
    "UNREADABLE_FAMILIES",
    "attach_taps",
    "find_taps",
    "record_routing",
]
