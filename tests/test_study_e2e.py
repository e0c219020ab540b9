"""`lightning-moe study run --smoke` end to end on a tiny 2 x 2 study: rows, report with the paper column and claim
verdicts, and resuming after a kill redoes only the run that had not been recorded, while a crashing and a
mistyped condition are reported and the rest continues."""

import json
import shutil
import textwrap

import pytest

from lightning_moe.cli import main
from lightning_moe.studies.runner import read_rows

# The full-size settings are deliberately big: the test must show that the smoke block is what ran.
BASE = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 500
  val_check_interval: 500
  limit_val_batches: 50
  logger: false
  enable_checkpointing: false
  enable_model_summary: false
model:
  class_path: lightning_moe.modules.MoELanguageModel
  init_args: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 64, num_experts: 4, top_k: 1, max_seq_len: 64,
              warmup_steps: 1}
data:
  class_path: lightning_moe.data.ByteCorpusDataModule
  init_args: {seq_len: 64, batch_size: 16, bytes_per_domain: 200000}
"""

STUDY = """
title: Tiny fixture study
reference: a made-up paper, Table 9
base: base.yaml
seeds: [0, 1]
metrics: {val/loss: validation loss, val/maxvio_global: MaxVio}
conditions:
  - name: top1
    overrides: {model.init_args.top_k: 1}
    paper: {val/loss: 5.5, val/maxvio_global: {mean: 0.3, std: 0.1}}
  - name: top2
    overrides: {model.init_args.top_k: 2}
claims:
  - {name: top-2 lowers the loss, kind: less, left: {condition: top2, metric: val/loss},
     right: {condition: top1, metric: val/loss}}
  - {name: a loss no 3-step run reaches, kind: threshold, value: {condition: top1, metric: val/loss}, max: 0.01}
smoke:
  overrides:
    trainer.max_steps: 3
    trainer.val_check_interval: 3
    trainer.limit_val_batches: 1
    model.init_args.d_model: 16
    model.init_args.n_layers: 1
    model.init_args.d_ff: 32
    model.init_args.max_seq_len: 16
    data.init_args.seq_len: 16
    data.init_args.batch_size: 4
    data.init_args.bytes_per_domain: 20000
"""

BROKEN = """
  - name: crash            # parses, then fails when the model is built: top_k > num_experts
    overrides: {model.init_args.top_k: 9}
  - name: typo
    overrides: {model.init_args.top_kk: 2}
claims:"""


def study_run(*args):
    main(["study", "run", *map(str, args), "--smoke", "--workers", "2", "--no-progress"])


def rows_of(out):
    return read_rows(out / "smoke" / "runs.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    (root / "base.yaml").write_text(BASE)
    (root / "study.yaml").write_text(textwrap.dedent(STUDY))
    study_run(root, "--out", root / "out")
    return root


def test_smoke_study_runs_end_to_end(finished):
    rows = rows_of(finished / "out")
    assert sorted(r["run_id"] for r in rows) == ["top1__seed0", "top1__seed1", "top2__seed0", "top2__seed1"]
    for r in rows:
        assert r["status"] == "ok" and r["global_step"] == 3 and r["smoke"] is True
        assert {"val/loss", "val/maxvio_global"} <= set(r["metrics"]) and r["wall_s"] > 0
        assert r["overrides"]["seed_everything"] == r["seed"] and r["overrides"]["model.init_args.d_model"] == 16
        assert (finished / "out" / "smoke" / r["log"]).is_file()
    assert {r["hardware"]["torch"] for r in rows} and rows[0]["workers"] == 2


def test_smoke_report_has_paper_column_and_verdicts(finished):
    report = (finished / "out" / "smoke" / "REPORT.md").read_text()
    assert not (finished / "REPORT.md").exists()  # a smoke run never writes the study's own report
    assert "**SMOKE RUN.**" in report and "Paper numbers: a made-up paper, Table 9." in report
    assert "| condition | n | val/loss | paper | val/maxvio_global | paper |" in report
    top1 = next(line for line in report.splitlines() if line.startswith("| top1 | 2 |"))
    assert "| 5.5 |" in top1 and "| 0.3 ± 0.1 |" in top1 and " ± " in top1.split("|")[3]
    top2 = next(line for line in report.splitlines() if line.startswith("| top2 | 2 |"))
    assert top2.count("| — |") == 2  # no paper number for top2
    failing = next(line for line in report.splitlines() if line.startswith("| a loss no 3-step run reaches"))
    assert "**FAILS**" in failing and "needed <= 0.01" in failing and "| 0/2 |" in failing
    assert "| fails: top1 val/loss = 5.5; needed <= 0.01 |" in failing  # the same claim on the paper's numbers
    lower = next(line for line in report.splitlines() if line.startswith("| top-2 lowers the loss"))
    assert ("**holds**" in lower or "**FAILS**" in lower) and "needed top2 val/loss < top1 val/loss" in lower
    assert "| n/a |" in lower  # the paper gives no top2 number
    assert "![val/loss](plots/val_loss.png)" in report
    assert (finished / "out" / "smoke" / "plots" / "val_loss.png").is_file()
    assert "## Hardware and time" in report and "torch " in report and "total wall time of the runs" in report


def test_report_is_rebuilt_from_rows_and_needs_rows(finished, capsys, tmp_path):
    report = finished / "out" / "smoke" / "REPORT.md"
    report.unlink()
    main(["study", "report", str(finished), "--smoke", "--out", str(finished / "out")])
    assert "| top1 | 2 |" in report.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "report", str(finished), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "no runs recorded" in capsys.readouterr().err


def test_resume_redoes_only_the_unrecorded_run_and_reports_failures(finished, tmp_path, capsys):
    root = tmp_path / "study"
    shutil.copytree(finished, root)
    out = root / "out" / "smoke"
    lines = (out / "runs.jsonl").read_text().splitlines()
    killed = next(json.loads(line) for line in lines if json.loads(line)["run_id"] == "top1__seed1")
    # Simulate a kill: top1__seed1's row was never written and the next row was cut half-way.
    kept = [line for line in lines if json.loads(line)["run_id"] != "top1__seed1"]
    (out / "runs.jsonl").write_text("\n".join(kept) + "\n" + kept[0][:40])
    (root / "study.yaml").write_text(textwrap.dedent(STUDY).replace("claims:", BROKEN, 1))
    logs = {r: (out / "logs" / f"{r}.log").stat().st_mtime_ns for r in ("top1__seed0", "top2__seed0", "top2__seed1")}

    with pytest.raises(SystemExit) as exit_info:
        study_run(root, "--out", root / "out", "--seeds", "1")
    assert exit_info.value.code == 1  # a run failed and a condition was rejected; the others went on
    err = capsys.readouterr().err
    assert "override model.init_args.top_kk=2 was rejected" in err and "top2__seed1" not in err.split("failed")[0]

    new = rows_of(root / "out")[len(kept):]
    assert {r["run_id"]: r["status"] for r in new} == {
        "typo__seed1": "invalid", "top1__seed1": "ok", "crash__seed1": "failed",
    }
    assert {r: (out / "logs" / f"{r}.log").stat().st_mtime_ns for r in logs} == logs  # nothing finished was redone
    redone = next(r for r in new if r["run_id"] == "top1__seed1")
    assert redone["metrics"]["val/loss"] == pytest.approx(killed["metrics"]["val/loss"], rel=1e-5)  # same seed
    crash = next(r for r in new if r["run_id"] == "crash__seed1")
    assert "top_k=9 exceeds num_experts=4" in crash["error"] and crash["log"] == "logs/crash__seed1.log"

    main(["study", "report", str(root), "--smoke", "--out", str(root / "out")])
    report = (out / "REPORT.md").read_text()
    problems = report.split("## Problems")[1].split("## Runs")[0]
    assert "| crash__seed1 | failed |" in problems and "logs/crash__seed1.log" in problems
    assert "`model.init_args.top_k=9`" in problems and "| typo__seed1 | invalid |" in problems
    assert "Not run yet: crash__seed0, typo__seed0." in problems
    assert "| top1 | 2 |" in report  # the redone seed joined the finished one


def test_study_metrics_keep_the_monitors_training_windows(tmp_path):
    # Training windows of the routing monitors go to the loggers only (not callback_metrics): a study run
    # without a logger still records their last values; callback_metrics win where both have a key.
    import json
    from types import SimpleNamespace

    import torch

    from lightning_moe.callbacks import LoadBalanceMonitor
    from lightning_moe.studies.capture import StudyMetrics

    monitor = LoadBalanceMonitor()
    monitor.logged = {"train/load/l0/cv": 0.5, "val/load/l0/cv": 0.1}
    trainer = SimpleNamespace(interrupted=False, callbacks=[monitor], global_step=7, is_global_zero=True,
                              callback_metrics={"val/load/l0/cv": torch.tensor(0.25), "val/loss": torch.tensor(2.0)})
    capture = StudyMetrics(str(tmp_path / "result.json"))
    capture.on_fit_end(trainer, None)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["metrics"] == {"train/load/l0/cv": 0.5, "val/load/l0/cv": 0.25, "val/loss": 2.0}
    assert saved["global_step"] == 7


def test_records_take_the_rows_artefacts_and_path_free_configs(finished):
    import shutil

    from lightning_moe.studies import load_study
    from lightning_moe.studies.runner import StudyPaths, export_records

    study = load_study(finished)
    records = export_records(study, StudyPaths.of(study, finished / "out", smoke=True))
    try:
        assert records.rows.read_text() == (finished / "out" / "smoke" / "runs.jsonl").read_text()
        config = (records.root / "configs" / "top1.yaml").read_text()
        assert "<output folder>/runs/top1__seed" in config and str(finished) not in config
    finally:
        shutil.rmtree(records.root)
