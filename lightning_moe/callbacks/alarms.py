"""``RoutingAlarms``: one clear warning and a logged 0/1 flag for each way MoE training silently goes wrong.

Legend: T tokens, K slots, E experts, L watched layers.

Every alarm is a guest's remark: it warns once (``rank_zero_warn``), raises its flag ``train/alarm/<kind>`` and
never raises or changes what the model computes. What an alarm measures is reduced over ranks (or is the same on
every rank by construction), so the counters and flags are identical across DDP replicas; they go into the
callback's checkpoint state, so a resumed run neither forgets a streak nor warns twice.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters import HuggingFaceMoeTap, MoELayerTap, RoutingEvent, Tap
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.gating.base import all_reduce_sum_
from lightning_moe.metrics.load import ExpertLoad, load_stats
from lightning_moe.utils import check_positive, check_positive_int

# The alarms, in the order they are logged and shown.
ALARMS: dict[str, str] = {
    "no_router_grad": "router gets no or vanishing gradient",
    "no_balance_loss": "no balance loss",
    "stale_router_state": "stateful router never updated",
    "collapse": "routing collapse",
    "softmaxed_logits": "logits are already probabilities",
}
# Aux-loss keys that do not balance load (the z-loss only keeps logits small).
NOT_BALANCING = frozenset({"z_loss"})
# A row of "logits" is read as a probability distribution when all entries are >= 0 and it sums to 1 within this
# (fp32 softmax rows sum to 1 within ~1e-6; genuine logits essentially never satisfy both on every row).
DISTRIBUTION_TOL = 1e-4


def is_distribution(logits_TE: Tensor) -> Tensor:
    """Bool scalar tensor: every row is non-negative and sums to 1 (no host sync)."""
    x_TE = logits_TE.detach().float().reshape(-1, logits_TE.shape[-1])
    return (x_TE >= 0).all() & ((x_TE.sum(dim=-1) - 1).abs() <= DISTRIBUTION_TOL).all()


def router_of(tap: Tap) -> nn.Module | None:
    """The router module a tap reads (our layer's ``router``, a Hugging Face block's ``gate``/``router``)."""
    router = getattr(tap, "router", None)
    return router if router is not None else getattr(tap.module, "router", None)


class RoutingAlarms(RoutingMonitor):
    """Watches a training run for five routing failures and flags each one once.

    * ``no_router_grad``: a router's gradient norm is below ``min_grad_ratio`` x its weight norm (or absent) at
      ``patience`` consecutive checks (every ``every_n_steps`` optimizer steps, before the step): a detached
      router, or top-1 with renormalised weights (weight p/p = 1 has no gradient).
    * ``no_balance_loss``: a layer that could balance trains without it: our ``MoELayer`` whose router returns
      no aux loss but the z-loss and keeps no state (not bias-balanced, not expert choice); a Hugging Face model
      whose output has no ``aux_loss`` (``output_router_logits`` off) or whose ``router_aux_loss_coef`` is 0.
    * ``stale_router_state``: a stateful router's statistics were never applied after 10 optimizer steps (the
      monitors' own check, :class:`RoutingMonitor`; add ``RouterStateUpdate``).
    * ``collapse``: for ``patience`` consecutive training windows, one expert serves a share of the tokens above
      ``K/E + collapse_share * (1 - K/E)`` (``collapse_share`` of the way from uniform to every token), or more
      experts are dead than at the first window.
    * ``softmaxed_logits``: what should be logits is already a probability distribution on every row of a
      window (rows >= 0 summing to 1): our routers' ``Routing.logits_TE`` (the z-loss input), or a Hugging Face
      model's ``router_logits`` (its balance loss applies softmax again; transformers#45120).

    ``fired`` maps each alarm to the layers (or models) it fired for.

    Args:
        patience: consecutive checks a condition must hold before its alarm fires.
        min_grad_ratio: gradient norm / weight norm below which a router counts as getting no gradient.
        collapse_share: see ``collapse`` above, in (0, 1).
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "alarm"
    default_sample_every = 5  # a diagnostic: one step in five estimates the window (RoutingMonitor)

    def __init__(self, patience: int = 3, min_grad_ratio: float = 1e-8, collapse_share: float = 0.5,
                 **monitor_kwargs: Any) -> None:
        check_positive_int("patience", patience)
        check_positive("min_grad_ratio", min_grad_ratio)
        share_ok = isinstance(collapse_share, (int, float)) and not isinstance(collapse_share, bool)
        if not share_ok or not 0 < collapse_share < 1:
            raise ValueError(f"collapse_share must be a number in (0, 1), got {collapse_share!r}; 0.5 means an "
                             "expert halfway from its uniform share to serving every token.")
        monitor_kwargs.setdefault("plots", False)
        super().__init__(**monitor_kwargs)
        self.patience, self.min_grad_ratio, self.collapse_share = patience, float(min_grad_ratio), float(collapse_share)
        self.fired: dict[str, list[str]] = {kind: [] for kind in ALARMS}
        self.streaks: dict[str, int] = {}  # "<kind>:<layer>" -> consecutive checks the condition held
        self.first_dead: dict[str, float] = {}  # layer -> dead experts at its first window
        self._balance: dict[str, bool] = {}  # layer/model -> whether it trains with a balance loss
        self._top_k: dict[str, int] = {}
        self._softmaxed: dict[str, Tensor] = {}  # layer/model -> [windows with distribution rows, windows seen]
        self._hf_handles: list[RemovableHandle] = []

    # -------------------------------------------------------------------------------------------- monitor hooks
    def _build(self, pl_module: pl.LightningModule) -> None:
        for layer, tap in self.taps.items():
            self.add_metric(layer, "load", partial(ExpertLoad, tap.num_experts), stages=("train",))

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        if stage != "train":
            return
        layer, tap = event.layer, self.tap_of(event)
        keep_TK = event.kept_TK(self.batch_mask_T(event, batch))
        experts_N = event.experts_TK.reshape(-1) if keep_TK is None else event.experts_TK[keep_TK]
        self.update_metric(stage, layer, "load", experts_N)
        if event.mask_TK is None:
            self._top_k[layer] = event.experts_TK.shape[1]
        if isinstance(tap, MoELayerTap):
            routing, router = tap.module.routing, tap.module.router
            if layer not in self._balance:
                balanced = any(k not in NOT_BALANCING for k in routing.aux_losses)
                self._balance[layer] = balanced or bool(router._pending) or routing.mask_TK is not None
            if routing.logits_TE is not None and logging_now:
                # A structural property of the router, so one batch per window tells: the [T, E] check runs at
                # logging steps only.
                self._count_softmaxed(layer, is_distribution(routing.logits_TE))

    def _count_softmaxed(self, key: str, flag: Tensor) -> None:
        counts = self._softmaxed.get(key)
        one = torch.stack([flag.float(), torch.ones((), device=flag.device)])
        self._softmaxed[key] = one if counts is None else counts.to(flag.device) + one

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        if stage != "train":
            return {}
        self._check_collapse()
        self._check_softmaxed()
        missing = [key for key, balanced in self._balance.items() if not balanced]
        if missing:
            self.fire("no_balance_loss", missing,
                      "add a balance loss (SoftmaxTopK(load_balancing_weight=0.01); for Hugging Face models "
                      "output_router_logits=True with router_aux_loss_coef > 0) or a bias-balanced router "
                      "(SigmoidTopK), or expect collapse")
        return {f"alarm/{kind}": torch.tensor(float(bool(self.fired[kind]))) for kind in ALARMS}

    def _check_router_states(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        stale = super()._check_router_states(trainer, pl_module)  # warns itself, naming the fix
        if stale and not self.fired["stale_router_state"]:
            self.fired["stale_router_state"] = list(stale)
        return stale

    # --------------------------------------------------------------------------------------------- the checks
    def fire(self, kind: str, where: list[str], fix: str) -> None:
        """Raise ``kind``'s flag for ``where`` and warn, once per alarm."""
        if self.fired[kind]:
            return
        self.fired[kind] = list(where)
        rank_zero_warn(f"RoutingAlarms [{kind}]: {ALARMS[kind]} in {where}; {fix}. Training goes on; the flag "
                       f"train/alarm/{kind} is 1 from now on.")

    def _streak(self, kind: str, layer: str, holds: bool) -> bool:
        key = f"{kind}:{layer}"
        self.streaks[key] = self.streaks.get(key, 0) + 1 if holds else 0
        return self.streaks[key] >= self.patience

    def _check_collapse(self) -> None:
        collapsed, detail = [], ""
        for layer in self._has_data("train", "load"):
            counts_E = self.metric("train", layer, "load").compute()["counts_E"]  # reduced over ranks
            E, K = counts_E.numel(), self._top_k.get(layer)
            if K is None or K >= E:
                continue  # expert choice (capacity-bound) or every expert always chosen: nothing can collapse
            dead = float(load_stats(counts_E)["dead_experts"])
            top_share = float(counts_E.max() * K / counts_E.sum())  # share of tokens that select the top expert
            threshold = K / E + self.collapse_share * (1 - K / E)
            first = self.first_dead.setdefault(layer, dead)
            if self._streak("collapse", layer, top_share > threshold or dead > first):
                collapsed.append(layer)
                detail = (f"top expert serves {top_share:.0%} of tokens (threshold {threshold:.0%}), {dead:.0f} dead "
                          f"experts (first window: {first:.0f}) for {self.patience} windows in {layer!r}")
        if collapsed:
            self.fire("collapse", collapsed, f"{detail}; raise the balance loss weight, lower the learning rate, or "
                      "use a bias-balanced router (SigmoidTopK)")

    def _check_softmaxed(self) -> None:
        keys = sorted(self._softmaxed)
        if not keys:
            return
        counts_L2 = torch.stack([self._softmaxed[k] for k in keys])
        all_reduce_sum_(counts_L2)  # every rank's windows: a flag raised on one rank is raised on all
        self._softmaxed.clear()
        bad = [k for k, (hits, seen) in zip(keys, counts_L2.tolist()) if seen > 0 and hits == seen]
        if bad:
            self.fire("softmaxed_logits", bad, "pass the router's pre-softmax logits where logits are expected (the "
                      "z-loss and Hugging Face's balance loss apply softmax themselves)")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        every = self.every_n_steps if self.every_n_steps is not None else max(1, trainer.log_every_n_steps)
        if trainer.global_step % every or self.fired["no_router_grad"]:
            return
        layers, ratios = [], []
        for layer, tap in self.taps.items():
            router = router_of(tap)
            params = [p for p in router.parameters() if p.requires_grad] if router is not None else []
            if not params:
                continue  # no trainable router weights (centroid routers, a router frozen on purpose)
            weight = torch.stack([p.detach().float().square().sum() for p in params]).sum().sqrt()
            grads = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
            grad = torch.stack(grads).sum().sqrt() if grads else torch.zeros((), device=weight.device)
            layers.append(layer)
            ratios.append(grad / weight.clamp_min(torch.finfo(torch.float32).tiny))
        if not layers:
            return
        ratio_L = torch.stack(ratios)
        all_reduce_sum_(ratio_L)  # DDP gradients are already equal; the mean makes the decision identical anyway
        ratio_L = ratio_L / trainer.world_size
        starved = [layer for layer, r in zip(layers, ratio_L.tolist())
                   if self._streak("no_router_grad", layer, r < self.min_grad_ratio)]
        if starved:
            self.fire("no_router_grad", starved, f"gradient norm / weight norm < {self.min_grad_ratio:g} for "
                      f"{self.patience} checks: check that the router's weights are not detached, and that with "
                      "top-1 the weights are not renormalised (p/p = 1 carries no gradient)")

    # ------------------------------------------------------------------------------------ Hugging Face models
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._remove_hf_hooks()
        hf_taps = [t for t in self.taps.values() if isinstance(t, HuggingFaceMoeTap)]
        if not hf_taps:
            return
        inside: str | None = None
        for name, module in pl_module.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            config = getattr(module, "config", None)
            if hasattr(config, "router_aux_loss_coef") and hasattr(config, "output_router_logits"):
                # The outermost model with an MoE config: its output carries aux_loss and router_logits.
                loss_free = any(hasattr(t.router, "e_score_correction_bias") for t in hf_taps)
                self._hf_handles.append(module.register_forward_hook(partial(self._on_hf_output, name or "model",
                                                                             loss_free)))
                inside = name + "."

    def _on_hf_output(self, name: str, loss_free: bool, module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training:
            return
        try:  # a guest never raises inside the host's forward
            coef = float(getattr(module.config, "router_aux_loss_coef", 0.0) or 0.0)
            if name not in self._balance:
                self._balance[name] = loss_free or (getattr(output, "aux_loss", None) is not None and coef > 0)
            logits = getattr(output, "router_logits", None)
            if isinstance(logits, (tuple, list)) and logits and all(isinstance(t, Tensor) for t in logits):
                self._count_softmaxed(name, torch.stack([is_distribution(t) for t in logits]).all())
        except Exception:  # noqa: BLE001
            pass

    def _remove_hf_hooks(self) -> None:
        for handle in self._hf_handles:
            handle.remove()
        self._hf_handles = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hf_hooks()

    # ------------------------------------------------------------------------------------ checkpoint state
    def _extra_state(self) -> dict[str, Any]:
        return {"fired": {k: list(v) for k, v in self.fired.items()}, "streaks": dict(self.streaks),
                "first_dead": dict(self.first_dead), "balance": dict(self._balance), "top_k": dict(self._top_k)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.fired = {kind: list(state["fired"].get(kind, [])) for kind in ALARMS}
        self.streaks, self.first_dead = dict(state["streaks"]), dict(state["first_dead"])
        self._balance, self._top_k = dict(state["balance"]), dict(state["top_k"])
