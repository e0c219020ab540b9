"""Regenerate ``docs/img/routing_saturation.png``: the quickstart model (recipes/quickstart.yaml: 4 layers, 8
experts, top-2, byte corpus) for 300 steps with RoutingConsistencyMonitor and RoutingTraceWriter.

    python docs/make_routing_figures.py            # ~3-5 min on 2 CPU cores, one torch thread
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_moe.callbacks import RoutingConsistencyMonitor, RoutingTraceWriter, read_routing_traces
from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.gating import SoftmaxTopK
from lightning_moe.modules import MoELanguageModel

OUT = Path(__file__).resolve().parent / "img" / "routing_saturation.png"


def main(max_steps: int = 300) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    root = Path(tempfile.mkdtemp(prefix="routing_figures_"))
    model = MoELanguageModel(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=256, num_experts=8, top_k=2,
                             router=SoftmaxTopK(load_balancing_weight=0.01, z_loss_weight=0.001), lr=3e-3,
                             warmup_steps=30)
    consistency = RoutingConsistencyMonitor(every_n_steps=20, probe_batches=4)
    traces = RoutingTraceWriter(every_n_steps=50, tokens_per_step=256, label_keys=["tokens", "domain_ids"])
    start = time.perf_counter()
    pl.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, accelerator="cpu",
               callbacks=[consistency, traces]).fit(model, ByteCorpusDataModule(seq_len=128, batch_size=16))
    wall = time.perf_counter() - start
    OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "plots" / "consistency_saturation.png", OUT)
    table = read_routing_traces(root / "routing_traces", format="arrow")
    print(f"{max_steps} steps in {wall:.0f} s; traces: {table.num_rows} rows in {len(traces.shards)} shards, "
          f"{traces.bytes_written} bytes")
    print("steps", consistency.history_steps)
    for layer, curve in consistency.saturation_vs_final.items():
        fluct = consistency.curves["fluctuation"][layer]
        print(f"{layer}: saturation vs final {[round(v, 3) for v in curve]}; fluctuation {[round(v, 3) for v in fluct]}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
