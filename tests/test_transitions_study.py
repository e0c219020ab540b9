"""The shipped transition studies (recipes/transitions and its lm/, precision/, beta/): they plan the stated grids, their claims read
collected metrics, every recipe is parsed, and the smoke versions run end to end through the runner and build the
reports with the study's own sections (paired gains, aligned curves, wall time)."""

import pathlib

import pytest

from lightning_moe.cli import main
from lightning_moe.studies import load_study, plan_runs
from lightning_moe.studies.runner import read_rows

ROOT = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "transitions"
STUDIES = {"toy": (ROOT, 13 * 5), "lm": (ROOT / "lm", 5 * 5), "precision": (ROOT / "precision", 4),
           "beta": (ROOT / "beta", 8)}


@pytest.mark.parametrize("name", STUDIES)
def test_study_plans_its_runs(name):
    folder, runs = STUDIES[name]
    assert len(plan_runs(load_study(folder))) == runs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One command runs the toy study and its companions (lm, beta, precision); name -> output folder."""
    out = tmp_path_factory.mktemp("transitions")
    main(["study", "run", str(ROOT), "--smoke", "--workers", "2", "--no-progress", "--out", str(out)])
    return {name: out if folder == ROOT else out / load_study(folder).name for name, (folder, _) in STUDIES.items()}


@pytest.mark.parametrize("name", STUDIES)
def test_smoke_runs_every_condition_and_logs_every_study_metric(name, smoke):
    study = load_study(STUDIES[name][0])
    rows = read_rows(smoke[name] / "smoke" / "runs.jsonl")
    assert len(rows) == len(study.conditions)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    # Some metrics exist only for some conditions (Pi only with precision, beta only with memory).
    assert set(study.metrics) <= {key for r in rows for key in r["metrics"]}


def test_toy_report_has_paired_gains_plots_and_wall_time(smoke):
    report = (smoke["toy"] / "smoke" / "REPORT.md").read_text()
    assert "beta x Ant interaction" in report and "random switch position" in report
    assert "## Wall time" in report and "transitions_p_correct.png" in report
    assert (smoke["toy"] / "smoke" / "plots" / "transitions_p_correct.png").is_file()


def test_toy_wall_time_compares_the_reference_protocols_runs_and_the_whole_study(smoke):
    report = (smoke["toy"] / "smoke" / "REPORT.md").read_text()
    rows = read_rows(smoke["toy"] / "smoke" / "runs.jsonl")
    ours = sum(r["fit_s"] for r in rows if not r["condition"].startswith("random."))
    theirs = 30.0 + 33.6 + 7 * 1653.0 / 45  # baseline and beta+Ant timed alone; the rest the ablation's mean
    assert (f"sum of our fit times {ours / 60:.1f} min vs {theirs / 60:.1f} min for the reference's runs "
            f"({theirs / ours:.1f}x") in report
    assert "Whole study: 13 runs (4 of them random-switch variants the reference did not run)" in report
    assert "the reference's protocol (the 45-run ablation.py, measured) took 27.6 min" in report


def test_parent_report_gives_each_companions_run_time_and_the_whole_studys(smoke):
    report = (smoke["toy"] / "smoke" / "REPORT.md").read_text()
    per_study = {name: sum(r["wall_s"] for r in read_rows(folder / "smoke" / "runs.jsonl"))
                 for name, folder in smoke.items()}
    for name in ("lm", "beta", "precision"):
        title = load_study(STUDIES[name][0]).title
        row = next(line for line in report.splitlines() if line.startswith(f"| {title} |"))
        assert f"| {per_study[name] / 60:.1f} |" in row
    whole = sum(per_study.values())
    assert f"- with the companion studies: {whole:,.0f} s ({whole / 60:.1f} min summed over runs" in report


def test_lm_report_plots_gate_and_bpc_around_the_transition(smoke):
    plots = smoke["lm"] / "smoke" / "plots"
    assert (plots / "transitions_lm_p_correct.png").is_file() and (plots / "transitions_lm_bpc.png").is_file()


def test_precision_report_has_the_pi_trajectory_table_and_plot(smoke):
    report = (smoke["precision"] / "smoke" / "REPORT.md").read_text()
    assert "## Pi around the reliability shift (Table 3)" in report
    assert (smoke["precision"] / "smoke" / "plots" / "transitions_precision_trajectory.png").is_file()
