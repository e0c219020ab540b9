"""Gating strategies (routers). Each returns a :class:`Routing`; choose one in YAML by ``class_path``."""

from lightning_moe.gating.base import Router, Routing, all_reduce_sum_, sign_rule_update_
from lightning_moe.gating.expert_choice import ExpertChoice
from lightning_moe.gating.kmeans import KMeansRouter
from lightning_moe.gating.loss_free import BiasBalancedRouter, SigmoidTopK
from lightning_moe.gating.losses import router_z_loss, sequence_balance_loss, switch_load_balancing_loss
from lightning_moe.gating.softmax_topk import SoftmaxTopK
from lightning_moe.gating.temporal import leaky_integrate
from lightning_moe.gating.transitions import MemoryRouting, TransitionRouter, label_frequency_error

__all__ = [
    "BiasBalancedRouter",
    "ExpertChoice",
    "KMeansRouter",
    "MemoryRouting",
    "Router",
    "Routing",
    "SigmoidTopK",
    "SoftmaxTopK",
    "TransitionRouter",
    "all_reduce_sum_",
    "label_frequency_error",
    "leaky_integrate",
    "router_z_loss",
    "sequence_balance_loss",
    "sign_rule_update_",
    "switch_load_balancing_loss",
]
