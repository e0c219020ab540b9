"""``RouterGeometryMonitor``: router-row geometry and router–expert score–activation coupling
(geometric-coupling spec §2.2–2.3; baselines §4.11).

Legend: T tokens, K slots, E experts, F expert width, D model width, M sampled tokens, N <= M*K counted pairs.

Activation norms come from the tapped layer's own expert weights: on a few sampled tokens of the batch the
monitor recomputes ‖x·W_{e}ᵀ‖₂ for each selected expert e under ``no_grad`` (one [m, D] x [D, F] product per
expert present), so it needs no hook inside the experts and costs O(M·K·D·F) on logging steps only.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_moe.adapters import Projection, RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.callbacks.plots import new_figure
from lightning_moe.metrics.geometry import ScoreActivationCoupling, projection_norms_N, router_geometry
from lightning_moe.utils import check_choice, check_non_negative


class RouterGeometryMonitor(RoutingMonitor):
    """Logs, per MoE layer:

    * every ``every_n_steps`` steps, ``train/geometry/<layer>/<stat>`` from the router rows (linear router
      weights or centroids): ``mean_cosine`` (signed mean off-diagonal cosine, the paper's Fig. 3 number),
      ``nn_cosine``, ``effective_rank``, ``common_energy``;
    * ``<stage>/coupling/<layer>/spearman``: Spearman ρ between each selected expert's dispatch weight and that
      expert's ``projection`` norm ‖x·W_{e}ᵀ‖₂, z-scored per expert (paper ρ = 0.43). Training samples
      ``coupling_tokens`` tokens of the batch at each logging step; validation samples that many per batch and
      pools the epoch.

    Layers whose adapter cannot give router rows or expert weights skip those statistics.

    Plot ``geometry_<stage>.png``: mean z-scored activation norm per dispatch-weight decile, per layer (rising =
    coupled).

    Args:
        coupling_tokens: tokens sampled per batch for the coupling statistic; 0 turns it off.
        projection: ``gate`` (pre-activation gate projection, the authors' script) or ``up`` (the GLU's linear
            branch, the paper's cleaner prediction); for single-projection experts both are that projection.
        center: subtract the mean router row before cosines and effective rank (OLMo-core's centered variant).
        seed: seed of the token sampling; draw i uses ``seed + i`` (i is checkpointed), so runs and resumes
            reproduce.
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "geometry"

    def __init__(
        self,
        coupling_tokens: int = 256,
        projection: Projection = "gate",
        center: bool = False,
        seed: int = 0,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__(**monitor_kwargs)
        check_non_negative("coupling_tokens", coupling_tokens)
        check_choice("projection", projection, ("gate", "up"))
        self.coupling_tokens, self.projection, self.center, self.seed = int(coupling_tokens), projection, center, seed
        self.needs_inputs = self.coupling_tokens > 0
        self.latest_deciles: dict[Stage, dict[str, Tensor]] = {}
        self._samples_drawn = 0

    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer, tap in self.taps.items():
            self.add_metric(layer, "coupling", partial(ScoreActivationCoupling, tap.num_experts))

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        if not (logging_now and self.coupling_tokens and event.x_TD is not None):
            return
        weight_EFD = self.tap_of(event).expert_weight_EFD(self.projection)
        if weight_EFD is None:
            return
        keep_TK = event.kept_TK(self.batch_mask_T(event, batch))
        tokens_M = torch.arange(event.num_tokens, device=event.experts_TK.device)
        if keep_TK is not None:
            tokens_M = tokens_M[keep_TK.any(dim=1)]
        if tokens_M.numel() > self.coupling_tokens:
            g = torch.Generator().manual_seed(self.seed + self._samples_drawn)
            pick = torch.randperm(tokens_M.numel(), generator=g)[: self.coupling_tokens]
            tokens_M = tokens_M[pick.to(tokens_M.device)]
        self._samples_drawn += 1
        # One pair per counted (sampled token, slot).
        token_MK = tokens_M[:, None].expand(-1, event.experts_TK.shape[1])
        pair_MK = keep_TK[tokens_M] if keep_TK is not None else torch.ones_like(token_MK, dtype=torch.bool)
        token_N, experts_N = token_MK[pair_MK], event.experts_TK[tokens_M][pair_MK]
        with torch.no_grad():
            norms_N = projection_norms_N(event.x_TD[token_N], experts_N, weight_EFD)
        weights_N = event.weights_TK[tokens_M][pair_MK]
        self.update_metric(stage, event.layer, "coupling", weights_N, norms_N, experts_N)

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if stage == "train":
            for layer, tap in self.taps.items():
                rows_ED = tap.router_weight_ED()
                if rows_ED is not None:
                    out.update({f"geometry/{layer}/{k}": v for k, v in router_geometry(rows_ED, self.center).items()})
        for layer in self._has_data(stage, "coupling"):
            result = self.metric(stage, layer, "coupling").compute()
            self.latest_deciles.setdefault(stage, {})[layer] = result["decile_means"].detach().float().cpu()
            out[f"coupling/{layer}/spearman"] = result["spearman"]
        return out

    def _plot(self, directory: Path) -> None:
        for stage, deciles in self.latest_deciles.items():
            made = new_figure(1, panel_size=(6.0, 3.5))
            if made is None:
                return
            fig, (ax,) = made
            for layer, means in deciles.items():
                ax.plot(range(1, 11), means.numpy(), marker="o", label=layer)
            ax.axhline(0, color="grey", linestyle=":")
            ax.set_xlabel("dispatch-weight decile")
            ax.set_ylabel(f"mean z-scored ||x W_{self.projection}^T||")
            ax.set_title(f"router score vs expert activation ({stage})", fontsize=9)
            ax.legend(fontsize=7)
            self.save_figure(fig, directory, stage)

    def _extra_state(self) -> dict[str, Any]:
        return {"latest_deciles": {s: dict(v) for s, v in self.latest_deciles.items()},
                "samples_drawn": self._samples_drawn}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.latest_deciles = {s: dict(v) for s, v in state["latest_deciles"].items()}
        self._samples_drawn = state["samples_drawn"]
