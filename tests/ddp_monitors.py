"""Train and validate a tiny MoE LM with the monitors on ``devices`` CPU processes; write rank 0's validation
values as JSON.

Run by ``tests/test_callbacks_ddp.py`` (as a script, because Lightning's DDP launcher re-executes the command):
    python tests/ddp_monitors.py DEVICES OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

from lightning_moe.callbacks import (
    CoActivationMonitor,
    LoadBalanceMonitor,
    MarginMonitor,
    RouterGeometryMonitor,
    RoutingAlarms,
    SpecializationMonitor,
    TransitionMonitor,
)
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TinyLMData


def tiny_model() -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=4, top_k=2,
                            max_seq_len=16, warmup_steps=1)


def run(devices: int, root: str) -> dict[str, float]:
    """Two training steps with all four monitors logging every step (training-window reductions, plots), then a
    validation of a fresh model; returns the validation values."""
    torch.set_num_threads(1)
    common = {"devices": devices, "strategy": "ddp" if devices > 1 else "auto", "accelerator": "cpu",
              "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "enable_checkpointing": False, "default_root_dir": root}
    fit_monitors = [LoadBalanceMonitor(every_n_steps=1), SpecializationMonitor(num_labels=2, every_n_steps=1),
                    RouterGeometryMonitor(coupling_tokens=8, every_n_steps=1),
                    TransitionMonitor(num_labels=2, window=2, every_n_steps=1), CoActivationMonitor(every_n_steps=1),
                    MarginMonitor(every_n_steps=1), RoutingAlarms(every_n_steps=1)]
    pl.Trainer(max_steps=2, limit_val_batches=0, callbacks=fit_monitors, **common).fit(tiny_model(), TinyLMData())
    # Each rank writes its alarm state: counters and flags must be identical on every rank.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    alarms = fit_monitors[-1]
    Path(root, f"alarms{rank}.json").write_text(json.dumps(
        {"extra": alarms.state_dict()["extra"], "logged": alarms.logged}, sort_keys=True))
    monitors = [LoadBalanceMonitor(), SpecializationMonitor(num_labels=2), TransitionMonitor(num_labels=2, window=2),
                CoActivationMonitor(), MarginMonitor()]
    pl.Trainer(callbacks=list(monitors), **common).validate(tiny_model(), datamodule=TinyLMData())
    return {k: v for m in monitors for k, v in m.logged.items()}


if __name__ == "__main__":
    devices, out = int(sys.argv[1]), Path(sys.argv[2])
    logged = run(devices, str(out.parent))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    out.write_text(json.dumps(logged))
