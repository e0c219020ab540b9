"""Print a result table of logged metrics when training ends."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

DEFAULT_METRICS = {
    "val/loss": "validation loss (nats/token)",
    "val/bits_per_token": "bits per token (byte/char)",
    "val/cv": "load CV (mean over layers)",
    "val/maxvio_global": "MaxVio global (mean over layers)",
    "val/dead_experts": "dead experts (all layers)",
    "train/loss": "last training loss",
}


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [title, rule] + [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows] + [rule]
    return "\n".join(lines)


class ResultTable(pl.Callback):
    """At the end of ``fit``, print the final logged values of ``metrics`` (key -> label) with wall time and
    throughput.

    Args:
        metrics: logged keys to show and their labels; missing keys are shown as ``n/a``.
        title: first line of the table.
    """

    def __init__(self, metrics: dict[str, str] | None = None, title: str = "lightning-moe results") -> None:
        self.metrics = dict(metrics) if metrics is not None else dict(DEFAULT_METRICS)
        self.title = title
        self._start = 0.0
        self._tokens = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "tokens" in batch:
            self._tokens += batch["tokens"].numel()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall = time.perf_counter() - self._start
        got = trainer.callback_metrics
        rows = [(label, f"{float(got[key]):.4f}" if key in got else "n/a") for key, label in self.metrics.items()]
        rows += [("optimizer steps", str(trainer.global_step)), ("wall time (s)", f"{wall:.1f}")]
        if self._tokens:
            rows.append(("training tokens/s", f"{self._tokens / wall:,.0f}"))
        print("\n" + format_table(rows, self.title), flush=True)
