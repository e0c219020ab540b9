"""Every shipped LightningCLI recipe parses; the quickstart trains a few steps through the CLI."""

import pathlib
import re

import pytest
import yaml

from lightning_moe.cli import main
from lightning_moe.studies.spec import load_study

ROOT = pathlib.Path(__file__).resolve().parents[1]
# study.yaml files describe grids for the study runner; every other YAML under recipes/ is a LightningCLI config,
# parsed on top of the base configs of the study whose condition adds it (an overlay) or on its own.
OVERLAY_BASES = {
    config: study.base for study in map(load_study, (ROOT / "recipes").rglob("study.yaml"))
    for condition in study.conditions for config in condition.configs
}
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.name != "study.yaml")


def test_recipes_exist():
    assert ROOT / "recipes" / "quickstart.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        args = [a for base in OVERLAY_BASES.get(recipe, ()) for a in ("--config", str(base))]
        main(["fit", *args, "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def test_router_swaps_by_class_path_without_layer_dimensions(capsys):
    with pytest.raises(SystemExit):
        main([
            "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--print_config",
            "--model.init_args.router", "lightning_moe.gating.SoftmaxTopK",
            "--model.init_args.router.init_args.jitter", "0.1",
        ])
    router = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["router"]
    assert router["class_path"] == "lightning_moe.gating.SoftmaxTopK"
    assert router["init_args"]["jitter"] == 0.1 and "d_model" not in router["init_args"]


def test_unknown_router_class_path_is_a_parse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--print_config",
              "--model.init_args.router", "lightning_moe.gating.NoSuchRouter"])
    assert exit_info.value.code != 0
    assert "NoSuchRouter" in capsys.readouterr().err


def test_quickstart_trains_a_few_steps_and_prints_the_table(tmp_path, capsys):
    main([
        "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--data.init_args.bytes_per_domain", "30000", "--model.init_args.n_layers", "1",
    ])
    out = capsys.readouterr().out
    for row in ("validation loss", "bits per token", "load CV", "MaxVio global", "dead experts"):
        assert row in out
    assert re.search(r"\| optimizer steps\s+\|\s+3 \|", out)
    assert list(tmp_path.rglob("*.ckpt"))
