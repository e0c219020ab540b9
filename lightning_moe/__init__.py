"""lightning-moe: Mixture-of-Experts layers, routers, metrics and recipes for PyTorch Lightning."""

from lightning_moe.experts import Experts
from lightning_moe.gating import Router, Routing, SoftmaxTopK
from lightning_moe.layers import MoELayer, update_router_states

__version__ = "0.1.0"

__all__ = ["Experts", "MoELayer", "Router", "Routing", "SoftmaxTopK", "update_router_states", "__version__"]
