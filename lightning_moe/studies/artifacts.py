"""``RunArtifact``: the one writer of a study run's small JSON results (routing tables, trajectories) into its run
folder, where the report sections read them. A study module returns them from ``artifact()`` and lists this
callback in ``configure_callbacks()``; no module touches the file system."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from lightning_moe.callbacks import check_artifact_name
from lightning_moe.utils import write_json_atomic

# The study modules' artefact files (the report sections read them by these names).
ROUTING_FILE = "routing.json"  # task routing: task x expert tables, per-task accuracies
PRECISION_FILE = "precision_trajectory.json"  # transitions: Table 3's per-step Pi and losses


class RunArtifact(pl.Callback):
    """Writes ``pl_module.artifact()`` (a JSON-able dict, or None for nothing yet) to ``<default_root_dir>/<artifact>``
    on rank zero after every validation run (the latest wins) and at the end of an uninterrupted fit.

    Args:
        artifact: file name inside ``default_root_dir``.
    """

    def __init__(self, artifact: str) -> None:
        check_artifact_name(artifact)
        self.artifact = artifact

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "artifact"):
            raise TypeError(f"RunArtifact writes pl_module.artifact(), which {type(pl_module).__name__} does not "
                            "define; use it with a study module that returns its results from artifact().")
        data = pl_module.artifact()
        if data is not None and trainer.is_global_zero:
            write_json_atomic(Path(trainer.default_root_dir) / self.artifact, data)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.interrupted:
            self._write(trainer, pl_module)
