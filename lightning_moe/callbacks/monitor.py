"""``RoutingMonitor``: what the four routing monitors share — tap discovery, one event per layer per batch,
logging cadence, metric state through checkpoints, plots next to the logs.

Legend: T tokens, K slots, E experts, B batch, S sequence.

Lifecycle: ``setup`` finds the model's MoE layers (:func:`~lightning_moe.adapters.find_taps`) and attaches one
hook per layer; each batch keeps the last event of each layer (a gradient-checkpointing recompute overwrites
rather than double-counts); ``on_*_batch_end`` feeds the batch's events to the subclass's torchmetrics states;
every ``every_n_steps`` optimizer steps the training window is computed (synchronised across DDP ranks by
torchmetrics), sent to every logger of the Trainer (``logger.log_metrics``) and reset; validation accumulates
over the whole epoch. The last value of every key is kept in ``monitor.logged``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.adapters import RoutingEvent, Tap, find_taps
from lightning_moe.callbacks.plots import matplotlib_available, plot_directory, save
from lightning_moe.utils import check_positive_int, write_json_atomic

Stage = Literal["train", "val"]
# Optimizer steps after which a monitor checks that stateful routers' statistics are being applied: late enough
# for any update schedule, early enough to save a run that forgot ``RouterStateUpdate``.
STALE_STATE_CHECK_STEP = 10


def check_artifact_name(artifact: str) -> None:
    if not isinstance(artifact, str) or not artifact or Path(artifact).name != artifact:
        raise ValueError(
            f"artifact must be a plain file name (it is written inside default_root_dir), got {artifact!r}."
        )


class RoutingMonitor(pl.Callback):
    """Base class of the routing monitors; subclasses implement ``_build``, ``_observe`` and ``_compute``.

    Args:
        every_n_steps: log the training window every this many optimizer steps; default the Trainer's
            ``log_every_n_steps``.
        layers: watch only these MoE layers (module paths in the LightningModule, e.g. ``model.blocks.0.ffn``);
            default every layer found.
        adapters: :class:`~lightning_moe.adapters.Tap` classes that recognise MoE layers, tried in order;
            default our ``MoELayer``, Hugging Face sparse MoE blocks and MegaBlocks layers.
        mask_key: batch key of a per-token mask (True/1 = real token); tokens outside it are not counted.
            Ignored when the batch has no such key.
        plots: write PNG figures (needs matplotlib) to ``<log_dir>/plots`` after each validation epoch and at the
            end of fit.
        sample_every: feed the training window the batches of one optimizer step in this many (steps 1, 1 + N,
            ..., and the logging step's always), so its statistics are estimates from that share of the window's
            batches; validation sees every batch. Default: the monitor's ``default_sample_every``: 1 for load
            balance (exact counts), geometry and transitions (switches are rare); 5 for specialisation,
            co-activation, margins and alarms, whose per-batch work would otherwise cost more than 5% of a small
            model's step (``benchmarks/README.md``).
    """

    needs_inputs = False  # whether taps must hand over the layer input x_TD
    name = "routing"
    default_sample_every = 1

    def __init__(
        self,
        every_n_steps: int | None = None,
        layers: Sequence[str] | None = None,
        adapters: Sequence[type[Tap]] | None = None,
        mask_key: str | None = "attention_mask",
        plots: bool = True,
        sample_every: int | None = None,
    ) -> None:
        if every_n_steps is not None:
            check_positive_int("every_n_steps", every_n_steps)
        sample_every = self.default_sample_every if sample_every is None else sample_every
        check_positive_int("sample_every", sample_every)
        self.every_n_steps = every_n_steps
        self.sample_every = sample_every
        self.layers = list(layers) if layers is not None else None
        self.adapters = list(adapters) if adapters is not None else None
        self.mask_key = mask_key
        self.plots = plots
        self.taps: dict[str, Tap] = {}
        self._state_key: str | None = None
        self.metrics: dict[str, Metric] = {}  # "<stage>/<layer>/<kind>" -> metric
        self.last_logged_step = -1
        self.logged: dict[str, float] = {}  # the last value logged under each key
        self.updated: set[str] = set()  # metric keys with data since their last reset
        self._events: dict[str, RoutingEvent] = {}
        self._pending_state: dict[str, Any] | None = None
        self._warned_no_matplotlib = False
        self._plot_loggers: list[Any] = []  # the Trainer's loggers while plotting: figures go to them too
        self._plot_step = 0
        self._warned_loggers: set[str] = set()  # logger types that failed to take a figure (warned once)
        self._device = torch.device("cpu")
        self._built_for: dict[str, int] | None = None  # layer -> num_experts the metrics were built for
        # Batches with no countable token (fully padded, or every label ignored), per stage: a guest skips and
        # counts them instead of raising inside the host's fit.
        self.skipped_batches: dict[str, int] = {"train": 0, "val": 0}
        self._warned_skip = False
        self.last_checked_state_step = -1

    # ----------------------------------------------------------------------------------------- subclass hooks
    def _build(self, pl_module: pl.LightningModule) -> None:
        """Create ``self.metrics`` for ``self.taps``."""

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        """Feed one layer's event of one batch to the metrics."""

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        """Scalars to log for ``stage`` (keys without the stage prefix), from the metrics."""
        return {}

    def _plot(self, directory: Path) -> None:
        """Write this monitor's figures (called on rank zero, matplotlib present)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def state_key(self) -> str:
        # Lightning asks for it on every hook call; it depends on constructor arguments only.
        if self._state_key is None:
            self._state_key = self._generate_state_key(layers=self.layers, **self._state_key_kwargs())
        return self._state_key

    def _state_key_kwargs(self) -> dict[str, Any]:
        return {}

    def _sink(self, event: RoutingEvent) -> None:
        self._events[event.layer] = event

    def metric(self, stage: Stage, layer: str, kind: str) -> Metric:
        return self.metrics[f"{stage}/{layer}/{kind}"]

    def add_metric(self, layer: str, kind: str, factory, stages: Sequence[Stage] = ("train", "val")) -> None:
        for stage in stages:
            metric = factory()
            metric.persistent(True)  # its states go into state_dict(), hence into the callback's checkpoint state
            self.metrics[f"{stage}/{layer}/{kind}"] = metric

    def update_metric(self, stage: Stage, layer: str, kind: str, *args: Any) -> None:
        key = f"{stage}/{layer}/{kind}"
        self.metrics[key].update(*args)
        self.updated.add(key)

    def batch_field(self, batch: Any, key: str, event: RoutingEvent) -> Tensor:
        """``batch[key]`` as one value per token of ``event``; errors name the key, the value and the fix."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{type(self).__name__} reads {key!r} from the batch, but the batch is a {type(batch).__name__}; "
                "use dict batches (e.g. {'tokens': ..., 'domain_ids': ...})."
            )
        if key not in batch:
            raise ValueError(
                f"{type(self).__name__}: the batch has no {key!r} (keys: {sorted(batch)}); add per-token "
                f"{key!r} to the batch, or point the monitor's key argument at the batch key that holds them."
            )
        value = batch[key]
        if not isinstance(value, Tensor) or value.numel() != event.num_tokens:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{type(self).__name__}: batch[{key!r}] has shape {shape} but layer {event.layer!r} routed "
                f"{event.num_tokens} tokens; it needs one value per token ([batch, seq])."
            )
        return value.to(event.experts_TK.device)

    def batch_mask_T(self, event: RoutingEvent, batch: Any) -> Tensor | None:
        """The batch's ``mask_key`` entry as one bool per token, or None when the batch has none."""
        if self.mask_key is None or not isinstance(batch, Mapping) or self.mask_key not in batch:
            return None
        return self.batch_field(batch, self.mask_key, event).reshape(-1).bool()

    def masked_labels(self, batch: Any, key: str, event: RoutingEvent) -> Tensor:
        """Per-token labels shaped like the batch entry, -1 (ignored by the metrics) where a token does not count."""
        labels = self.batch_field(batch, key, event)
        if labels.is_floating_point() or labels.is_complex():
            # .long() would silently truncate 0.9 to label 0.
            raise TypeError(
                f"{type(self).__name__}: batch[{key!r}] holds {labels.dtype} values; labels must be integer class "
                f"ids (negative = ignored). Build them as int64, or point the monitor at the batch key that holds them."
            )
        labels = labels.long()
        keep_T = event.kept_T(self.batch_mask_T(event, batch))
        return labels if keep_T is None else labels.masked_fill(~keep_T.view(labels.shape), -1)

    def _label_keys(self) -> tuple[str, ...]:
        """Batch keys of per-token labels whose negative values mean "ignored"; a batch with none left is skipped."""
        return ()

    def _skip_reason(self, event: RoutingEvent, batch: Any) -> str | None:
        """Why this batch has no token to count, or None. One host sync per batch (not per layer): it runs after
        the batch, outside the model's forward."""
        keep_T = event.kept_T(self.batch_mask_T(event, batch))
        if keep_T is not None and not bool(keep_T.any()):
            return f"every token is masked out by batch[{self.mask_key!r}]"
        for key in self._label_keys():
            valid_T = self.batch_field(batch, key, event).reshape(-1) >= 0
            if keep_T is not None:
                valid_T = valid_T & keep_T
            if not bool(valid_T.any()):
                return f"every unmasked token has a negative (ignored) label in batch[{key!r}]"
        return None

    def tap_of(self, event: RoutingEvent) -> Tap:
        return self.taps[event.layer]

    # ------------------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for tap in self.taps.values():
            tap.remove()
        taps = find_taps(pl_module, self.adapters, self.layers)
        if not taps:
            rank_zero_warn(
                f"{type(self).__name__} found no MoE layer in {type(pl_module).__name__}; it will log nothing. "
                "Pass adapters=[YourTap] for a model family it does not know."
            )
        self.taps = {t.name: t.attach(self._sink, self.needs_inputs) for t in taps}
        signature = {name: tap.num_experts for name, tap in self.taps.items()}
        if signature != self._built_for:
            self.metrics, self._device = {}, torch.device("cpu")
            self._build(pl_module)
            self._built_for = signature
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for tap in self.taps.values():
            tap.remove()
        self._events.clear()

    def _to_device(self, device: torch.device) -> None:
        # Metrics are not submodules of the LightningModule, so Lightning does not move them: follow the events.
        if device != self._device:
            for m in self.metrics.values():
                m.to(device)
            self._device = device

    def _consume(self, stage: Stage, batch: Any, logging_now: bool) -> None:
        events, self._events = self._events, {}
        events = {layer: e for layer, e in events.items() if layer in self.taps}
        first = next(iter(events.values()), None)
        reason = self._skip_reason(first, batch) if first is not None else None
        if reason is not None:
            self.skipped_batches[stage] += 1
            if not self._warned_skip:
                rank_zero_warn(
                    f"{type(self).__name__} skipped a {stage} batch with no countable token ({reason}); it counts "
                    f"such batches in `skipped_batches` and warns only once."
                )
                self._warned_skip = True
            return
        for event in events.values():
            self._to_device(event.experts_TK.device)
            self._observe(stage, event, batch, logging_now)

    def _log(self, trainer: pl.Trainer, stage: Stage, pl_module: pl.LightningModule | None = None) -> None:
        values = self._compute(stage)  # collective under DDP: every rank computes
        for key, m in self.metrics.items():
            if key.startswith(stage + "/"):
                m.reset()
                self.updated.discard(key)
        if not values:
            return
        metrics = {f"{stage}/{k}": float(v) for k, v in values.items()}
        self.logged.update(metrics)
        if pl_module is not None:
            # Validation values, once per validation run, go through ``log_dict`` so they reach
            # ``trainer.callback_metrics``: checkpoint/early-stopping monitors and study reports can use them.
            # They are already reduced over ranks, hence no sync_dist.
            pl_module.log_dict(metrics)
            return
        # Training values go straight to the loggers (rank zero; values are already reduced over ranks): ``self.log`` costs ~0.2 ms
        # per key, a few hundred keys per logging step here, and would drop values off the Trainer's
        # ``log_every_n_steps`` grid.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _has_data(self, stage: Stage, kind: str) -> list[str]:
        """Layers whose ``kind`` metric of ``stage`` has been updated since its last reset (or holds restored data)."""
        return [layer for layer in self.taps if f"{stage}/{layer}/{kind}" in self.updated]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._events.clear()

    def _check_router_states(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Warn once when a stateful router's pending statistics were never applied (no ``update_router_states``);
        returns the stale routers' module paths (:class:`~lightning_moe.callbacks.RoutingAlarms` raises its flag)."""
        from lightning_moe.gating import Router  # here: the callbacks import the adapters, not the routers, at load

        stale = [
            name for name, m in pl_module.named_modules()
            if isinstance(m, Router) and any(bool(getattr(m, p).abs().sum() > 0) for p in m._pending)
        ]
        if stale:
            rank_zero_warn(
                f"{type(self).__name__}: after {trainer.global_step} optimizer steps the stateful routers {stale} "
                "still hold statistics that were never applied, so their state (bias, centroids) never changes. "
                "Add lightning_moe.callbacks.RouterStateUpdate() to the Trainer's callbacks, or call "
                "lightning_moe.update_router_states(model) before each optimizer step."
            )
        return stale

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == STALE_STATE_CHECK_STEP and self.last_checked_state_step != step:
            self.last_checked_state_step = step
            self._check_router_states(trainer, pl_module)
        every = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        # every == 0 (Trainer(log_every_n_steps=0)): no training logs; the window keeps accumulating.
        logging_now = every > 0 and step != self.last_logged_step and step % every == 0
        # Step 1 is always sampled, so a batch a monitor cannot read fails at once, not sample_every steps in.
        if logging_now or (step - 1) % self.sample_every == 0:
            self._consume("train", batch, logging_now)
        else:
            self._events.clear()
        if logging_now:
            self.last_logged_step = step
            self._log(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._events.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            self._events.clear()
            return
        self._consume("val", batch, True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._log(trainer, "val", pl_module)
        self._save_plots(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_plots(trainer)

    def _save_plots(self, trainer: pl.Trainer) -> None:
        if not self.plots:
            return
        # ``trainer.log_dir`` broadcasts from rank zero under DDP: every rank must ask, only rank zero draws.
        directory = plot_directory(trainer)
        if not trainer.is_global_zero:
            return
        if not matplotlib_available():
            if not self._warned_no_matplotlib:
                rank_zero_warn(
                    f"matplotlib is not installed: {type(self).__name__} skips its plots. "
                    "Install it with `pip install 'lightning-moe[plots]'` or pass plots=False."
                )
                self._warned_no_matplotlib = True
            return
        self._plot_loggers, self._plot_step = trainer.loggers, trainer.global_step
        self._plot(directory)

    @staticmethod
    def write_artifact(trainer: pl.Trainer, name: str, data: dict[str, Any]) -> None:
        """Write ``data`` as JSON to ``<default_root_dir>/<name>`` on rank zero: a monitor's per-run results
        (curves, matrices) for offline analysis and study reports."""
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, data)

    def save_figure(self, fig, directory: Path, stem: str) -> Path:
        """Save ``fig`` as ``<name>_<stem>.png`` and hand it to the Trainer's loggers that take images."""
        return save(fig, directory / f"{self.name}_{stem}.png", self._plot_loggers, self._plot_step,
                    self._warned_loggers)

    # ------------------------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "metrics": {key: _map_states(m.state_dict(), lambda t: t.cpu()) for key, m in self.metrics.items()},
            "updated": sorted(self.updated),
            "last_logged_step": self.last_logged_step,
            "skipped_batches": dict(self.skipped_batches),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after ``setup``; if setup has not built the metrics yet, apply at setup
        # (a monitor without metrics is built too, once setup has run).
        if self._built_for is not None:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["metrics"]) - set(self.metrics))
        if unknown:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint has state for {unknown} that this model does not have "
                "(a different model or `layers` choice?); that state is dropped."
            )
        for key, saved in state["metrics"].items():
            if key in self.metrics:
                m = self.metrics[key]
                m.load_state_dict(_map_states(saved, lambda t, d=m.device: t.to(d)))
        self.updated = {key for key in state["updated"] if key in self.metrics}
        self.last_logged_step = state["last_logged_step"]
        self.skipped_batches.update(state.get("skipped_batches", {}))  # absent in checkpoints of older versions
        self._load_extra_state(state["extra"])


def _map_states(states: dict[str, Any], fn) -> dict[str, Any]:
    """Apply ``fn`` to every tensor of a metric's state dict (a ``cat`` state is a list of tensors)."""
    return {k: [fn(t) for t in v] if isinstance(v, list) else fn(v) for k, v in states.items()}
