"""The shipped sparsity study: its grid is the parameter calculator's answer for each family, its report helpers
(shape from a resolved config, the least-squares law, the n_exp-spread check) give exact numbers on tiny inputs, and
its smoke version runs a few shapes end to end through the runner into a report with the study's sections."""

import importlib.util
import math
import pathlib

import pytest
import yaml

from lightning_moe.cli import main
from lightning_moe.gating import Router
from lightning_moe.modules import MoELanguageModel
from lightning_moe.params import MoEShape, count
from lightning_moe.studies import load_study, plan_runs
from lightning_moe.studies.runner import read_rows
from lightning_moe.studies.sparsity.section import Point, families, fit, shape_of, spread_check

STUDY_DIR = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "sparsity"
SMOKE_CONDITIONS = ["f1_E8k8", "f1_E8k1", "f3_E8k1", "f3_E16k1"]


def _make_study():
    spec = importlib.util.spec_from_file_location("make_study", STUDY_DIR / "make_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overrides_shape(overrides: dict) -> tuple[int, ...]:
    keys = ("d_model", "n_layers", "num_experts", "top_k", "d_ff")
    return tuple(overrides[f"model.init_args.{k}"] for k in keys)


def test_study_yaml_is_what_make_study_writes():
    shapes = _make_study().shapes()
    study = load_study(STUDY_DIR)
    assert [c.name for c in study.conditions] == list(shapes)
    for c in study.conditions:
        s = shapes[c.name]
        assert _overrides_shape(c.overrides) == (s.d_model, s.n_layers, s.num_experts, s.top_k, s.d_expert)
    assert len(plan_runs(study)) == 2 * len(shapes)


def test_families_meet_their_budgets():
    shapes = _make_study().shapes()
    by_family = {f: [s for name, s in shapes.items() if f in families(name)] for f in (1, 2, 3)}
    assert [len(v) for v in by_family.values()] == [8, 7, 5]
    for s in by_family[1]:  # fixed core and expert pool
        assert (s.d_model, s.n_layers, s.num_experts * s.d_expert) == (96, 3, 1536)
    for s in by_family[2]:  # spec: +-5 % of 1.5M with d_e tied to d / 2
        assert s.d_expert == s.d_model // 2 and abs(count(s)["total_nonemb"] / 1.5e6 - 1) < 0.05
    for s in by_family[3]:  # spec: +-4 % on both budgets
        c = count(s)
        assert abs(c["total_nonemb"] / 2.0e6 - 1) < 0.04 and abs(c["active_nonemb"] / 0.6e6 - 1) < 0.04
    # Family 2 trades experts for width: at fixed s the core shrinks as n_exp grows (the spec's mechanism).
    d_at_s4 = [s.d_model for s in sorted(by_family[2], key=lambda s: s.num_experts) if s.num_experts == 4 * s.top_k]
    assert d_at_s4 == [224, 176, 136, 96]


def test_families_from_condition_names():
    assert families("f1+2_E32k8") == (1, 2)
    assert families("f3_E16k1") == (3,)
    with pytest.raises(ValueError, match="'dense'.*make_study.py"):
        families("dense")


def _point(e: int, k: int, losses: list[float]) -> Point:
    shape = MoEShape(32, 1, e, k, 8)
    return Point(f"f1_E{e}k{k}", (1,), shape, count(shape), losses, 1, [1.0], [1.0])


def test_fit_recovers_an_exact_law():
    # loss = 2 + 0.1 log s + 0.05 log n_exp on four shapes, two identical "seeds" each.
    ps = [_point(e, k, [2 + 0.1 * math.log(e / k) + 0.05 * math.log(e)] * 2) for e, k in
          ((8, 8), (8, 2), (32, 8), (32, 4))]
    f = fit(ps, with_n_exp=True)
    assert f["E0"] == pytest.approx(2.0) and f["B"] == pytest.approx(0.1) and f["C"] == pytest.approx(0.05)
    assert f["R2"] == pytest.approx(1.0) and f["rms"] == pytest.approx(0.0, abs=1e-12)


def test_fit_without_distinct_s_is_not_identifiable():
    assert fit([_point(8, 2, [2.0, 2.1]), _point(16, 4, [2.2])], with_n_exp=False) is None


def test_spread_check_compares_the_n_exp_spread_with_the_gap_to_adjacent_s():
    ps = [_point(8, 8, [1.0]), _point(8, 2, [1.5]), _point(32, 8, [1.6]), _point(8, 1, [2.0])]
    # s=4: spread 0.1; level means s=1: 1.0, s=4: 1.55, s=8: 2.0 -> gap mean(0.55, 0.45) = 0.5; 0.1 < 0.25 * 0.5.
    [(s, spread, gap, ok)] = spread_check(ps)
    assert (s, ok) == (4, True)
    assert spread == pytest.approx(0.1) and gap == pytest.approx(0.5)


def test_shape_of_rejects_shared_experts():
    config = {"model": {"init_args": {"shared_d_ff": 64, "moe_every": 1}}, "data": {"init_args": {}}}
    with pytest.raises(ValueError, match="shared_d_ff=64.*shared_d_ff: 0"):
        shape_of(config)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsity")
    main(["study", "run", str(STUDY_DIR), "--smoke", "--workers", "2", "--no-progress", "--out", str(out),
          "--conditions", *SMOKE_CONDITIONS])
    return out / "smoke"


def test_smoke_runs_finish(smoke):
    rows = read_rows(smoke / "runs.jsonl")
    assert sorted(r["run_id"] for r in rows) == sorted(f"{c}__seed0" for c in SMOKE_CONDITIONS)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert {"val/loss", "val/maxvio_global", "val/dead_experts"} <= set(r["metrics"])


def test_counted_shape_is_the_trained_model(smoke):
    # The report's N_total comes from shape_of(resolved config); it must equal the model the run built.
    config = yaml.safe_load((smoke / "configs" / "f3_E16k1.yaml").read_text())
    init = dict(config["model"]["init_args"])
    init["router"] = Router.from_config(init["router"])
    model = MoELanguageModel(**init)
    assert count(shape_of(config))["total"] == sum(p.numel() for p in model.parameters())


def test_smoke_report_has_the_study_sections_and_plots(smoke):
    report = (smoke / "REPORT.md").read_text()
    for heading in ("## Shapes and cost", "## Family 1", "## Family 3", "## Loss against s and n_exp", "## Balance"):
        assert heading in report
    # f3_E16k1: L=4, d=176, d_e=44 -> 1.995M non-embedding total, 0.601M active (see make_study.py).
    assert "| f3_E16k1 | 3 | 1.995M | 0.601M |" in report
    assert "| (iii) Family 3: the lowest feasible s (8) gives the lowest loss | **" in report  # in the claims table
    table = report.split("## Claims", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| claim |")]
    assert table[2].startswith(f"{len(rows)} claims: ")  # the summary counts the section's claims too
    for plot in ("loss_vs_s.png", "loss_vs_n_exp.png"):
        assert (smoke / "plots" / plot).is_file()
