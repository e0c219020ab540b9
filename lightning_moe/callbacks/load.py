"""``LoadBalanceMonitor``: per-layer expert load over training windows and whole validation sets (baselines §4.10).

Legend: T tokens, K slots, E experts, N counted (token, slot) assignments.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.callbacks.plots import heatmap, new_figure
from lightning_moe.metrics.load import ExpertLoad, SlotCounts, load_percentiles


class LoadBalanceMonitor(RoutingMonitor):
    """Logs, per MoE layer, ``<stage>/load/<layer>/<stat>``:

    * training, over each window of ``every_n_steps`` steps: ``cv``, ``max_over_mean``, ``maxvio`` (of the
      window's summed counts), ``entropy`` (normalised), ``dead_experts``, and ``maxvio_batch`` — MaxVio of each
      training micro-batch (each rank's own batch under DDP), averaged over the window (Wang et al. 2024);
    * validation, over the whole validation set: the same statistics with ``maxvio_global`` for MaxVio;
    * both stages: ``p50``, ``p90``, ``p99`` of the expert loads as share x E (:func:`load_percentiles`), and,
      across layers, ``<stage>/load/worst_layer_maxvio`` with ``<stage>/load/worst_layer`` (the layer's index in
      module order; its name is kept in ``worst_layer[stage]``), so a mean over layers cannot hide one bad layer.

    Plot ``load_train.png``: per layer, each expert's share of the load x E (1 = uniform) at every logged window —
    collapse, recovery and dead experts at a glance.

    Args:
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "load"

    def __init__(self, **monitor_kwargs: Any) -> None:
        super().__init__(**monitor_kwargs)
        self.history_steps: list[int] = []
        self.history_shares: dict[str, list[Tensor]] = {}  # layer -> one [E] load-share vector per logged window
        self.worst_layer: dict[str, str] = {}  # stage -> name of the layer with the highest MaxVio last logged

    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer, tap in self.taps.items():
            self.add_metric(layer, "load", partial(ExpertLoad, tap.num_experts))
            self.add_metric(layer, "slots", SlotCounts)

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        keep_TK = event.kept_TK(self.batch_mask_T(event, batch))
        experts_N = event.experts_TK.reshape(-1) if keep_TK is None else event.experts_TK[keep_TK]
        self.update_metric(stage, event.layer, "load", experts_N)
        if event.skipped_TK is not None or event.dropped_TK is not None:
            # Counted beside the load, not as expert 0 or as the full expert: no expert computed these slots.
            token_mask_T = event.mask_T
            batch_mask_T = self.batch_mask_T(event, batch)
            if batch_mask_T is not None:
                token_mask_T = batch_mask_T if token_mask_T is None else token_mask_T & batch_mask_T
            self.update_metric(stage, event.layer, "slots", event.skipped_TK, event.dropped_TK, token_mask_T)

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        layers = self._has_data(stage, "load")
        if stage == "train" and layers:
            self.history_steps.append(self.last_logged_step)
        for layer in layers:
            stats = self.metric(stage, layer, "load").compute()
            counts_E = stats.pop("counts_E")
            stats.update(load_percentiles(counts_E))
            if stage == "train":
                self.history_shares.setdefault(layer, []).append((counts_E / counts_E.sum()).float().cpu())
            else:
                stats["maxvio_global"] = stats.pop("maxvio")
                del stats["maxvio_batch"]  # validation batches are not training batches
            out.update({f"load/{layer}/{k}": v for k, v in stats.items()})
        for layer in self._has_data(stage, "slots"):
            out.update({f"load/{layer}/{k}": v for k, v in self.metric(stage, layer, "slots").compute().items()})
        if layers:
            maxvio_key = "maxvio" if stage == "train" else "maxvio_global"
            maxvio_L = torch.stack([out[f"load/{layer}/{maxvio_key}"] for layer in layers])
            worst = int(maxvio_L.argmax())
            self.worst_layer[stage] = layers[worst]
            out["load/worst_layer_maxvio"] = maxvio_L[worst]
            out["load/worst_layer"] = torch.tensor(float(list(self.taps).index(layers[worst])))
        return out

    def _plot(self, directory: Path) -> None:
        layers = [layer for layer in self.taps if self.history_shares.get(layer)]
        made = new_figure(len(layers), panel_size=(6.0, 3.0)) if layers else None
        if made is None:
            return
        fig, axes = made
        for ax, layer in zip(axes, layers):
            shares_WE = torch.stack(self.history_shares[layer])  # W logged windows
            E = shares_WE.shape[1]
            steps = self.history_steps[-len(shares_WE):]
            heatmap(fig, ax, shares_WE.T * E, f"{layer}: expert load over training", "optimizer step", "expert",
                    "load share x E (1 = uniform)", xticks=[str(s) for s in steps], cmap="magma", vmin=0)
        self.save_figure(fig, directory, "train")

    def _extra_state(self) -> dict[str, Any]:
        return {"history_steps": list(self.history_steps),
                "history_shares": {k: [t.clone() for t in v] for k, v in self.history_shares.items()},
                "worst_layer": dict(self.worst_layer)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history_steps = list(state["history_steps"])
        self.history_shares = {k: [t.clone() for t in v] for k, v in state["history_shares"].items()}
        self.worst_layer = dict(state.get("worst_layer", {}))  # absent in checkpoints of older versions
