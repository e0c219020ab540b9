"""``CoActivationMonitor`` and ``MarginMonitor``: which experts fire together, and how close each token's top-k
choice was to flipping.

Legend: T tokens, K slots, E experts, B histogram bins.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.callbacks.plots import heatmap, new_figure
from lightning_moe.metrics.diagnostics import CoActivation, MarginHistogram, decision_margins_T


class CoActivationMonitor(RoutingMonitor):
    """Logs, per MoE layer with K >= 2, ``<stage>/coact/<layer>/max``: the largest ``P(E_j | E_i)``, i != j
    (1 = expert j accompanies every token of expert i), over each training window and the validation set.

    Plot ``coact_<stage>.png``: per layer, the matrix ``P(E_j | E_i)`` of the last window (row i, column j), as in
    OLMoE's co-activation figure (arXiv 2409.02060). Layers routing one expert per token are skipped.
    Routers with a variable number of experts per token (expert choice) count their real slots only.

    Args:
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "coact"
    default_sample_every = 5  # a diagnostic: one step in five estimates the window (RoutingMonitor)

    def __init__(self, **monitor_kwargs: Any) -> None:
        super().__init__(**monitor_kwargs)
        self.matrices: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}}  # stage -> layer -> last P_EE

    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer, tap in self.taps.items():
            self.add_metric(layer, "coact", partial(CoActivation, tap.num_experts))

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        if event.experts_TK.shape[1] < 2:
            return
        keep_TK = event.kept_TK(self.batch_mask_T(event, batch))
        self.update_metric(stage, event.layer, "coact", event.experts_TK, keep_TK)

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._has_data(stage, "coact"):
            P_EE = self.metric(stage, layer, "coact").compute()
            self.matrices[stage][layer] = P_EE.float().cpu()
            out[f"coact/{layer}/max"] = P_EE.max()
        return out

    def _plot(self, directory: Path) -> None:
        for stage, matrices in self.matrices.items():
            if not matrices:
                continue
            made = new_figure(len(matrices), columns=min(2, len(matrices)), panel_size=(4.5, 3.6))
            if made is None:
                continue
            fig, axes = made
            for ax, (layer, P_EE) in zip(axes, matrices.items()):
                heatmap(fig, ax, P_EE, f"{layer}: co-activation ({stage})", "expert j", "expert i",
                        "P(E_j | E_i)", xticks=[str(e) for e in range(P_EE.shape[1])], cmap="viridis", vmin=0, vmax=1)
            self.save_figure(fig, directory, stage)

    def _extra_state(self) -> dict[str, Any]:
        return {"matrices": {s: {k: v.clone() for k, v in m.items()} for s, m in self.matrices.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.matrices = {s: {k: v.clone() for k, v in m.items()} for s, m in state["matrices"].items()}


class MarginMonitor(RoutingMonitor):
    """Logs, per MoE layer, ``<stage>/margin/<layer>/<stat>`` of the relative top-k boundary margin
    ``(lowest selected score - highest unselected score) / |lowest selected score|`` of each token
    (:func:`~lightning_moe.metrics.decision_margins_T`): ``p10``, ``p50``, ``p90`` (from a 1000-bin histogram
    over [0, 1], exact to 0.001 and exact under DDP), ``near_tie_share`` (margin below ``near_tie``) and
    ``negative_share`` (an unselected expert scored higher: a bias-shifted selection).

    Skips layers without scores, with K = E, or with a variable number of experts per token (expert choice).
    Plot ``margin_<stage>.png``: per layer, the histogram of margins of the last window.

    Args:
        near_tie: margins below this are near-ties (default 0.01: a 1% relative score change flips the choice).
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "margin"
    default_sample_every = 5  # a diagnostic: one step in five estimates the window (RoutingMonitor)

    def __init__(self, near_tie: float = 0.01, **monitor_kwargs: Any) -> None:
        MarginHistogram(near_tie)  # validates near_tie now, not at setup
        super().__init__(**monitor_kwargs)
        self.near_tie = near_tie
        self.histograms: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}}  # stage -> layer -> last hist_B

    def _state_key_kwargs(self) -> dict[str, Any]:
        return {"near_tie": self.near_tie}

    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer in self.taps:
            self.add_metric(layer, "margin", partial(MarginHistogram, self.near_tie))

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        scores_TE = event.scores_TE
        if scores_TE is None or event.mask_TK is not None or event.experts_TK.shape[1] >= scores_TE.shape[1]:
            return
        margins_T = decision_margins_T(event.scores_TE, event.experts_TK)
        self.update_metric(stage, event.layer, "margin", margins_T, event.kept_T(self.batch_mask_T(event, batch)))

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._has_data(stage, "margin"):
            stats = self.metric(stage, layer, "margin").compute()
            self.histograms[stage][layer] = stats.pop("hist_B").float().cpu()
            out.update({f"margin/{layer}/{k}": v for k, v in stats.items()})
        return out

    def _plot(self, directory: Path) -> None:
        for stage, histograms in self.histograms.items():
            if not histograms:
                continue
            made = new_figure(len(histograms), columns=min(2, len(histograms)), panel_size=(4.5, 2.6))
            if made is None:
                continue
            fig, axes = made
            for ax, (layer, hist_B) in zip(axes, histograms.items()):
                # 1000 bins are too fine to read: show 50 bins of width 0.02 (the negative bin as one bar at -0.02).
                bins = hist_B.numel() - 1
                coarse = hist_B[1:].view(50, bins // 50).sum(1) if bins % 50 == 0 else hist_B[1:]
                width = 1.0 / coarse.numel()
                total = float(hist_B.sum())
                ax.bar([-width / 2], [float(hist_B[0]) / total], width=width, color="tab:red", label="< 0")
                ax.bar([(i + 0.5) * width for i in range(coarse.numel())], (coarse / total).tolist(), width=width,
                       color="tab:blue")
                ax.axvline(self.near_tie, color="grey", linestyle=":", label=f"near tie ({self.near_tie:g})")
                ax.set_title(f"{layer}: top-k decision margins ({stage})", fontsize=9)
                ax.set_xlabel("(lowest selected - best unselected) / lowest selected", fontsize=8)
                ax.set_ylabel("share of tokens")
                ax.legend(fontsize=7)
            self.save_figure(fig, directory, stage)

    def _extra_state(self) -> dict[str, Any]:
        return {"histograms": {s: {k: v.clone() for k, v in m.items()} for s, m in self.histograms.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.histograms = {s: {k: v.clone() for k, v in m.items()} for s, m in state["histograms"].items()}
