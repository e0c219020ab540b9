"""Routing at domain transitions (arXiv 2605.00604): the synthetic tasks, the small modules built on
:class:`lightning_moe.TransitionRouter`, and the report section. Recipes: ``recipes/transitions/``."""

from lightning_moe.studies.transitions.data import TransitionTaskDataModule
from lightning_moe.studies.transitions.modules import (
    TransitionCharLM,
    TransitionPrecisionRegression,
    TransitionRoutingToy,
    TransitionSequenceRouting,
)

__all__ = [
    "TransitionCharLM",
    "TransitionPrecisionRegression",
    "TransitionRoutingToy",
    "TransitionSequenceRouting",
    "TransitionTaskDataModule",
]
