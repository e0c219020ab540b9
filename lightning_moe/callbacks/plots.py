"""Figure helpers for the monitors (legend: R rows, C columns of a plotted matrix).

matplotlib is optional and imported only here, lazily; figures are built
with ``matplotlib.figure.Figure`` (no pyplot), so no global backend or figure registry is touched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
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


def save(fig: Any, path: Path, loggers: Sequence[Any] = (), step: int = 0, warned: set[str] | None = None) -> Path:
    """Write ``fig`` as a PNG at ``path`` and hand it to every logger in ``loggers`` that takes images
    (:func:`log_figure`, tagged with the file's stem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log_figure(loggers, path.stem, fig, step, warned)
    return path


def figure_rgb(fig: Any) -> Any:
    """The figure rendered as an ``[H, W, 3]`` uint8 numpy array (Agg, no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(loggers: Sequence[Any], tag: str, fig: Any, step: int, warned: set[str] | None = None) -> int:
    """Hand ``fig`` to every logger that takes images; returns how many took it.

    Duck-typed, so no logger package is imported: ``logger.log_image(key=tag, images=[rgb], step=step)``
    (Weights & Biases, Neptune, ...) else ``logger.experiment.add_figure(tag, fig, global_step=step)``
    (TensorBoard). A logger that fails warns once per logger type (recorded in ``warned``) and is skipped: a
    figure is never worth stopping the host's fit."""
    taken = 0
    for logger in loggers:
        try:
            if callable(getattr(logger, "log_image", None)):
                logger.log_image(key=tag, images=[figure_rgb(fig)], step=step)
            else:
                add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
                if not callable(add_figure):
                    continue  # a logger without images (CSV)
                # close=False: TensorBoard would otherwise close it through pyplot, which these figures avoid.
                add_figure(tag, fig, global_step=step, close=False)
            taken += 1
        except Exception as err:  # noqa: BLE001 - a guest's figure never breaks the host's logging
            name = type(logger).__name__
            if warned is None or name not in warned:
                rank_zero_warn(f"{name} did not take the figure {tag!r} ({type(err).__name__}: {err}); it is still "
                               "saved as a PNG. This warning is shown once per logger type.")
                if warned is not None:
                    warned.add(name)
    return taken
