"""``RoutingTraceWriter``: per-token routing decisions of sampled training steps, written to Parquet for offline
analysis, and :func:`read_routing_traces` to load them back.

Legend: T tokens of a batch (flattened batch*sequence), K slots, E experts, B batch, S sequence, N sampled tokens.

Row layout: one row per (step, layer, sampled token), columns ``step`` (the optimizer step count after the batch,
as the monitors log it), ``rank``, ``batch_idx``, ``layer``, ``sample`` (row in the batch), ``position`` (in the
sequence), one column per ``label_keys`` entry, and list columns ``experts`` (int), ``weights`` (float32) and
optionally ``scores`` (float32, all E). Expert-choice layers write all their padded slots (weight 0 where an
expert did not choose the token). pyarrow and datasets are imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_moe.adapters import RoutingEvent
from lightning_moe.callbacks.monitor import RoutingMonitor, Stage
from lightning_moe.utils import check_positive_int

SHARD_GLOB = "traces-step*-rank*.parquet"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise ImportError("Routing traces are written as Parquet and need pyarrow: `pip install pyarrow`.") from err
    return pyarrow


class RoutingTraceWriter(RoutingMonitor):
    """Writes, every ``every_n_steps`` optimizer steps, the routing of up to ``tokens_per_step`` tokens of that
    step's training batch, for every MoE layer, to ``<dirpath>/traces-step<step>-rank<rank>.parquet``.

    Tokens are drawn without replacement by a generator seeded with ``(seed, step)``: the same steps trace the
    same positions in every run, resumed or not, and every layer traces the same tokens so rows join across
    layers. Tokens outside the batch's ``mask_key`` mask (padding) are never drawn.

    One shard per rank per traced step, so DDP ranks never collide. On resume the writer continues from its
    checkpointed state (``rows_written``, ``bytes_written``, ``shards``): shards listed there are never touched;
    a shard of a later step left by the interrupted run is replaced when the resumed run traces that step again,
    so no step is counted twice. Once a shard would push this rank's bytes past ``max_bytes`` the writer stops
    and warns once.

    Args:
        dirpath: where shards go; default ``<log_dir>/routing_traces`` (the first logger's directory, else the
            Trainer's ``default_root_dir``).
        tokens_per_step: tokens traced per traced step (and per layer); None = every token of the batch.
        scores: also write each token's router scores over all E experts (E floats per row).
        label_keys: batch keys of per-token values (``[batch, seq]``) to write as columns, e.g.
            ``("tokens", "domain_ids")``; a key missing from a batch is an error naming it.
        max_bytes: disk budget of this rank's shards in bytes; None = unbounded.
        seed: seed of the token draw.
        monitor_kwargs: ``every_n_steps``, ``layers``, ``adapters``, ``mask_key`` of :class:`RoutingMonitor`.
    """

    name = "traces"

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        tokens_per_step: int | None = 256,
        scores: bool = False,
        label_keys: Sequence[str] = (),
        max_bytes: int | None = 1 << 30,
        seed: int = 0,
        **monitor_kwargs: Any,
    ) -> None:
        monitor_kwargs.setdefault("plots", False)
        super().__init__(**monitor_kwargs)
        if tokens_per_step is not None:
            check_positive_int("tokens_per_step", tokens_per_step)
        if max_bytes is not None:
            check_positive_int("max_bytes", max_bytes)
        if isinstance(label_keys, str):
            raise TypeError(f"label_keys must be a sequence of batch keys, got the string {label_keys!r}; "
                            f"write label_keys=[{label_keys!r}].")
        _pyarrow()  # fail at construction, not at the first traced step
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.tokens_per_step = tokens_per_step
        self.scores = scores
        self.label_keys = tuple(label_keys)
        self.max_bytes = max_bytes
        self.seed = seed
        self.rows_written = 0
        self.bytes_written = 0
        self.shards: list[str] = []
        self.stopped = False  # the budget is spent
        self._rank = 0
        self._batch_idx = self._step = 0
        self._rows: list[dict[str, Any]] = []  # this step's column chunks, one per layer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # ``trainer.log_dir`` broadcasts from rank zero under DDP, so every rank asks (and gets the same folder).
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self.dirpath = self.dirpath if self.dirpath is not None else root / "routing_traces"
        self._rank = trainer.global_rank
        # pyarrow builds its type and Parquet machinery on first use (~0.2-1 s): pay it here, not mid-training at
        # the first traced step.
        self._encode([{"step": torch.zeros(1, dtype=torch.int64), "layer": [""], "experts": torch.zeros(1, 1)}])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # For the rows; the base class decides whether this step is traced (the step count the monitors log).
        self._batch_idx, self._step = batch_idx, trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _tokens_N(self, event: RoutingEvent, batch: Any, step: int) -> Tensor:
        """The sampled token indices, sorted, on the CPU (a host sync after the batch, never in the forward)."""
        keep_T = event.kept_T(self.batch_mask_T(event, batch))
        candidates_N = torch.arange(event.num_tokens) if keep_T is None else keep_T.cpu().nonzero().squeeze(1)
        if self.tokens_per_step is None or self.tokens_per_step >= len(candidates_N):
            return candidates_N
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return candidates_N[torch.randperm(len(candidates_N), generator=g)[: self.tokens_per_step]].sort().values

    def _observe(self, stage: Stage, event: RoutingEvent, batch: Any, logging_now: bool) -> None:
        if stage != "train" or not logging_now or self.stopped:
            return
        step = self._step
        tokens_N = self._tokens_N(event, batch, step)
        index_N = tokens_N.to(event.experts_TK.device)
        shape = self._batch_shape(batch, event)
        columns: dict[str, Any] = {
            "step": torch.full((len(tokens_N),), step, dtype=torch.int64),
            "rank": torch.full((len(tokens_N),), self._rank, dtype=torch.int32),
            "batch_idx": torch.full((len(tokens_N),), self._batch_idx, dtype=torch.int64),
            "layer": [event.layer] * len(tokens_N),
            "sample": (tokens_N // shape[1]).int(),
            "position": (tokens_N % shape[1]).int(),
        }
        for key in self.label_keys:
            columns[key] = self.batch_field(batch, key, event).reshape(-1)[index_N].cpu()
        columns["experts"] = event.experts_TK[index_N].cpu()
        columns["weights"] = event.weights_TK.detach()[index_N].float().cpu()
        if self.scores and event.scores_TE is not None:
            columns["scores"] = event.scores_TE.detach()[index_N].float().cpu()
        self._rows.append(columns)

    def _batch_shape(self, batch: Any, event: RoutingEvent) -> tuple[int, int]:
        """``(B, S)`` of the batch's per-token tensors; ``(1, T)`` when no batch entry has one value per token."""
        if isinstance(batch, Mapping):
            for key in (*self.label_keys, self.mask_key, "tokens", "input_ids"):
                value = batch.get(key) if key is not None else None
                if isinstance(value, Tensor) and value.dim() == 2 and value.numel() == event.num_tokens:
                    return tuple(value.shape)
        return 1, event.num_tokens

    def _compute(self, stage: Stage) -> dict[str, Tensor]:
        if stage == "train" and self._rows:
            rows, self._rows = self._rows, []
            self._write(rows, self.last_logged_step)
        return {}

    @staticmethod
    def _encode(chunks: list[dict[str, Any]]):
        """The chunks as one table and its Parquet bytes."""
        pa = _pyarrow()
        names = list(chunks[0])
        table = pa.concat_tables([pa.table({n: _arrow(pa, c[n]) for n in names}) for c in chunks])
        sink = pa.BufferOutputStream()
        pa.parquet.write_table(table, sink)
        return table, sink.getvalue()

    def _write(self, chunks: list[dict[str, Any]], step: int) -> None:
        table, data = self._encode(chunks)
        if self.max_bytes is not None and self.bytes_written + data.size > self.max_bytes:
            self.stopped = True
            rank_zero_warn(
                f"RoutingTraceWriter stopped at step {step}: the next shard ({data.size} bytes) would exceed "
                f"max_bytes={self.max_bytes} ({self.bytes_written} bytes written in {len(self.shards)} shards). "
                "Raise max_bytes, or lower tokens_per_step or trace less often (every_n_steps)."
            )
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"traces-step{step:09d}-rank{self._rank:04d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data.to_pybytes())
        os.replace(tmp, path)  # a reader never sees half a shard
        self.shards.append(path.name)
        self.rows_written += table.num_rows
        self.bytes_written += data.size

    # ------------------------------------------------------------------------------------ checkpoint state
    def _extra_state(self) -> dict[str, Any]:
        return {"rows_written": self.rows_written, "bytes_written": self.bytes_written,
                "shards": list(self.shards), "stopped": self.stopped}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.rows_written, self.bytes_written = state["rows_written"], state["bytes_written"]
        self.shards, self.stopped = list(state["shards"]), state["stopped"]


def _arrow(pa, column: Any):
    """A Parquet column: int/float vectors as they are, ``[N, K]`` tensors as fixed-length list columns."""
    if isinstance(column, list):
        return pa.array(column, pa.string())
    values = column.numpy()
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def read_routing_traces(path: str | os.PathLike, format: str = "datasets"):
    """Load the shards under ``path`` (a folder written by :class:`RoutingTraceWriter`, or one shard) in step,
    then rank, order.

    Args:
        path: the traces folder or one ``.parquet`` shard.
        format: ``"datasets"`` for a ``datasets.Dataset`` (needs ``pip install datasets``), ``"arrow"`` for a
            ``pyarrow.Table``.
    """
    if format not in ("datasets", "arrow"):
        raise ValueError(f"Unknown format {format!r}; choose one of 'datasets', 'arrow'.")
    pa = _pyarrow()
    path = Path(path)
    files = sorted(path.glob(SHARD_GLOB)) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"no routing trace shard ({SHARD_GLOB}) at {str(path)!r}; point path at the folder "
                         "RoutingTraceWriter wrote (default <log_dir>/routing_traces).")
    table = pa.concat_tables([pa.parquet.read_table(f) for f in files])
    if format == "arrow":
        return table
    try:
        import datasets
    except ImportError as err:
        raise ImportError("read_routing_traces(format='datasets') needs `pip install datasets`; or pass "
                          "format='arrow' for a pyarrow Table.") from err
    return datasets.Dataset(table)
