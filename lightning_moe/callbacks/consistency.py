"""``RoutingConsistencyMonitor``: does a fixed set of probe tokens keep its experts as training goes on?

Legend: T probe tokens (every probe batch flattened, in order), K slots per token, E experts, C recorded checks.

Every ``every_n_steps`` optimizer steps the probe set is routed with the model in eval mode under
``torch.no_grad`` and its routing (expert ids ordered by weight, as small int tensors) is recorded. Against it:
OLMoE's router saturation (arXiv 2409.02060) vs a reference check and vs the previous check, and StableMoE's
routing fluctuation (arXiv 2204.08396) vs the previous check; at the end of fit, the saturation of every recorded
check against the final one (OLMoE's curve) is stored and plotted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor

from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.callbacks.plots import new_figure
from lightning_moe.metrics.consistency import order_by_weight, router_saturation, routing_fluctuation
from lightning_moe.utils import check_positive_int

ProbeForward = Callable[[pl.LightningModule, Any], Any]
CURVES = ("saturation_vs_ref", "saturation_vs_prev", "fluctuation")


def _compact(experts_TK: Tensor) -> Tensor:
    """Expert ids in the smallest integer type that holds them: a long history of checks stays small."""
    top = int(experts_TK.max()) if experts_TK.numel() else 0
    dtype = torch.uint8 if top < 256 else torch.int16 if top < 32768 else torch.int32
    return experts_TK.to("cpu", dtype)


class RoutingConsistencyMonitor(RoutingMonitor):
    """Logs, per MoE layer, at every check ``train/consistency/<layer>/<stat>``:

    * ``saturation_vs_ref``: router saturation against the reference check (``reference_step``; default the
      first check), logged from the reference check on;
    * ``saturation_vs_prev`` and ``fluctuation`` (share of probe tokens whose top-1 expert changed), against the
      previous check.

    At the end of fit, ``saturation_vs_final[layer]`` holds the saturation of every check against the final one
    (the curve of OLMoE's Figure 8), aligned with ``history_steps``; plot ``consistency_saturation.png`` shows it.
    The probe batches, the recorded routings and the curves are saved in the callback's checkpoint state.

    Under DDP every rank routes the *whole* probe set (rank zero's, broadcast once at the start of fit; or the one
    given) with identical replicas, so every rank computes identical values without a collective per check.

    Args:
        probe: the probe batch (or a list of batches) to route; default the first ``probe_batches`` batches of the
            datamodule's (else the LightningModule's) ``val_dataloader()``, taken at the start of fit.
        probe_batches: how many validation batches make the probe set when ``probe`` is not given.
        reference_step: the optimizer step of the check that ``saturation_vs_ref`` compares with; it must be a
            check step (a multiple of ``every_n_steps``); default the first check.
        probe_forward: ``fn(pl_module, batch)`` running the model on one probe batch; default
            ``pl_module(batch[input_key])``. Pass one for a LightningModule without a ``forward`` (e.g.
            ``lambda m, b: m.model(b["input_ids"], attention_mask=b["attention_mask"])``).
        input_key: the batch key the default ``probe_forward`` passes to ``pl_module``.
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots`` of :class:`RoutingMonitor`.
    """

    name = "consistency"

    def __init__(
        self,
        probe: Any = None,
        probe_batches: int = 4,
        reference_step: int | None = None,
        probe_forward: ProbeForward | None = None,
        input_key: str = "tokens",
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__(**monitor_kwargs)
        check_positive_int("probe_batches", probe_batches)
        if reference_step is not None and (isinstance(reference_step, bool) or not isinstance(reference_step, int)
                                           or reference_step < 0):
            raise ValueError(f"reference_step must be None or an optimizer step >= 0, got {reference_step!r}.")
        if probe_forward is not None and not callable(probe_forward):
            raise TypeError(f"probe_forward must be callable as fn(pl_module, batch), got {type(probe_forward).__name__}.")
        self.probe = None if probe is None else list(probe) if isinstance(probe, (list, tuple)) else [probe]
        self.probe_batches = probe_batches
        self.reference_step = reference_step
        self.probe_forward = probe_forward
        self.input_key = input_key
        self.history_steps: list[int] = []
        self.history: dict[str, list[Tensor]] = {}  # layer -> one [T, K] routing per check (ordered by weight)
        self.keep: dict[str, Tensor | None] = {}  # layer -> which probe tokens count (padding excluded)
        self.curves: dict[str, dict[str, list[float]]] = {c: {} for c in CURVES}  # curve -> layer -> values
        self.curve_steps: dict[str, list[int]] = {c: [] for c in CURVES}
        self.saturation_vs_final: dict[str, list[float]] = {}
        self._host: tuple[pl.Trainer, pl.LightningModule] | None = None
        self._warned_probe = False

    # --------------------------------------------------------------------------------------------- the probe
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            return  # given, or restored from a checkpoint
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        try:
            loader = source.val_dataloader()
        except Exception as err:  # noqa: BLE001 - no validation data is the host's choice, not an error of theirs
            loader, reason = None, f"{type(err).__name__}: {err}"
        else:
            reason = "it has no batches"
        batches = list(islice(iter(loader), self.probe_batches)) if loader is not None else []
        # Rank zero's probe on every rank: a shuffled validation loader must not give ranks different probes.
        batches = trainer.strategy.broadcast([move_data_to_device(b, torch.device("cpu")) for b in batches])
        if not batches:
            rank_zero_warn(
                f"{type(self).__name__} found no probe set ({type(source).__name__}.val_dataloader(): {reason}); it "
                "logs nothing. Pass probe=<a batch> or add a validation dataloader."
            )
            return
        self.probe = batches  # on the CPU: kept across checks and saved in the checkpoint

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.probe_forward is not None:
            self.probe_forward(pl_module, batch)
        elif isinstance(batch, Mapping) and self.input_key in batch:
            pl_module(batch[self.input_key])
        else:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"{type(self).__name__}: the probe batch has no {self.input_key!r} (it has {keys}); set input_key "
                "to the key holding the model input, or pass probe_forward=fn(pl_module, batch)."
            )

    @torch.no_grad()
    def _route_probe(self, pl_module: pl.LightningModule) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Each layer's probe routing ``(experts_TK ordered by weight, keep_T)``, with the model in eval mode."""
        # Each module's own flag is restored (not one pl_module.train()): a host may keep frozen parts in eval.
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        routed: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        try:
            for batch in self.probe:
                self._events.clear()
                batch = move_data_to_device(batch, pl_module.device)
                self._forward(pl_module, batch)
                for layer, event in self._events.items():
                    if event.mask_TK is not None:
                        self._warn_variable_k(layer)
                    elif layer in self.taps:
                        experts_TK = order_by_weight(event.experts_TK, event.weights_TK)
                        routed.setdefault(layer, []).append((experts_TK, event.kept_T(self.batch_mask_T(event, batch))))
        finally:
            self._events.clear()
            for m, mode in modes:
                m.training = mode
        out = {}
        for layer, parts in routed.items():
            keeps = [k if k is not None else torch.ones(len(e), dtype=torch.bool, device=e.device) for e, k in parts]
            keep_T = torch.cat(keeps).cpu() if any(k is not None for _, k in parts) else None
            out[layer] = (torch.cat([e for e, _ in parts]), keep_T)
        return out

    def _warn_variable_k(self, layer: str) -> None:
        # Saturation compares top-K sets of equal size; expert choice lists every expert with weight-0 padding.
        if not self._warned_probe:
            rank_zero_warn(
                f"{type(self).__name__}: layer {layer!r} gives tokens a variable number of experts (expert choice), "
                "where top-K overlap is not defined; such layers are skipped. Use layers=[...] to leave them out."
            )
            self._warned_probe = True

    # ----------------------------------------------------------------------------------------------- checks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The base class decides when a check is due and calls _compute("train") then; the check needs the host.
        self._host = (trainer, pl_module)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._host = None

    def _consume(self, stage: Stage, batch: Any, logging_now: bool) -> None:
        self._events.clear()  # the training batches' own routing is not what this monitor compares

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        if stage != "train" or self._host is None or not self.probe or not self.taps:
            return {}
        _, pl_module = self._host
        step = self.last_logged_step
        routed = self._route_probe(pl_module)
        if not routed:
            if not self._warned_probe:
                rank_zero_warn(f"{type(self).__name__}: routing the probe set produced no routing event; it logs nothing.")
                self._warned_probe = True
            return {}
        ref_index = 0 if self.reference_step is None else (
            self.history_steps.index(self.reference_step) if self.reference_step in self.history_steps
            else len(self.history_steps) if step == self.reference_step else None)
        has_prev = bool(self.history_steps)
        self.history_steps.append(step)
        out: dict[str, Tensor] = {}
        for layer, (experts_TK, keep_T) in routed.items():
            history = self.history.setdefault(layer, [])
            history.append(_compact(experts_TK))
            self.keep.setdefault(layer, keep_T)
            keep_T = self.keep[layer]
            now_TK = history[-1].long()
            values = {}
            if ref_index is not None and ref_index < len(history):
                values["saturation_vs_ref"] = router_saturation(now_TK, history[ref_index].long(), keep_T)
            if has_prev and len(history) > 1:
                prev_TK = history[-2].long()
                values["saturation_vs_prev"] = router_saturation(now_TK, prev_TK, keep_T)
                values["fluctuation"] = routing_fluctuation(now_TK, prev_TK, keep_T)
            for curve, value in values.items():
                self.curves[curve].setdefault(layer, []).append(float(value))
                out[f"consistency/{layer}/{curve}"] = value
        for curve in CURVES:
            if any(f"consistency/{layer}/{curve}" in out for layer in routed):
                self.curve_steps[curve].append(step)
        return out

    def saturation_against_last(self) -> dict[str, list[float]]:
        """Per layer, the saturation of every recorded check against the last one (1.0 for the last itself)."""
        return {
            layer: [float(router_saturation(h.long(), history[-1].long(), self.keep.get(layer))) for h in history]
            for layer, history in self.history.items() if history
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saturation_vs_final = self.saturation_against_last()
        super().on_fit_end(trainer, pl_module)

    def _plot(self, directory: Path) -> None:
        curve = self.saturation_vs_final or self.saturation_against_last()
        made = new_figure(2, columns=2, panel_size=(5.0, 3.2)) if curve else None
        if made is None:
            return
        fig, (left, right) = made
        for layer, values in curve.items():
            left.plot(self.history_steps[-len(values):], values, marker=".", label=layer)
        left.set(title="router saturation vs the final check", xlabel="optimizer step", ylabel="saturation",
                 ylim=(0, 1.02))
        for layer, values in self.curves["fluctuation"].items():
            right.plot(self.curve_steps["fluctuation"][-len(values):], values, marker=".", label=layer)
        right.set(title="routing fluctuation vs the previous check", xlabel="optimizer step",
                  ylabel="share of top-1 changed", ylim=(0, 1.02))
        for ax in (left, right):
            ax.title.set_fontsize(9)
            if ax.lines and len(curve) <= 12:  # one check has no fluctuation yet: no legend, no warning
                ax.legend(fontsize=6)
        self.save_figure(fig, directory, "saturation")

    # ------------------------------------------------------------------------------------ checkpoint state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "history_steps": list(self.history_steps),
            "history": {k: [t.clone() for t in v] for k, v in self.history.items()},
            "keep": dict(self.keep),
            "curves": {c: {k: list(v) for k, v in d.items()} for c, d in self.curves.items()},
            "curve_steps": {c: list(v) for c, v in self.curve_steps.items()},
            "saturation_vs_final": {k: list(v) for k, v in self.saturation_vs_final.items()},
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["probe"] is not None:
            self.probe = state["probe"]
        self.history_steps = list(state["history_steps"])
        self.history = {k: [t.clone() for t in v] for k, v in state["history"].items()}
        self.keep = dict(state["keep"])
        self.curves = {c: {k: list(v) for k, v in d.items()} for c, d in state["curves"].items()}
        self.curve_steps = {c: list(v) for c, v in state["curve_steps"].items()}
        self.saturation_vs_final = {k: list(v) for k, v in state["saturation_vs_final"].items()}
