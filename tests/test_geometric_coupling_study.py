"""The shipped geometric-coupling study: it parses into the planned grid, and its smoke version runs every arm
end to end through the runner and builds the report with the study's own sections."""

import json
import pathlib

import pytest

from lightning_moe.cli import main
from lightning_moe.studies import load_study, plan_runs
from lightning_moe.studies.runner import read_rows

STUDY_DIR = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "geometric_coupling"
ARMS = ["no_balancing", "aux_loss", "loss_free", "loss_free_seq", "kmeans", "random_router"]


def test_study_plans_six_arms_times_three_seeds():
    study = load_study(STUDY_DIR)
    assert [c.name for c in study.conditions] == ARMS
    assert len(plan_runs(study)) == 18
    assert study.sections == "lightning_moe.studies.geometric_coupling.section:render"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("geometric_coupling")
    main(["study", "run", str(STUDY_DIR), "--smoke", "--workers", "2", "--no-progress", "--out", str(out)])
    return out / "smoke"


def test_smoke_runs_every_arm(smoke):
    rows = read_rows(smoke / "runs.jsonl")
    assert sorted(r["run_id"] for r in rows) == sorted(f"{a}__seed0" for a in ARMS)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert "val/coupling/weight_vs_gate_norm/log10_p" in r["metrics"]
        assert (smoke / r["run_dir"] / "coupling.json").is_file()


def test_arms_route_with_their_own_router(smoke):
    configs = {a: (smoke / "configs" / f"{a}.yaml").read_text() for a in ARMS}
    assert "SoftmaxTopK" in configs["aux_loss"] and "SigmoidTopK" in configs["loss_free"]
    assert "sequence_balance_weight: 0.0001" in configs["loss_free_seq"]
    assert "KMeansRouter" in configs["kmeans"]
    assert "frozen: true" in configs["random_router"]


def test_smoke_report_has_the_study_sections_and_plots(smoke):
    report = (smoke / "REPORT.md").read_text()
    for heading in ("## Perplexity", "## Load balance per layer", "## Router-row geometry per layer",
                    "## Score–activation coupling", "## Domain specialisation"):
        assert heading in report
    assert "| loss_free | " in report and "(paper: L0 2.0, L4 3.5, L8 4.4)" in report
    for plot in ("maxvio_over_training.png", "router_cosine_per_layer.png", "coupling_deciles.png"):
        assert (smoke / "plots" / plot).is_file()


def test_history_has_one_entry_per_validation(smoke):
    art = json.loads((smoke / "runs" / "kmeans__seed0" / "coupling.json").read_text())
    assert [h["step"] for h in art["history"]] == [2, 4]  # smoke: 4 steps, validation every 2
