"""Train a tiny MoE LM with RoutingConsistencyMonitor and RoutingTraceWriter on ``devices`` CPU processes; each
rank writes what its consistency monitor logged as JSON next to the traces.

Run by ``tests/test_traces_ddp.py`` (as a script, because Lightning's DDP launcher re-executes the command):
    python tests/ddp_routing.py DEVICES ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

from lightning_moe.callbacks import RoutingConsistencyMonitor, RoutingTraceWriter
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TINY, TinyLMData

if __name__ == "__main__":
    devices, root = int(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    consistency = RoutingConsistencyMonitor(every_n_steps=1, probe_batches=2, plots=False)
    traces = RoutingTraceWriter(dirpath=root / "traces", tokens_per_step=4, every_n_steps=1)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, devices=devices, strategy="ddp", accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=root, callbacks=[consistency, traces])
    trainer.fit(MoELanguageModel(**TINY, warmup_steps=1), TinyLMData())
    (root / f"consistency-rank{trainer.global_rank}.json").write_text(json.dumps(consistency.logged))
