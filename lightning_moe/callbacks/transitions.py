"""``TransitionMonitor``: routing at labelled domain switches, offset by offset (transitions spec §2, §4, §7.5).

Legend: B batch, S sequence, T = B*S tokens, E experts, C domain labels, O = 2W+1 offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage, check_artifact_name
from lightning_moe.callbacks.plots import heatmap, new_figure
from lightning_moe.metrics.transitions import SwitchWindows, TransitionRouting, check_transition_args, switch_windows

OFFSET_STATS = ("p_correct", "acc_correct", "k99", "coverage99")


class TransitionMonitor(RoutingMonitor):
    """Logs, per MoE layer and offset o in −W..+W around each switch of ``batch[label_key]``,
    ``<stage>/transition/<layer>/<stat>@<o>`` (``@-1``, ``@+0``, ...) for ``p_correct`` (routing probability on
    the incoming domain's correct expert), ``acc_correct`` (argmax on it), ``k99`` (the paper's
    K = log 0.01 / log(1 − p)) and ``coverage99`` (experts a token needs for 99% of its routing mass).
    See :class:`~lightning_moe.metrics.TransitionRouting` for the definitions, including "correct expert".
    With labels aligned to input tokens, offset −1 is the reference's transition step.

    Plot ``transition_<stage>.png``: per layer, the mean routing distribution aligned on the switches (experts x
    offsets) beside the correct-expert probability and accuracy per offset. With ``artifact``, every computed
    window's curves (everything :class:`~lightning_moe.metrics.TransitionRouting` returns, per stage and layer) are
    also written as JSON to ``<default_root_dir>/<artifact>`` after each validation and at the end of fit.

    Args:
        num_labels: number of domain labels C; labels in [0, C), negative = ignored.
        label_key: batch key of the per-token domain labels, ``[batch, seq]``.
        window: W; offsets −W..+W are logged.
        correct_experts: the correct expert of each label when it is known by construction (toy tasks);
            default: identified from the data in each window.
        artifact: file name of the JSON curves (e.g. ``transition_curve.json``); default none written.
        spans: named offset ranges ``{name: [first, last]}`` (inside −W..+W) whose ``p_correct`` and
            ``acc_correct`` are also logged pooled over their tokens, as ``<stat>@<name>`` (e.g.
            ``{mid: [2, 19]}`` for the middle of the incoming domain).
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "transition"
    # Every batch, unlike the other diagnostics: domain switches are rare events, and the transition study's numbers
    # are over every training batch of the window (the reference's "last 50 batches").
    default_sample_every = 1

    def __init__(
        self,
        num_labels: int,
        label_key: str = "domain_ids",
        window: int = 4,
        correct_experts: Sequence[int] | None = None,
        artifact: str | None = None,
        spans: dict[str, tuple[int, int]] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__(**monitor_kwargs)
        check_transition_args(num_labels, window, correct_experts)
        if artifact is not None:
            check_artifact_name(artifact)
        self.artifact = artifact
        self.spans = {name: (int(lo), int(hi)) for name, (lo, hi) in (spans or {}).items()}
        for name, (lo, hi) in self.spans.items():
            if not -window <= lo <= hi <= window:
                raise ValueError(
                    f"spans[{name!r}]=[{lo}, {hi}] must satisfy -window <= first <= last <= window (window={window}); "
                    "raise window or narrow the span."
                )
        self.num_labels, self.label_key, self.window = num_labels, label_key, window
        self.correct_experts = list(correct_experts) if correct_experts is not None else None
        self.latest: dict[Stage, dict[str, dict[str, Tensor]]] = {}
        self._windows: tuple[Tensor, SwitchWindows] | None = None  # (labels, their switches), see _observe

    def _state_key_kwargs(self) -> dict[str, Any]:
        return {"label_key": self.label_key, "window": self.window}

    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer, tap in self.taps.items():
            self.add_metric(layer, "transition", partial(
                TransitionRouting, self.num_labels, tap.num_experts, self.window, self.correct_experts))

    def _label_keys(self) -> tuple[str, ...]:
        return (self.label_key,)

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        labels = self.masked_labels(batch, self.label_key, event)
        if labels.dim() != 2:
            raise ValueError(
                f"TransitionMonitor: batch[{self.label_key!r}] must be [batch, seq] to locate switches within "
                f"sequences, got shape {tuple(labels.shape)}."
            )
        if self._windows is None or self._windows[0] is not labels:
            # Unmasked, every layer of a batch gets the batch's own label tensor: locate its switches once.
            self._windows = (labels, switch_windows(labels, self.num_labels, self.window))
        mass_TE = event.routing_mass_TE(self.tap_of(event).num_experts)
        self.update_metric(stage, event.layer, "transition", labels, mass_TE, self._windows[1])

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._has_data(stage, "transition"):
            result = self.metric(stage, layer, "transition").compute()
            self.latest.setdefault(stage, {})[layer] = {k: v.detach().cpu() for k, v in result.items()}
            for stat in OFFSET_STATS:
                for o, value in zip(result["offsets"].tolist(), result[stat]):
                    out[f"transition/{layer}/{stat}@{o:+d}"] = value
            for name, (lo, hi) in self.spans.items():
                inside_O = slice(lo + self.window, hi + self.window + 1)
                n_O = result["count"][inside_O]
                for stat in ("p_correct", "acc_correct"):
                    # Pooled over the span's tokens (offsets that no switch reached have no token, and NaN).
                    pooled = (result[stat][inside_O].nan_to_num() * n_O).sum() / n_O.sum()
                    out[f"transition/{layer}/{stat}@{name}"] = pooled
        return out

    def _write(self, trainer: pl.Trainer) -> None:
        if self.artifact is None or trainer.sanity_checking:
            return
        curves = {stage: {layer: {k: _json_curve(v) for k, v in r.items()} for layer, r in layers.items()}
                  for stage, layers in self.latest.items()}
        self.write_artifact(trainer, self.artifact, {"step": trainer.global_step, **curves})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._write(trainer)

    def _plot(self, directory: Path) -> None:
        for stage, layers in self.latest.items():
            made = new_figure(2 * len(layers), columns=2, panel_size=(5.0, 3.2))
            if made is None:
                return
            fig, axes = made
            for i, (layer, r) in enumerate(layers.items()):
                offsets = [f"{o:+d}" for o in r["offsets"].tolist()]
                heatmap(fig, axes[2 * i], r["mass_OE"].T, f"{layer} ({stage}): routing mass around switches",
                        "offset from switch", "expert", "mean routing probability", xticks=offsets,
                        cmap="viridis", vmin=0)
                ax = axes[2 * i + 1]
                ax.plot(offsets, r["p_correct"].numpy(), marker="o", label="p(correct expert)")
                ax.plot(offsets, r["acc_correct"].numpy(), marker="s", label="argmax = correct")
                ax.axvline(offsets.index("+0"), color="grey", linestyle=":")
                ax.set_ylim(0, 1)
                ax.set_xlabel("offset from switch")
                ax.set_title(f"{layer} ({stage}): correct expert = incoming domain's", fontsize=9)
                ax.legend(fontsize=7)
                if not torch.isfinite(r["p_correct"]).any():
                    for a in (axes[2 * i], ax):  # say why the panels are empty rather than leave them blank
                        a.text(0.5, 0.5, "no labelled domain switch seen", transform=a.transAxes, ha="center")
            self.save_figure(fig, directory, stage)

    def _extra_state(self) -> dict[str, Any]:
        return {"latest": {s: {k: dict(v) for k, v in d.items()} for s, d in self.latest.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.latest = {s: {k: dict(v) for k, v in d.items()} for s, d in state["latest"].items()}


def _json_curve(t: Tensor) -> list:
    """A tensor as nested lists, NaN (an offset no switch reached) as null: strict JSON."""
    values = t.tolist()
    if not t.is_floating_point():
        return values
    fix = lambda v: [fix(x) for x in v] if isinstance(v, list) else (None if v != v else v)  # noqa: E731
    return fix(values)
