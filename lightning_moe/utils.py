"""Small argument checks shared by the public constructors: each error names the field, the value and the fix."""

from __future__ import annotations

from collections.abc import Iterable


def check_positive(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    check_positive(name, value)


def check_non_negative(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; use 0 to turn it off.")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
