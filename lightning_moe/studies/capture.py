"""The callback the study runner adds to every run: it writes the final logged metrics to a JSON file."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_moe.callbacks import RoutingMonitor
from lightning_moe.utils import write_json_atomic


class StudyMetrics(pl.Callback):
    """At the end of ``fit``, save every scalar in ``trainer.callback_metrics`` (the last value of each logged key:
    the last validation's ``val/*`` and the last step's ``train/*``) and the last value of every key the routing
    monitors logged (their training windows go to the loggers only), the optimizer step and the fit's duration.

    The runner adds it with ``--trainer.callbacks+=`` so a study run is a plain ``lightning-moe fit`` otherwise.
    Nothing is written when fit was interrupted, so an interrupted run counts as not finished and is redone.

    Args:
        path: JSON file to write (its folder is created).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        metrics = {k: v for cb in trainer.callbacks if isinstance(cb, RoutingMonitor) for k, v in cb.logged.items()}
        metrics.update(
            (k, float(v)) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {
            "metrics": metrics, "global_step": trainer.global_step, "fit_s": time.perf_counter() - self._start,
        })
