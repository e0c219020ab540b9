"""Under DDP (2 CPU processes, gloo): one trace shard per rank per step, and identical consistency values on
every rank (each routes rank zero's whole probe set)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
SCRIPT = Path(__file__).with_name("ddp_routing.py")


def test_two_ranks_write_their_own_shards_and_agree_on_consistency(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "2", str(tmp_path)], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert shards == [f"traces-step{s:09d}-rank{r:04d}.parquet" for s in (1, 2, 3) for r in (0, 1)]
    from lightning_moe.callbacks import read_routing_traces

    table = read_routing_traces(tmp_path / "traces", format="arrow")
    assert table.num_rows == 3 * 2 * 1 * 4  # steps x ranks x layers x tokens
    rank0, rank1 = (json.loads((tmp_path / f"consistency-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == 3  # saturation_vs_ref, saturation_vs_prev, fluctuation of 1 layer
