"""torchmetrics metrics over routing decisions (sum-reduced states, so DDP sync is exact)."""

from lightning_moe.metrics.load import ExpertLoad, load_stats

__all__ = ["ExpertLoad", "load_stats"]
