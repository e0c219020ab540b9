"""Dropless expert backends sharing MegaBlocks' dMoE parameter layout."""

from lightning_moe.experts.megablocks import MegaBlocksUnavailableError
from lightning_moe.experts.native import ACTIVATIONS, BACKENDS, Experts
from lightning_moe.experts.reference import reference_experts

__all__ = ["ACTIVATIONS", "BACKENDS", "Experts", "MegaBlocksUnavailableError", "reference_experts"]
