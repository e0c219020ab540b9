"""Gating strategies (routers). Each returns a :class:`Routing`; choose one in YAML by ``class_path``."""

from lightning_moe.gating.base import Router, Routing
from lightning_moe.gating.losses import router_z_loss, switch_load_balancing_loss
from lightning_moe.gating.softmax_topk import SoftmaxTopK

__all__ = ["Router", "Routing", "SoftmaxTopK", "router_z_loss", "switch_load_balancing_loss"]
