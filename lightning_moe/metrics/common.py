"""Counting helpers and checks shared by the metrics.

Legend: N items (tokens or (token, slot) pairs), R row ids (labels, offsets), C column ids (experts), E experts.

Items to skip (a negative row id, or outside ``keep``) are sent to one extra bin that is then dropped, rather
than selected with a boolean mask: boolean indexing costs a ``nonzero`` and a gather (and a device sync on GPU)
on every update, which dominated the monitors' per-step cost. Counts use :func:`lightning_moe.utils.count_ids`
(``bincount`` reads the largest id back to the host on CUDA).

Id range checks (:func:`check_ids`) read the largest id on the host, which is free on CPU only: on a GPU they are
skipped, and the counting helpers send out-of-range ids to the dropped bin instead (a monitor steps aside; it
does not stall the host's training for its own checks, nor trip a device-side assert).
"""

from __future__ import annotations

from torch import Tensor

from lightning_moe.utils import count_ids, syncs_are_free


def check_ids(field: str, ids: Tensor, bound: int, fix: str) -> None:
    """Raise if any id is >= ``bound``, naming the field, the value and the fix; on CPU only (see above)."""
    if ids.numel() and syncs_are_free(ids):
        top = int(ids.max())
        if top >= bound:
            raise ValueError(f"{field} {top} is out of range for {bound} classes; {fix}.")


def _skipped_N(rows_N: Tensor, keep_N: Tensor | None) -> Tensor:
    return rows_N < 0 if keep_N is None else (rows_N < 0) | ~keep_N


def pair_counts_RC(
    rows_N: Tensor, cols_N: Tensor, num_rows: int, num_cols: int, keep_N: Tensor | None = None
) -> Tensor:
    """How often each (row, col) pair occurs, float64 ``[R, C]``; negative rows and items outside ``keep_N``
    are skipped. ``rows_N``, ``cols_N`` and ``keep_N`` have the same shape (any)."""
    extra = num_rows * num_cols
    skipped_N = _skipped_N(rows_N, keep_N)
    if not syncs_are_free(rows_N):  # unchecked ids (see check_ids): out of range goes to the dropped bin
        skipped_N = skipped_N | (rows_N >= num_rows) | (cols_N < 0) | (cols_N >= num_cols)
    flat_N = (rows_N * num_cols + cols_N).masked_fill(skipped_N, extra)
    return count_ids(flat_N, extra + 1)[:-1].view(num_rows, num_cols).double()


def row_sums_RE(rows_N: Tensor, values_NE: Tensor, num_rows: int) -> Tensor:
    """Sum of the value rows of each row id, float64 ``[R, E]``; negative row ids are skipped."""
    rows_N = rows_N.reshape(-1)
    values_NE = values_NE.reshape(rows_N.numel(), -1)
    sums = values_NE.new_zeros(num_rows + 1, values_NE.shape[1])
    skipped_N = rows_N < 0 if syncs_are_free(rows_N) else (rows_N < 0) | (rows_N >= num_rows)
    sums.index_add_(0, rows_N.masked_fill(skipped_N, num_rows), values_NE)
    return sums[:-1].double()
