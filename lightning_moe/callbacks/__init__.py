"""Lightning callbacks: routing monitors built on :mod:`lightning_moe.metrics`, router-state updates at the
optimizer step, and result tables.

The monitors work on any model whose MoE layers an adapter recognises (:mod:`lightning_moe.adapters`).
"""

from lightning_moe.callbacks.alarms import ALARMS, RoutingAlarms
from lightning_moe.callbacks.consistency import RoutingConsistencyMonitor
from lightning_moe.callbacks.coupling import COUPLING_HEADLINE, CouplingMonitor, coupling_metric_name
from lightning_moe.callbacks.diagnostics import CoActivationMonitor, MarginMonitor
from lightning_moe.callbacks.geometry import RouterGeometryMonitor
from lightning_moe.callbacks.load import LoadBalanceMonitor
from lightning_moe.callbacks.monitor import RoutingMonitor, check_artifact_name
from lightning_moe.callbacks.plots import log_figure, matplotlib_available
from lightning_moe.callbacks.results import ResultTable
from lightning_moe.callbacks.router_state import RouterStateUpdate
from lightning_moe.callbacks.specialization import SpecializationMonitor
from lightning_moe.callbacks.summary import RoutingSummary, routing_summary
from lightning_moe.callbacks.traces import RoutingTraceWriter, read_routing_traces
from lightning_moe.callbacks.transitions import TransitionMonitor

__all__ = [
    "ALARMS",
    "COUPLING_HEADLINE",
    "CoActivationMonitor",
    "CouplingMonitor",
    "LoadBalanceMonitor",
    "MarginMonitor",
    "ResultTable",
    "RouterGeometryMonitor",
    "RouterStateUpdate",
    "RoutingAlarms",
    "RoutingConsistencyMonitor",
    "RoutingMonitor",
    "RoutingSummary",
    "RoutingTraceWriter",
    "SpecializationMonitor",
    "TransitionMonitor",
    "check_artifact_name",
    "coupling_metric_name",
    "log_figure",
    "matplotlib_available",
    "read_routing_traces",
    "routing_summary",
]
