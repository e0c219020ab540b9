"""Figure helpers for the monitors (legend: R rows, C columns of a plotted matrix).

matplotlib is optional and imported only here, lazily; figures are built
with ``matplotlib.figure.Figure`` (no pyplot), so no global backend or figure registry is touched."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor


def plot_directory(trainer: pl.Trainer) -> Path:
    """``<log_dir>/plots`` (the first logger's directory), else ``<default_root_dir>/plots``."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "plots"


def matplotlib_available() -> bool:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(panels: int, columns: int = 1, panel_size: tuple[float, float] = (5.0, 3.2)) -> tuple[Any, list] | None:
    """A figure with ``panels`` axes in a grid of ``columns``; None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = max(1, math.ceil(panels / columns))
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1).tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def heatmap(fig: Any, ax: Any, matrix_RC: Tensor, title: str, xlabel: str, ylabel: str, colorbar: str,
            xticks: list[str] | None = None, yticks: list[str] | None = None, **imshow: Any) -> None:
    """One heatmap (rows on y, default labels = row indices; columns on x) with a labelled colour bar; tables of
    at most 64 cells also print their values."""
    image = ax.imshow(matrix_RC.detach().float().cpu().numpy(), aspect="auto", interpolation="nearest", **imshow)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        every = max(1, len(xticks) // 12)  # at most ~12 labels, so long histories stay legible
        ax.set_xticks(range(0, len(xticks), every), xticks[::every], fontsize=7)
    rows, cols = matrix_RC.shape
    yticks = yticks if yticks is not None else [str(r) for r in range(rows)]
    ax.set_yticks(range(rows), yticks, fontsize=7)
    if rows * cols <= 64:  # small tables: print the numbers too
        for (r, c), v in zip(((r, c) for r in range(rows) for c in range(cols)), matrix_RC.flatten().tolist()):
            ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=6, color="grey")
    fig.colorbar(image, ax=ax, label=colorbar)


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
