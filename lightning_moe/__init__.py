"""lightning-moe: Mixture-of-Experts layers, routers, metrics and recipes for PyTorch Lightning."""

# The adapters need nothing optional (they never import transformers or MegaBlocks), so importing them here is
# cheap and makes ``lightning_moe.adapters.record_routing`` work after a plain ``import lightning_moe``.
from lightning_moe import adapters
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
    "adapters",
    "feed_back_errors",
    "moe_layers",
    "update_router_states",
]
