"""The report from rows alone: mean ± std beside the paper's number, verdicts with numbers, problems, smoke banner."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest
from test_study_spec import STUDY, write_study

from lightning_moe.studies.report import Results, mean_std, write_report
from lightning_moe.studies.runner import StudyPaths, append_row
from lightning_moe.studies.spec import StudyError, load_study, plan_runs


def row(plan, status="ok", **metrics):
    return {"run_id": plan.run_id, "condition": plan.condition, "seed": plan.seed, "fingerprint": plan.fingerprint,
            "overrides": plan.overrides, "status": status, "metrics": metrics, "wall_s": 10.0, "global_step": 3,
            "log": f"logs/{plan.run_id}.log", "error": None if status == "ok" else "exit status 1: ValueError: boom",
            "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:10+00:00", "workers": 2,
            "threads": 1, "hardware": {"cpu": "Some CPU", "cores": 2, "usable_cores": 2, "torch": "2.13.0"}}


@pytest.fixture
def study_and_plans(tmp_path):
    study = load_study(write_study(tmp_path))
    return study, plan_runs(study)  # top1__seed0, top1__seed1, top2__seed0, top2__seed1


def test_mean_std():
    assert mean_std([]) == (None, None)
    assert mean_std([2.0]) == (2.0, None)
    assert mean_std([2.0, 2.2]) == (pytest.approx(2.1), pytest.approx(0.1414, abs=1e-4))


def test_results_keep_the_latest_matching_row(study_and_plans):
    _, plans = study_and_plans
    stale = row(plans[0], **{"val/loss": 9.0}) | {"fingerprint": "changed-since"}
    rows = [row(plans[0], "failed"), row(plans[0], **{"val/loss": 2.0}), stale, row(plans[2], "failed")]
    results = Results.of(plans, rows)
    assert results.values("top1", "val/loss") == {0: 2.0}
    assert list(results.problems) == ["top2__seed0"] and results.missing == ("top1__seed1", "top2__seed1")


def test_report_tables_claims_and_problems(study_and_plans, tmp_path):
    study, plans = study_and_plans
    paths = StudyPaths(tmp_path / "out", report_dir=study.dir)  # what a full run into the default folder uses
    for r in [row(plans[0], **{"val/loss": 2.0}), row(plans[1], **{"val/loss": 2.2}),
              row(plans[2], **{"val/loss": 1.9}), row(plans[3], "failed")]:
        append_row(paths.rows, r)
    report = write_report(study, plans, paths)[0].read_text()
    assert report.startswith(f"# {study.name}\n") and "SMOKE" not in report
    assert "| top1 | 2 | 2.1 ± 0.14 | 2.5 |" in report and "| top2 | 1 | 1.9 | — |" in report
    assert ("| top-2 is better | **holds** | top2 val/loss = 1.9, top1 val/loss = 2.1; needed top2 val/loss < "
            "top1 val/loss | 1/1 | — | n/a |") in report
    assert "| top2__seed1 | failed | exit status 1: ValueError: boom | `model.init_args.top_k=2`" in report
    assert "the output folder `out`" in report and "Some CPU, 2 cores (2 usable)" in report
    assert "total wall time of the runs: 30 s" in report
    assert (tmp_path / "plots" / "val_loss.png").stat().st_size > 1000


def test_only_default_full_runs_write_the_study_folders_report(study_and_plans, tmp_path):
    study, _ = study_and_plans
    assert StudyPaths.of(study).report_dir == study.dir
    assert StudyPaths.of(study).root == pathlib.Path("runs", "studies", study.name)
    # A run into an explicit folder (a subset, a trial) or a smoke run reports next to its runs.
    assert StudyPaths.of(study, tmp_path / "trial").report_dir == tmp_path / "trial"
    assert StudyPaths.of(study, tmp_path / "trial", smoke=True).report_dir == tmp_path / "trial" / "smoke"
    assert StudyPaths.of(study, smoke=True).report_dir == pathlib.Path("runs", "studies", study.name, "smoke")


def test_smoke_report_lives_in_the_output_folder(study_and_plans, tmp_path):
    study, _ = study_and_plans
    plans = plan_runs(study, smoke=True)
    paths = StudyPaths.of(study, tmp_path / "out", smoke=True)
    append_row(paths.rows, row(plans[0], **{"val/loss": 2.0}))
    report, _, _ = write_report(study, plans, paths, smoke=True)
    assert report == tmp_path / "out" / "smoke" / "REPORT.md" and not (tmp_path / "REPORT.md").exists()
    text = report.read_text()
    assert "**SMOKE RUN.**" in text and "for this smoke run `trainer.max_steps=2`" in text
    assert "| top-2 is better | **n/a** | no value for top2 val/loss |" in text
    assert "Not run yet: top2__seed0." in text


def test_study_command_is_dispatched_and_stays_lazy(capsys):
    from lightning_moe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["study", "run", "--help"])
    assert exit_info.value.code == 0 and "--smoke" in capsys.readouterr().out
    code = ("import sys, lightning_moe; before = set(sys.modules); import lightning_moe.studies.cli, "
            "lightning_moe.studies.report, lightning_moe.studies.runner; heavy = ('yaml', 'matplotlib', 'lightning'); "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def seed_section(ctx):
    """A study's own section: reads each run's artifact from its run folder."""
    seeds = [r["seed"] for r in ctx.runs("top1")]
    marks = [(ctx.run_dir(r["run_id"]) / "mark.txt").read_text() for r in ctx.runs("top1")]
    return ["## Own section", "", f"seeds {seeds} marks {marks}", ""]


def test_study_sections_are_placed_after_the_claims(study_and_plans, tmp_path):
    study, plans = study_and_plans
    study = dataclasses.replace(study, sections="test_study_report:seed_section")
    paths = StudyPaths.of(study, tmp_path / "out")
    for plan, mark in [(plans[1], "b"), (plans[0], "a")]:
        paths.run_dir(plan.run_id).mkdir(parents=True)
        (paths.run_dir(plan.run_id) / "mark.txt").write_text(mark)
        append_row(paths.rows, row(plan, **{"val/loss": 2.0}))
    report = write_report(study, plans, paths)[0].read_text()
    assert "## Claims" in report.split("## Own section\n\nseeds [0, 1] marks ['a', 'b']\n")[0]


def test_unloadable_sections_name_the_field(study_and_plans, tmp_path):
    study, plans = study_and_plans
    study = dataclasses.replace(study, sections="test_study_report:no_such_function")
    paths = StudyPaths.of(study, tmp_path / "out")
    append_row(paths.rows, row(plans[0], **{"val/loss": 2.0}))
    with pytest.raises(StudyError, match="sections 'test_study_report:no_such_function'.*cannot be loaded"):
        write_report(study, plans, paths)


@pytest.mark.parametrize("value", ["not a path", "module.only", 3])
def test_sections_must_name_a_function(tmp_path, value):
    text = STUDY + f"sections: {value!r}\n" if isinstance(value, str) else STUDY + f"sections: {value}\n"
    with pytest.raises(StudyError, match="sections must be 'package.module:function'"):
        load_study(write_study(tmp_path, text))
