"""lightning-moe: Mixture-of-Experts layers, routers, metrics and recipes for PyTorch Lightning."""

from lightning_moe.experts import Experts
from lightning_moe.gating import ExpertChoice, KMeansRouter, Router, Routing, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import MoELayer, feed_back_errors, moe_layers, update_router_states

__version__ = "0.1.0"

__all__ = [
    "ExpertChoice",
    "Experts",
    "KMeansRouter",
    "MoELayer",
    "Router",
    "Routing",
    "SigmoidTopK",
    "SoftmaxTopK",
    "TransitionRouter",
    "__version__",
    "feed_back_errors",
    "moe_layers",
    "update_router_states",
]
