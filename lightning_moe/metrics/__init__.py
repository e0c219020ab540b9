"""torchmetrics metrics over routing decisions: load, specialisation, router geometry, transitions.

Every state is sum-reduced (``cat`` for the rank-based coupling metric), so DDP synchronisation is exact.
"""

from lightning_moe.metrics.consistency import RoutingOverlap, order_by_weight, router_saturation, routing_fluctuation
from lightning_moe.metrics.coupling import COUPLING_RESPONSES, COUPLING_SCORES, LayerCoupling, correlation_log10_p, coupling_stats
from lightning_moe.metrics.geometry import (
    RoutedMean,
    ScoreActivationCoupling,
    paired_alignment,
    rankdata,
    router_geometry,
    spearman,
    top_right_singular_ED,
)
from lightning_moe.metrics.diagnostics import CoActivation, MarginHistogram, decision_margins_T
from lightning_moe.metrics.load import ExpertLoad, SlotCounts, load_percentiles, load_stats
from lightning_moe.metrics.specialization import (
    LabelSpecialization,
    TokenSpecialization,
    conditional_entropy_C,
    share_matrix_CE,
    specialization_stats,
)
from lightning_moe.metrics.transitions import TransitionRouting, experts_for_coverage, mass_coverage_T

__all__ = [
    "COUPLING_RESPONSES",
    "COUPLING_SCORES",
    "CoActivation",
    "ExpertLoad",
    "LabelSpecialization",
    "LayerCoupling",
    "MarginHistogram",
    "RoutedMean",
    "RoutingOverlap",
    "ScoreActivationCoupling",
    "SlotCounts",
    "TokenSpecialization",
    "TransitionRouting",
    "conditional_entropy_C",
    "correlation_log10_p",
    "coupling_stats",
    "decision_margins_T",
    "experts_for_coverage",
    "load_percentiles",
    "load_stats",
    "mass_coverage_T",
    "order_by_weight",
    "paired_alignment",
    "rankdata",
    "router_geometry",
    "router_saturation",
    "routing_fluctuation",
    "share_matrix_CE",
    "spearman",
    "specialization_stats",
    "top_right_singular_ED",
]
