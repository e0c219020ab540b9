"""``CouplingMonitor``: router–expert geometric coupling on the validation set, with a per-run JSON artifact
(arXiv 2605.12476; geometric-coupling spec §2.3).

Legend: T tokens, K slots, E experts, D model width, F expert width, N counted (token, slot) pairs, L layers.

At every validation run it pools the validation set's (token, selected expert) pairs of all layers into
:class:`~lightning_moe.metrics.coupling.LayerCoupling` (score = dispatch weight or router-row logit; response =
‖h·W_gateᵀ‖₂, ‖h·W_upᵀ‖₂ or mean SiLU(h·W_gateᵀ), recomputed from the tapped layer's own weights under
``no_grad``), measures the router rows' geometry, and checks the accumulated history: whether each router row's
change since the start of training points along the mean hidden state routed to its own expert. Training batches
only feed a per-layer MaxVio_batch average.
Because every value is logged at validation, the last one of each reaches ``trainer.callback_metrics``
(and so the study runner's result); the JSON artifact keeps the whole history and the decile curves for plots.
"""

from __future__ import annotations

import math
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, check_artifact_name, Stage
from lightning_moe.callbacks.plots import new_figure
from lightning_moe.metrics.coupling import COUPLING_RESPONSES, COUPLING_SCORES, LayerCoupling, expert_responses_N
from lightning_moe.metrics.geometry import RoutedMean, paired_alignment, router_geometry, top_right_singular_ED
from lightning_moe.metrics.load import ExpertLoad
from lightning_moe.utils import check_positive_int

COUPLING_HEADLINE = "weight_vs_gate_norm"  # the authors' script: dispatch weight vs pre-activation gate norm
_POOLED = "all"  # the metric key of the pooled (all layers) pairs


def coupling_metric_name(score: str, response: str) -> str:
    """The logged name of a (score, response) variant, e.g. ``weight_vs_gate_norm``."""
    return f"{score}_vs_{response}"


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    """:func:`~lightning_moe.metrics.coupling.coupling_stats` output with tensors as lists."""
    return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in stats.items()}


class CouplingMonitor(RoutingMonitor):
    """Logs at every validation run, per MoE layer and pooled over layers:

    * ``val/coupling/<variant>/{rho,log10_p,n,median_group_rho}`` (pooled) and
      ``val/coupling/<layer>/<variant>/{rho,log10_p}``, for every ``<score>_vs_<response>`` variant (see
      :mod:`lightning_moe.metrics.coupling`); the headline is ``weight_vs_gate_norm`` (paper ρ = 0.43);
      ``log10_p`` is the two-sided Student-t p-value of Spearman's ρ, in log10 because it underflows; and
      ``val/coupling/negative_weight_fraction``, the share of selected slots with a negative dispatch weight
      (possible with cosine scores as weights, K-Means ``mixing='scores'``);
    * ``val/geometry/<layer>/{mean_cosine,nn_cosine,effective_rank,common_energy}`` of the router rows (linear
      router weights or K-Means centroids) and ``val/geometry/mean_cosine`` (mean over layers; the paper's
      Fig. 3 number);
    * ``val/coupling/history/{matched,mismatched,match_rate}`` (mean over layers) and per layer
      ``val/coupling/<layer>/history/...``: the spec's accumulated-history check, cos(r_i − r_i(0), μ_i) with
      r_i(0) the router row at the start of the first fit (kept in the checkpoint, so a resumed run keeps its
      origin) and μ_i the mean validation hidden state routed to expert i, for the matched expert against the
      mean over mismatched j ≠ i, and the share of rows whose best-aligned μ is their own (see
      :func:`~lightning_moe.metrics.geometry.paired_alignment`); absent for rows that never moved (a frozen
      router);
    * ``val/coupling/up_direction/{matched,mismatched,match_rate}`` and per layer: |cos(r_i, v_i)| with v_i the top
      right-singular vector of expert i's W_up, matched against mismatched;
    * ``val/train_maxvio_batch/<layer>`` and ``val/train_maxvio_batch`` (mean over layers): MaxVio of each
      *training* batch, averaged over the batches since the previous validation (MaxVio_batch of Wang et al.
      2024 over a window; logged at validation so the last window reaches ``callback_metrics``).

    It writes ``<default_root_dir>/<artifact>`` (JSON) after each validation run: ``layers``, ``history`` (per
    validation: the step and every scalar ``val/*`` key in ``trainer.callback_metrics``, so other monitors' and
    the module's validation numbers are included) and ``coupling`` (the last validation's statistics with the
    decile curves). Plot ``coupling_val.png``: the pooled decile curves.

    All layers must have the same number of experts (their pairs are pooled). Layers whose adapter gives no
    router rows or expert weights are skipped.

    Args:
        min_group_pairs: pairs a (layer, expert) group needs to enter ``median_group_rho`` (the authors use 128).
        artifact: file name of the JSON artifact inside the Trainer's ``default_root_dir``.
        monitor_kwargs: ``layers``, ``adapters``, ``mask_key``, ``plots`` of :class:`RoutingMonitor`
            (``every_n_steps`` has no effect: everything is computed at validation).
    """

    name = "coupling"
    needs_inputs = True

    def __init__(self, min_group_pairs: int = 128, artifact: str = "coupling.json", **monitor_kwargs: Any) -> None:
        super().__init__(**monitor_kwargs)
        check_positive_int("min_group_pairs", min_group_pairs)
        check_artifact_name(artifact)
        self.min_group_pairs, self.artifact = min_group_pairs, artifact
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        self.initial_rows: dict[str, Tensor] = {}  # layer -> router rows at the first fit's start (CPU, fp32)

    def _build(self, pl_module: pl.LightningModule) -> None:
        sizes = {tap.num_experts for tap in self.taps.values()}
        if len(sizes) > 1:
            raise ValueError(
                f"CouplingMonitor pools pairs over layers, which needs one expert count, but the layers have "
                f"{ {n: t.num_experts for n, t in self.taps.items()} }; pass layers=[...] with equal counts."
            )
        self.layer_index = {layer: i for i, layer in enumerate(self.taps)}
        for layer, tap in self.taps.items():
            # Fed by training batches but kept under the "val" stage: validation resets it, so it averages over
            # the training batches since the previous validation, not over the training log window.
            self.add_metric(layer, "train_load", partial(ExpertLoad, tap.num_experts), stages=("val",))
            if (rows_ED := tap.router_weight_ED()) is not None:
                self.add_metric(layer, "routed_mean", partial(RoutedMean, tap.num_experts, rows_ED.shape[1]),
                                stages=("val",))
        if self.taps:
            factory = partial(LayerCoupling, len(self.taps), sizes.pop(), self.min_group_pairs)
            self.add_metric(_POOLED, "pairs", factory, stages=("val",))

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        keep_TK = event.kept_TK(self.batch_mask_T(event, batch))
        if stage == "train":
            experts_N = event.experts_TK.reshape(-1) if keep_TK is None else event.experts_TK[keep_TK]
            self.update_metric("val", event.layer, "train_load", experts_N)
            return
        tap = self.tap_of(event)
        rows_ED, gate_EFD, up_EFD = tap.router_weight_ED(), tap.expert_weight_EFD("gate"), tap.expert_weight_EFD("up")
        if event.x_TD is None or rows_ED is None or gate_EFD is None or up_EFD is None:
            return
        T, K = event.experts_TK.shape
        token_TK = torch.arange(T, device=event.experts_TK.device)[:, None].expand(T, K)
        if keep_TK is None:
            keep_TK = torch.ones_like(token_TK, dtype=torch.bool)
        token_N, experts_N = token_TK[keep_TK], event.experts_TK[keep_TK]
        with torch.no_grad():
            x_ND = event.x_TD[token_N]
            # The raw router-row dot product h·r_e: the logit whose gradient is parallel to h (paper Sec. 3).
            logit_N = (x_ND.float() * rows_ED.detach()[experts_N].float()).sum(dim=1)
            responses = expert_responses_N(x_ND, experts_N, gate_EFD.detach(), up_EFD.detach())
        scores = {"weight": event.weights_TK[keep_TK], "logit": logit_N}
        self.update_metric(stage, event.layer, "routed_mean", x_ND, experts_N)
        self.update_metric(stage, _POOLED, "pairs", self.layer_index[event.layer], experts_N, scores, responses)

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        if stage != "val":
            return {}
        out: dict[str, Any] = {}
        maxvio = {layer: float(self.metric("val", layer, "train_load").compute()["maxvio_batch"])
                  for layer in self._has_data("val", "train_load")}
        out.update({f"train_maxvio_batch/{layer}": v for layer, v in maxvio.items()})
        if maxvio:
            out["train_maxvio_batch"] = sum(maxvio.values()) / len(maxvio)
        # Read once per validation: under FSDP2 each read gathers the router weight from every rank.
        rows = {layer: r.detach() for layer, tap in self.taps.items() if (r := tap.router_weight_ED()) is not None}
        geometry = {layer: {k: float(v) for k, v in router_geometry(rows_ED).items()}
                    for layer, rows_ED in rows.items()}
        for layer, values in geometry.items():
            out.update({f"geometry/{layer}/{k}": v for k, v in values.items()})
        if geometry:
            out["geometry/mean_cosine"] = sum(g["mean_cosine"] for g in geometry.values()) / len(geometry)
        out.update(self._alignment(rows))
        coupling: dict[str, Any] = {}
        if f"val/{_POOLED}/pairs" in self.updated:
            result = self.metric("val", _POOLED, "pairs").compute()
            out["coupling/negative_weight_fraction"] = result["negative_weight_fraction"]
            for s in COUPLING_SCORES:
                for r in COUPLING_RESPONSES:
                    name, res = coupling_metric_name(s, r), result[f"{s}/{r}"]
                    pooled = res["pooled"]
                    out.update({f"coupling/{name}/{k}": pooled[k] for k in ("rho", "log10_p", "n")})
                    out[f"coupling/{name}/median_group_rho"] = res["median_group_rho"]
                    for layer, i in self.layer_index.items():
                        out.update({f"coupling/{layer}/{name}/{k}": res["layers"][i][k] for k in ("rho", "log10_p")})
                    coupling[name] = {
                        "pooled": _jsonable(pooled),
                        "layers": {layer: _jsonable(res["layers"][i]) for layer, i in self.layer_index.items()},
                        "median_group_rho": res["median_group_rho"],
                    }
        self.latest = {"coupling": coupling, "geometry": geometry}
        return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in out.items()}

    def _alignment(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """The accumulated-history and W_up-direction checks per layer (``rows``: each layer's router rows now),
        and their means over layers."""
        per_layer: dict[str, dict[str, dict[str, float]]] = {"history": {}, "up_direction": {}}
        for layer in self._has_data("val", "routed_mean"):
            rows_ED, up_EFD = rows[layer], self.taps[layer].expert_weight_EFD("up")
            if layer in self.initial_rows:
                moved_ED = rows_ED.double() - self.initial_rows[layer].to(rows_ED.device).double()
                mu_ED = self.metric("val", layer, "routed_mean").compute()
                per_layer["history"][layer] = {k: float(v) for k, v in paired_alignment(moved_ED, mu_ED).items()}
            if up_EFD is not None:
                # A singular vector's sign is arbitrary, so the direction check compares |cos|.
                top_ED = top_right_singular_ED(up_EFD)
                per_layer["up_direction"][layer] = {
                    k: float(v) for k, v in paired_alignment(rows_ED, top_ED, absolute=True).items()}
        out: dict[str, float] = {}
        for check, layers in per_layer.items():
            for k in ("matched", "mismatched", "match_rate"):
                # NaN = undefined (rows that never moved, one usable row): left out, not averaged in.
                values = {layer: v[k] for layer, v in layers.items() if not math.isnan(v[k])}
                out.update({f"coupling/{layer}/{check}/{k}": v for layer, v in values.items()})
                if values:
                    out[f"coupling/{check}/{k}"] = statistics.fmean(values.values())
        return out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the checkpoint's origin was restored already (Lightning restores callbacks before this
        # hook), so only layers without one take the rows they start from now.
        for layer, tap in self.taps.items():
            rows_ED = tap.router_weight_ED()
            if layer not in self.initial_rows and rows_ED is not None:
                self.initial_rows[layer] = rows_ED.detach().float().cpu().clone()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, after every ``on_validation_epoch_end``, the epoch's logged values are in callback_metrics.
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1
        }
        self.history.append({"step": trainer.global_step, "metrics": metrics})
        self.write_artifact(trainer, self.artifact, {"layers": list(self.taps), "history": self.history, **self.latest})

    def _plot(self, directory: Path) -> None:
        coupling = self.latest.get("coupling")
        made = new_figure(1, panel_size=(6.0, 3.5)) if coupling else None
        if made is None:
            return
        fig, (ax,) = made
        for r in COUPLING_RESPONSES:
            stats = coupling[coupling_metric_name("weight", r)]["pooled"]
            if not math.isnan(stats["rho"]):
                ax.plot(range(1, 11), stats["deciles"], marker="o", label=f"{r} (rho {stats['rho']:.2f})")
        ax.axhline(0, color="grey", linestyle=":")
        ax.set_xlabel("dispatch-weight decile")
        ax.set_ylabel("mean per-expert z-score")
        ax.set_title("router weight vs selected expert's response (validation, all layers)", fontsize=9)
        ax.legend(fontsize=7)
        self.save_figure(fig, directory, "val")

    def _extra_state(self) -> dict[str, Any]:
        return {"history": list(self.history), "initial_rows": dict(self.initial_rows)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.initial_rows = dict(state.get("initial_rows", {}))  # absent in checkpoints of older versions
