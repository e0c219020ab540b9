"""Lightning callbacks: result tables and routing monitors."""

from lightning_moe.callbacks.results import ResultTable

__all__ = ["ResultTable"]
