"""The lightning-moe command on top of LightningCLI: help lists every command, mistakes get the closest valid
name, a constructor's error is one line, and a resume refuses overrides it could not honour."""

import pathlib
import subprocess
import sys

import pytest

from lightning_moe.cli import main, suggestions

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.enable_progress_bar", "false",
         "--data.init_args.bytes_per_domain", "30000", "--model.init_args.n_layers", "1",
         "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1"]


def test_help_lists_the_other_commands_and_our_entry_point_does_not_warn():
    done = subprocess.run([sys.executable, "-m", "lightning_moe", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    assert all(f"lightning-moe {command}" in done.stdout for command in ("study run|report", "params", "probe"))
    assert "args parameter" not in done.stderr


def test_an_unknown_option_suggests_the_closest_one():
    message = "Problem with given class_path 'lightning_moe.modules.MoELanguageModel':\n    Option 'lrr' is not accepted"
    assert "MoELanguageModel has no option 'lrr'. Did you mean 'lr'?" in suggestions(message)


def test_an_unknown_class_suggests_the_closest_class():
    hint = suggestions("module 'lightning_moe.gating' has no attribute 'SoftmaxTopk'")
    assert "Did you mean 'SoftmaxTopK'?" in hint and "KMeansRouter" in hint and "switch_load_balancing_loss" not in hint


def test_a_constructor_error_is_one_line(capsys):
    with pytest.raises(SystemExit, match=r"^error: ValueError: d_model must be > 0, got -3\.$"):
        main(["fit", *QUICK, "--model.init_args.d_model", "-3"])


def test_a_resume_refuses_a_changed_hyper_parameter_and_accepts_the_same_config(tmp_path):
    main(["fit", *QUICK, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)])
    (ckpt,) = tmp_path.rglob("*.ckpt")
    with pytest.raises(SystemExit, match=r"model had lr=0\.003, but this command sets lr=0\.1 .*Drop the override"):
        main(["fit", *QUICK, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt), "--model.init_args.lr", "0.1",
              "--trainer.default_root_dir", str(tmp_path / "resumed")])
    main(["fit", *QUICK, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt),
          "--trainer.default_root_dir", str(tmp_path / "resumed")])
    assert list((tmp_path / "resumed").rglob("*.ckpt"))


def test_a_resume_from_a_damaged_checkpoint_is_refused_before_loading(tmp_path):
    main(["fit", *QUICK, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    (ckpt,) = tmp_path.rglob("*.ckpt")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:2000] + bytes(b ^ 0xFF for b in data[2000:2016]) + data[2016:])
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*\.ckpt' is damaged: its entry .* fails its CRC-32"):
        main(["fit", *QUICK, "--trainer.max_steps", "2", "--ckpt_path", str(ckpt),
              "--trainer.default_root_dir", str(tmp_path / "resumed")])
