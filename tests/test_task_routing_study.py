"""The shipped task-routing studies (recipes/task_routing, grid/, capacity/): they plan the stated grids, their
hard-coded vocabulary sizes match the generator, and their smoke versions run end to end through the runner and
build the reports with the study's own sections."""

import pathlib

import pytest
import yaml

from lightning_moe.cli import main
from lightning_moe.studies.task_routing.data import TemplateKVTasks
from lightning_moe.studies import load_study, plan_runs
from lightning_moe.studies.runner import read_rows

ROOT = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "task_routing"
STUDIES = {"core": (ROOT, 9), "grid": (ROOT / "grid", 6), "capacity": (ROOT / "capacity", 12)}


@pytest.mark.parametrize("name", STUDIES)
def test_study_plans_its_runs(name):
    folder, runs = STUDIES[name]
    assert len(plan_runs(load_study(folder))) == runs


@pytest.mark.parametrize("name", STUDIES)
def test_every_condition_gives_the_model_the_data_vocabulary(name):
    folder, _ = STUDIES[name]
    study = load_study(folder)
    base = yaml.safe_load(study.base[0].read_text())
    for plan in plan_runs(study):
        model, data = ({k.rsplit(".", 1)[-1]: v for k, v in plan.overrides.items() if k.startswith(prefix)}
                       for prefix in ("model.", "data.init_args.tasks."))
        model = {**base["model"]["init_args"], **model}
        data = {**base["data"]["init_args"]["tasks"]["init_args"], **data}
        tasks = TemplateKVTasks(num_tasks=data["num_tasks"], pairs_per_task=1,
                                num_subjects=data.get("num_subjects", 2000))
        assert model["vocab_size"] == tasks.vocab_size, plan.run_id
        assert model["num_tasks"] == data["num_tasks"], plan.run_id


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("task_routing")
    # The companions (grid/, capacity/) are run on their own here, capacity on three conditions, to keep it short.
    main(["study", "run", str(ROOT), "--smoke", "--workers", "2", "--no-progress", "--no-companions", "--out",
          str(out / "core")])
    main(["study", "run", str(ROOT / "capacity"), "--smoke", "--workers", "2", "--no-progress", "--out",
          str(out / "capacity"), "--conditions", "K5_w8_N25", "K5_w32_N25", "K10_w8_N100"])
    return out


def test_core_smoke_runs_every_arm_and_draws_their_routing_matrices(smoke):
    rows = read_rows(smoke / "core" / "smoke" / "runs.jsonl")
    assert sorted(r["run_id"] for r in rows) == ["ce__seed0", "ce_lb__seed0", "ce_router__seed0"]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert {"val/exact_match", "val/route/task_purity", "val/route/nmi"} <= set(r["metrics"])
    report = (smoke / "core" / "smoke" / "REPORT.md").read_text()
    assert "## Routing matrices" in report
    for arm in ("ce", "ce_lb", "ce_router"):
        assert (smoke / "core" / "smoke" / "plots" / f"routing_{arm}.png").is_file()


def test_capacity_smoke_reports_w_star_and_the_same_tasks_among_5_and_10(smoke):
    report = (smoke / "capacity" / "smoke" / "REPORT.md").read_text()
    assert "## Capacity: w*(k) against complexity" in report
    assert "## Capacity: the same task among K=5 and K=10 tasks" in report
    assert (smoke / "capacity" / "smoke" / "plots" / "capacity.png").is_file()
