"""``SpecializationMonitor``: how much each layer's experts specialise to a per-token label and to token ids
(baselines §4.11).

Legend: T tokens, K slots, E experts, C label classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.callbacks.plots import heatmap, new_figure
from lightning_moe.metrics.specialization import LabelSpecialization, TokenSpecialization
from lightning_moe.utils import check_positive_int


class SpecializationMonitor(RoutingMonitor):
    """Logs, per MoE layer, ``<stage>/spec/<layer>/<stat>`` for the label in ``batch[label_key]``:
    ``mi``, ``nmi`` (arithmetic normalisation 2I/(H(C)+H(E)), scikit-learn's default), ``nmi_geometric``,
    ``purity_expert``, ``purity_class`` — each over all K slots, the top-1 slot (``_top1``) and summed routing
    probabilities (``_soft``) — and, when ``token_key`` is set, OLMoE's ``token_specialization`` and
    ``token_specialization_weighted`` for token ids (see :mod:`lightning_moe.metrics.specialization`).

    Plot ``spec_<stage>.png``: per layer, the OLMoE label x expert share matrix DS (% of each label's
    assignments per expert; uniform = 100/E %).

    Args:
        num_labels: number of label classes C; labels must lie in [0, C) (negative labels are ignored).
        label_key: batch key of the per-token labels (``[batch, seq]``), e.g. ``domain_ids`` or ``task_ids``.
        token_key: batch key of the token ids for token-id specialisation; None = skip it.
        vocab_size: number of token ids; default the LightningModule's ``hparams.vocab_size``.
        label_names: names of the classes for the plot's axis; default their indices.
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key``, ``plots``, ``sample_every`` of
            :class:`RoutingMonitor`.
    """

    name = "spec"
    default_sample_every = 5  # a diagnostic: one step in five estimates the window (RoutingMonitor)

    def __init__(
        self,
        num_labels: int,
        label_key: str = "domain_ids",
        token_key: str | None = "tokens",
        vocab_size: int | None = None,
        label_names: Sequence[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__(**monitor_kwargs)
        check_positive_int("num_labels", num_labels)
        if vocab_size is not None:
            check_positive_int("vocab_size", vocab_size)
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_labels={num_labels}; give one name per class."
            )
        self.num_labels, self.label_key, self.token_key = num_labels, label_key, token_key
        self.vocab_size = vocab_size
        self.label_names = list(label_names) if label_names is not None else [str(c) for c in range(num_labels)]
        self.latest_share: dict[Stage, dict[str, Tensor]] = {}

    def _state_key_kwargs(self) -> dict[str, Any]:
        return {"label_key": self.label_key}

    def _build(self, pl_module: pl.LightningModule) -> None:
        vocab_size = self.vocab_size
        if self.token_key is not None and vocab_size is None:
            vocab_size = getattr(pl_module, "hparams", {}).get("vocab_size")
            if vocab_size is None:
                raise ValueError(
                    f"SpecializationMonitor(token_key={self.token_key!r}) measures token-id specialisation, which "
                    f"needs the vocabulary size: vocab_size=None and {type(pl_module).__name__} has no "
                    "hparams.vocab_size. Pass vocab_size=<tokenizer vocabulary size>, or token_key=None to skip "
                    "token-id specialisation."
                )
        for layer, tap in self.taps.items():
            self.add_metric(layer, "label", partial(LabelSpecialization, self.num_labels, tap.num_experts))
            if self.token_key is not None:
                self.add_metric(layer, "token", partial(TokenSpecialization, vocab_size, tap.num_experts))

    def _label_keys(self) -> tuple[str, ...]:
        return (self.label_key,)

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        labels_T = self.masked_labels(batch, self.label_key, event).reshape(-1)
        top1_T = event.top1_experts_T()
        mass_TE = event.routing_mass_TE(self.tap_of(event).num_experts)
        self.update_metric(stage, event.layer, "label", labels_T, event.experts_TK, top1_T, mass_TE, event.mask_TK)
        if self.token_key is not None:
            tokens_T = self.masked_labels(batch, self.token_key, event).reshape(-1)
            self.update_metric(stage, event.layer, "token", tokens_T, top1_T)

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._has_data(stage, "label"):
            stats = self.metric(stage, layer, "label").compute()
            self.latest_share.setdefault(stage, {})[layer] = stats.pop("share_CE").detach().float().cpu()
            if self.token_key is not None:
                stats.update(self.metric(stage, layer, "token").compute())
            out.update({f"spec/{layer}/{k}": v for k, v in stats.items()})
        return out

    def _plot(self, directory: Path) -> None:
        for stage, shares in self.latest_share.items():
            made = new_figure(len(shares), panel_size=(6.0, 1.8 + 0.35 * self.num_labels))
            if made is None:
                return
            fig, axes = made
            for ax, (layer, share_CE) in zip(axes, shares.items()):
                E = share_CE.shape[1]
                heatmap(fig, ax, share_CE * 100, f"{layer} ({stage}): share of each label's assignments "
                        f"(uniform {100 / E:.0f}%)", "expert", self.label_key, "% of the label's assignments",
                        xticks=[str(e) for e in range(E)], yticks=self.label_names, cmap="viridis", vmin=0)
            self.save_figure(fig, directory, stage)

    def _extra_state(self) -> dict[str, Any]:
        return {"latest_share": {s: dict(v) for s, v in self.latest_share.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.latest_share = {s: dict(v) for s, v in state["latest_share"].items()}
