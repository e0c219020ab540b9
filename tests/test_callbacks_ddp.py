"""Under DDP (2 CPU processes, gloo) the monitors' reduced values equal one process over the same data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ddp_monitors import run

SCRIPT = Path(__file__).with_name("ddp_monitors.py")


def test_two_process_validation_equals_one_process(tmp_path):
    # The 2 validation batches are split one per rank; the monitors' sum-reduced states add them back up. The
    # training part before it checks that logging steps and plots (collectives on every rank) do not hang.
    single = run(devices=1, root=str(tmp_path))
    out = tmp_path / "ddp.json"
    command = [sys.executable, str(SCRIPT), "2", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp.keys() == single.keys() and len(ddp) > 40
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    alarms = [json.loads((tmp_path / f"alarms{rank}.json").read_text()) for rank in (0, 1)]
    assert alarms[0] == alarms[1] and alarms[0]["extra"]["first_dead"]  # the same counters and flags on both ranks
