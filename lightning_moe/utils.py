"""Small helpers shared by the core and the studies: argument checks whose errors name the field, the value and
the fix, and an atomic JSON writer for per-run artefacts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "check_checkpoint_file", "check_choice", "check_non_negative", "check_positive", "check_positive_int",
    "write_json_atomic",
]


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
