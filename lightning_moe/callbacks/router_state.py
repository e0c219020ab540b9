"""Apply stateful routers' per-step updates (bias balancing, K-Means centroids, precision) in any LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_moe.layers import update_router_states


class RouterStateUpdate(pl.Callback):
    """Call :func:`lightning_moe.layers.update_router_states` once per optimizer step, before the step.

    Add it to the trainer when your own LightningModule contains MoE layers with stateful routers
    (:class:`~lightning_moe.gating.SigmoidTopK`, :class:`~lightning_moe.gating.KMeansRouter`,
    :class:`~lightning_moe.gating.TransitionRouter` with precision or carried memory). The hook runs after all
    gradient-accumulation micro-batches, so the routers apply exactly one update from the statistics of the whole
    step. :class:`~lightning_moe.modules.MoELanguageModel` already does this itself; a module that does so
    declares the class attribute ``updates_router_states = True`` and the callback leaves it alone, so using both
    never updates twice.
    """

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(pl_module, "updates_router_states", False):
            return
        update_router_states(pl_module)
