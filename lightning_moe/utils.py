"""Small helpers shared by the core and the studies: argument checks whose errors name the field, the value and
the fix, an atomic JSON writer for per-run artefacts, and the host-synchronisation rules of the training forward.

Host synchronisation: reading a tensor's value in Python (``.item()``, ``.tolist()``, ``int(t)``, ``if t:``) waits
for every kernel queued before it. On CPU that costs nothing extra; on a GPU it stalls the stream, and one per
layer per step adds up. So checks of values run where they are free (:func:`syncs_are_free`), behind a debug
switch elsewhere (:func:`check_now`), or are kept on the device as flags (:class:`DeferredChecks`) that are read
once per optimizer step (:func:`lightning_moe.layers.raise_deferred_checks`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DeferredChecks", "check_checkpoint_file", "check_choice", "check_non_negative", "check_now", "check_positive",
    "check_positive_int", "count_ids", "syncs_are_free", "write_json_atomic",
]

# Device types where reading a value back to the host stalls nothing (tests empty it to run the GPU code paths).
HOST_SYNC_FREE_DEVICES: tuple[str, ...] = ("cpu",)


def syncs_are_free(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is free: it lives on the CPU, where no stream waits."""
    return t.device.type in HOST_SYNC_FREE_DEVICES


def check_now(switch: bool | None, t: Tensor) -> bool:
    """Whether a check that reads ``t`` back to the host runs now: ``switch`` when set (True = a debug switch that
    pays the sync), else where it is free (:func:`syncs_are_free`). Never while ``torch.compile`` traces (a read
    would split the graph)."""
    if torch.compiler.is_compiling():
        return False
    return syncs_are_free(t) if switch is None else switch


def count_ids(ids: Tensor, num_bins: int) -> Tensor:
    """``torch.bincount(ids, minlength=num_bins)`` (int64) for ids in ``[0, num_bins)``, without a host sync: on
    CUDA ``bincount`` reads ``ids.max()`` back to size its output, so a fixed-size ``scatter_add_`` is used there
    (integer sums: the same counts, in any order)."""
    ids = ids.reshape(-1)
    if syncs_are_free(ids):
        return torch.bincount(ids, minlength=num_bins)
    ones = torch.ones_like(ids, dtype=torch.int64)
    return torch.zeros(num_bins, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, ones)


class DeferredChecks:
    """Failed-check flags kept on the device and read once, at the optimizer step: no sync in the forward.

    ``add(error, message, failed)`` ORs the 0-d bool tensor ``failed`` into the flag of ``message`` (one tensor per
    message, however many batches); :meth:`failures` reads every flag with one host sync and clears them. Not part
    of a ``state_dict``: the flags describe the batches since the last step only.
    """

    def __init__(self) -> None:
        self.flags: dict[str, tuple[type[Exception], Tensor]] = {}

    def add(self, error: type[Exception], message: str, failed: Tensor) -> None:
        failed = failed.detach().reshape(())
        prev = self.flags.get(message)
        self.flags[message] = (error, failed if prev is None else prev[1] | failed.to(prev[1].device))

    def pending(self) -> list[tuple[type[Exception], str, Tensor]]:
        return [(error, message, flag) for message, (error, flag) in self.flags.items()]

    def clear(self) -> None:
        self.flags.clear()


def check_positive(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    _check_finite(name, value)


def _check_finite(name: str, value: int | float) -> None:
    # inf passes "> 0" and ">= 0" and would turn every loss or update it scales into inf or NaN later.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    check_positive(name, value)


def check_non_negative(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; use 0 to turn it off.")
    _check_finite(name, value)


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON so a reader never sees half a file (a run killed mid-write leaves no result)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise a ValueError naming ``path`` when a checkpoint file is truncated or damaged. torch's zip format keeps a
    CRC-32 of every entry, which ``torch.load`` never checks, so a few flipped bytes would load silently (as
    corrupted optimizer state, say). A folder (a sharded distributed checkpoint) is left to its loader."""
    import zipfile

    if os.path.isdir(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {err}): the file is empty, truncated or not "
            "a PyTorch checkpoint; point at a file written by Trainer.save_checkpoint."
        ) from None
    if bad is not None:
        raise ValueError(
            f"checkpoint {str(path)!r} is damaged: its entry {bad!r} fails its CRC-32 check (the bytes changed on "
            "disk or in transfer); resume from an earlier checkpoint."
        )
