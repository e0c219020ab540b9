"""``RoutingSummary``: at the end of fit, one markdown table of every MoE layer's routing health."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

STAGES = ("val", "train")  # the validation value when there is one, else the last training window
COLUMNS = ("layer", "load CV", "MaxVio", "dead experts", "saturation", "margin p50", "alarms")


def _value(logged: dict[str, float], layer: str, kind: str, stats: Sequence[str]) -> float | None:
    for stage in STAGES:
        for stat in stats:
            key = f"{stage}/{kind}/{layer}/{stat}"
            if key in logged:
                return logged[key]
    return None


def _saturation(logged: dict[str, float], layer: str) -> float | None:
    """Any monitor's ``<stage>/<kind>/<layer>/saturation...`` key (read by name, so any consistency monitor works)."""
    for stage in STAGES:
        keys = sorted(k for k in logged if k.startswith(f"{stage}/") and f"/{layer}/" in k
                      and k.rsplit("/", 1)[1].startswith("saturation"))
        if keys:
            return logged[keys[0]]
    return None


def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def routing_summary(callbacks: Sequence[Any], title: str) -> str | None:
    """The markdown summary of the monitors among ``callbacks`` (read duck-typed: ``taps``, ``logged``,
    ``fired``, ``worst_layer``), or None when no monitor watched a layer."""
    layers: list[str] = []
    logged: dict[str, float] = {}
    fired: dict[str, list[str]] = {}
    worst: dict[str, str] = {}
    for cb in callbacks:
        layers += [name for name in getattr(cb, "taps", {}) if name not in layers]
        if isinstance(getattr(cb, "logged", None), dict):
            logged.update(cb.logged)
        for kind, where in (getattr(cb, "fired", None) or {}).items():
            fired[kind] = fired.get(kind, []) + [w for w in where if w not in fired.get(kind, [])]
        worst.update(getattr(cb, "worst_layer", None) or {})
    if not layers:
        return None
    rows = []
    matched: set[tuple[str, str]] = set()
    for layer in layers:
        alarms = []
        for kind, where in fired.items():
            hits = [w for w in where if w == layer or w.startswith(layer + ".")]
            if hits:
                alarms.append(kind)
                matched |= {(kind, w) for w in hits}
        dead = _value(logged, layer, "load", ["dead_experts"])
        rows.append([
            f"`{layer}`",
            _cell(_value(logged, layer, "load", ["cv"])),
            _cell(_value(logged, layer, "load", ["maxvio_global", "maxvio"])),
            _cell(dead, 0),
            _cell(_saturation(logged, layer)),
            _cell(_value(logged, layer, "margin", ["p50"])),
            ", ".join(alarms) or "none",
        ])
    lines = [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append("Values: the validation set where it was measured, else the last training window; n/a = no "
                 "monitor measured it.")
    stage = next((s for s in STAGES if s in worst), None)
    if stage is not None:
        maxvio = logged.get(f"{stage}/load/worst_layer_maxvio")
        lines.append(f"Worst layer by MaxVio ({stage}): `{worst[stage]}` ({_cell(maxvio)}).")
    model_wide = sorted({(k, w) for k, where in fired.items() for w in where} - matched)
    if model_wide:
        lines.append("Model-wide alarms: " + ", ".join(f"{k} (`{w}`)" for k, w in model_wide) + ".")
    return "\n".join(lines) + "\n"


class RoutingSummary(pl.Callback):
    """At the end of fit, print a markdown table with one row per MoE layer — load CV, MaxVio, dead experts,
    saturation (from any monitor logging ``.../<layer>/saturation``), margin p50, alarms raised — and write it to
    ``<log_dir>/<filename>`` (the first logger's directory, else ``default_root_dir``). Put it in the Trainer's
    callbacks next to the monitors it reads (:class:`LoadBalanceMonitor`, :class:`MarginMonitor`,
    :class:`RoutingAlarms`, ...); only rank zero prints and writes.

    Args:
        filename: name of the markdown file.
        print_table: also print the table to stdout.
    """

    def __init__(self, filename: str = "routing_summary.md", print_table: bool = True) -> None:
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name such as 'routing_summary.md', got {filename!r}.")
        self.filename, self.print_table = filename, print_table
        self.path: Path | None = None  # where the last summary was written

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ``trainer.log_dir`` broadcasts from rank zero under DDP: every rank must ask, only rank zero writes.
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        text = routing_summary(trainer.callbacks, f"Routing summary: {type(pl_module).__name__}")
        if text is None:
            return
        if self.print_table:
            print("\n" + text, flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.filename
        self.path.write_text(text)
