"""Study files: parsing, grid expansion, override order, clear errors, and override keys checked before training."""

import pathlib
import textwrap

import pytest

from lightning_moe.studies.runner import StudyPaths, validate_condition
from lightning_moe.studies.spec import StudyError, load_study, merge_overrides, override_args, plan_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]

BASE = """
trainer: {max_steps: 3}
model:
  class_path: lightning_moe.modules.MoELanguageModel
  init_args: {d_model: 16, n_layers: 1, n_heads: 2, d_ff: 32, num_experts: 4, top_k: 1, max_seq_len: 16}
data:
  class_path: lightning_moe.data.ByteCorpusDataModule
  init_args: {seq_len: 16, batch_size: 4, bytes_per_domain: 20000}
"""

STUDY = """
base: base.yaml
seeds: [0, 1]
metrics: {val/loss: validation loss}
conditions:
  - name: top1
    overrides: {model.init_args.top_k: 1}
    paper: {val/loss: 2.5}
  - name: top2
    overrides: {model.init_args.top_k: 2}
claims:
  - {name: top-2 is better, kind: less, left: {condition: top2, metric: val/loss},
     right: {condition: top1, metric: val/loss}}
smoke:
  seeds: [0]
  overrides: {trainer.max_steps: 2}
"""


def write_study(tmp_path, text=STUDY, base=BASE):
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "study.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def test_study_loads_with_defaults(tmp_path):
    study = load_study(write_study(tmp_path))
    assert study.name == tmp_path.name and study.seed_keys == ("seed_everything",)
    assert [c.name for c in study.conditions] == ["top1", "top2"]
    assert study.paper_value("top1", "val/loss").mean == 2.5 and study.paper_value("top2", "val/loss") is None
    assert study.claims[0].kind == "less"


def test_plan_applies_layers_in_order(tmp_path):
    study = load_study(write_study(tmp_path))
    plans = plan_runs(study)
    assert [p.run_id for p in plans] == ["top1__seed0", "top1__seed1", "top2__seed0", "top2__seed1"]
    assert plans[1].overrides == {"model.init_args.top_k": 1, "seed_everything": 1}
    smoke = plan_runs(study, smoke=True)
    assert [p.run_id for p in smoke] == ["top1__seed0", "top2__seed0"]
    assert list(smoke[0].overrides) == ["model.init_args.top_k", "seed_everything", "trainer.max_steps"]
    assert smoke[0].fingerprint != plans[0].fingerprint
    assert [p.seed for p in plan_runs(study, seeds=[7], conditions=["top2"])] == [7]


def test_fingerprint_follows_the_base_config(tmp_path):
    study = load_study(write_study(tmp_path))
    before = plan_runs(study)[0].fingerprint
    (tmp_path / "base.yaml").write_text(BASE.replace("max_steps: 3", "max_steps: 4"))
    assert plan_runs(study)[0].fingerprint != before


def test_merge_moves_a_reset_key_to_the_end():
    merged = merge_overrides({"router.init_args.jitter": 0.1, "a": 1}, {"router": {"class_path": "X"}},
                             {"router.init_args.jitter": 0.2})
    assert list(merged) == ["a", "router", "router.init_args.jitter"] and merged["router.init_args.jitter"] == 0.2


def test_override_args_are_single_tokens():
    assert override_args({"a.b": -1, "c": True, "d": None, "e": "x y", "f": {"class_path": "K"}}) == [
        "--a.b=-1", "--c=true", "--d=null", "--e=x y", '--f={"class_path": "K"}',
    ]


def test_grid_is_a_product_crossed_with_conditions(tmp_path):
    text = STUDY.replace("    paper: {val/loss: 2.5}\n", "")
    text = text.replace("claims:", "grid: {model.init_args.num_experts: [4, 8], data.init_args.seq_len: [16]}\n"
                                    "paper: {'top2,num_experts=8,seq_len=16': {val/loss: 2.0}}\nclaims:")
    text = text.replace("condition: top2", "condition: 'top2,num_experts=4,seq_len=16'")
    text = text.replace("condition: top1", "condition: 'top1,num_experts=4,seq_len=16'")
    study = load_study(write_study(tmp_path, text))
    assert [c.name for c in study.conditions] == [
        "top1,num_experts=4,seq_len=16", "top1,num_experts=8,seq_len=16",
        "top2,num_experts=4,seq_len=16", "top2,num_experts=8,seq_len=16",
    ]
    assert study.conditions[3].overrides == {"model.init_args.top_k": 2, "model.init_args.num_experts": 8,
                                             "data.init_args.seq_len": 16}
    assert study.paper_value("top2,num_experts=8,seq_len=16", "val/loss").mean == 2.0


@pytest.mark.parametrize("old,new,match", [
    ("seeds: [0, 1]", "seeds: [0, 1]\nseedz: [2]", r"study.yaml: unknown key\(s\) \['seedz'\]; valid keys are"),
    ("    paper: {val/loss: 2.5}", "    paper: {val/ppl: 2.5}",
     r"conditions\[0\].paper gives a number for 'val/ppl', which is not in metrics"),
    ("    overrides: {model.init_args.top_k: 2}", "    overides: {model.init_args.top_k: 2}",
     r"conditions\[1\]: unknown key\(s\) \['overides'\]"),
    ("right: {condition: top1,", "right: {condition: top3,", r"uses condition 'top3', which the study does not have"),
    ("left: {condition: top2, metric: val/loss}", "left: {condition: top2, metric: val/bpb}",
     r"uses metric 'val/bpb'; add it to metrics"),
    ("seeds: [0, 1]", "seeds: []", r"seeds must be a non-empty list of integers"),
    ("base: base.yaml", "base: nope.yaml", r"base: config 'nope.yaml' does not exist"),
    ("  - name: top2", "  - name: top1", r"condition name\(s\) \['top1'\] appear more than once"),
    ("  - name: top2", "  - name: top 2", r"conditions\[1\].name 'top 2' must start with a letter or digit"),
    ("{model.init_args.top_k: 2}", "{--model.init_args.top_k: 2}", r"must be a dotted config key without dashes"),
    ("kind: less", "kind: lower", r"claims\[0\].kind is 'lower'; choose one of"),
])
def test_bad_study_names_the_field(tmp_path, old, new, match):
    assert old in STUDY
    with pytest.raises(StudyError, match=match):
        load_study(write_study(tmp_path, STUDY.replace(old, new)))


def test_a_grid_without_runs_is_an_error(tmp_path):
    study = load_study(write_study(tmp_path))
    with pytest.raises(StudyError, match=r"produces no runs .*seeds: \[\]"):
        plan_runs(study, seeds=[])
    with pytest.raises(StudyError, match=r"--conditions names \['top9'\].*choose from top1, top2"):
        plan_runs(study, conditions=["top9"])


def test_unknown_override_key_is_named_before_training(tmp_path):
    study = load_study(write_study(tmp_path, STUDY.replace("top_k: 2}", "top_kk: 2}")))
    paths = StudyPaths.of(study, tmp_path / "out")
    good, bad = plan_runs(study)[0], plan_runs(study)[2]
    assert validate_condition(good, paths, 1, study) is None
    assert "top_k: 1" in paths.config("top1").read_text()  # the resolved config is kept
    error = validate_condition(bad, paths, 1, study)
    assert "condition 'top2': override model.init_args.top_kk=2 was rejected" in error
    assert "Option 'top_kk' is not accepted" in error and "Fix the key or value in study.yaml" in error
    assert "logs/top2.validate.log" in error and paths.log("top2.validate").is_file()


def test_shipped_study_parses_and_its_overrides_validate(tmp_path):
    study = load_study(ROOT / "recipes" / "quickstart_study")
    assert all(v is None for c in study.conditions for v in (c.paper or {}).values())
    paths = StudyPaths.of(study, tmp_path, smoke=True)
    for plan in plan_runs(study, smoke=True, seeds=[0]):
        assert validate_condition(plan, paths, 1, study) is None


@pytest.mark.parametrize("grid,match", [
    ("grid: {trainer.precision: [bf16 mixed]}", r"the grid makes a condition named 'top1,precision=bf16 mixed'"),
    ("grid: {model.init_args.top_k: []}", r"grid.model.init_args.top_k must be a non-empty list"),
])
def test_bad_grid_names_the_problem(tmp_path, grid, match):
    text = STUDY.replace("    paper: {val/loss: 2.5}\n", "").replace("claims:", grid + "\nclaims:")
    with pytest.raises(StudyError, match=match):
        load_study(write_study(tmp_path, text))


def test_grid_and_inline_paper_numbers_do_not_mix(tmp_path):
    with pytest.raises(StudyError, match=r"condition 'top1' gives paper numbers, but with a grid"):
        load_study(write_study(tmp_path, STUDY.replace("claims:", "grid: {trainer.max_steps: [3]}\nclaims:")))


def test_paper_tables_reach_the_sections_and_a_missing_one_names_the_file(tmp_path):
    from lightning_moe.studies.report import ReportContext

    study = load_study(write_study(tmp_path, STUDY + "paper_tables: {cosine: {L0: 0.32}}\n"))
    ctx = ReportContext(study, None, StudyPaths.of(study, tmp_path / "out"), tmp_path, smoke=False)
    assert ctx.paper_table("cosine") == {"L0": 0.32}
    with pytest.raises(StudyError, match=r"study.yaml has no paper_tables.perplexity.*\['cosine'\]"):
        ctx.paper_table("perplexity")
    with pytest.raises(StudyError, match="paper_tables"):
        load_study(write_study(tmp_path, STUDY + "paper_tables: [0.32]\n"))


def test_companions_must_be_study_folders(tmp_path):
    (tmp_path / "lm").mkdir()
    with pytest.raises(StudyError, match=r"companions: 'lm' has no study.yaml"):
        load_study(write_study(tmp_path, STUDY + "companions: [lm]\n"))
    (tmp_path / "lm" / "study.yaml").write_text("base: ../base.yaml\n")
    assert load_study(write_study(tmp_path, STUDY + "companions: [lm]\n")).companions == ((tmp_path / "lm").resolve(),)
