"""The ``lightning-moe`` command: LightningCLI (fit/validate/test/predict) for any of our modules and data, plus
``study`` and ``params``.

On top of LightningCLI: a mistyped option or class gets the closest valid names; a constructor's
``ValueError``/``TypeError`` is one line naming the problem (not jsonargparse's union report); and a resume
(``--ckpt_path``) refuses model arguments that differ from the checkpoint's hyper-parameters, which LightningCLI
would otherwise replace by the checkpoint's without a word.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_moe.utils import check_checkpoint_file

__all__ = ["MoECLI", "main"]


def _close(name: str, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` plus the valid choices, for an error message."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" Did you mean {match[0]!r}?" if match else ""
    return f"{hint} Valid: {', '.join(sorted(choices))}."


def suggestions(message: str) -> str:
    """Hints for the mistakes jsonargparse reports without them: an option a class does not take, a class its
    module does not have."""
    hints = []
    for class_path, option in re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message):
        module, _, name = class_path.rpartition(".")
        try:
            params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        except (ImportError, AttributeError, ValueError, TypeError):
            continue
        valid = [p for p in params if params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        hints.append(f"{name} has no option {option!r}.{_close(option, valid)}")
    for module, name in re.findall(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        classes = [n for n in getattr(mod, "__all__", []) if isinstance(getattr(mod, n, None), type)]
        hints.append(f"{module} has no {name!r}.{_close(name, classes)}")
    return "".join(f"\n  hint: {h}" for h in dict.fromkeys(hints))


CKPT_ALIASES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


class _Parser(LightningArgumentParser):
    def error(self, message: str, *args: Any, **kwargs: Any):
        return super().error(message + suggestions(message), *args, **kwargs)


class MoECLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=_Parser, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--torch_threads", type=int, default=1,
            help="torch CPU threads; 1 is fastest for the tiny models of the recipes on a shared CPU (0 = torch's "
            "default).",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse wraps a constructor's own error in a report of every union member it tried.
            cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError)) else err
            raise SystemExit(f"error: {type(cause).__name__}: {cause}") from None

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI then replaces the model's arguments by the checkpoint's hyper-parameters when --ckpt_path is
        # given: keep what the command asked for, to refuse what it would silently drop.
        self._requested = _model_args(self.config)
        ckpt_path = _run_config(self.config).get("ckpt_path")
        if ckpt_path and ckpt_path not in CKPT_ALIASES:
            try:  # before LightningCLI reads it: torch.load checks no CRC, so changed bytes would load silently
                check_checkpoint_file(ckpt_path)
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None

    def before_instantiate_classes(self) -> None:
        threads = _run_config(self.config).torch_threads
        if threads < 0:
            raise ValueError(f"--torch_threads must be >= 0, got {threads}.")
        if threads:
            torch.set_num_threads(threads)
        resumed = _model_args(self.config)
        changed = {k: (resumed.get(k), v) for k, v in self._requested.items()
                   if _canonical(resumed.get(k)) != _canonical(v)}
        if changed:
            key, (saved, asked) = next(iter(changed.items()))
            raise SystemExit(
                f"error: --ckpt_path {_run_config(self.config).get('ckpt_path')} resumes a run whose model had {key}={saved!r}, but this command sets "
                f"{key}={asked!r} ({len(changed)} value(s) differ: {', '.join(changed)}). A resume continues the "
                "saved run exactly (its hyper-parameters, weights, optimizer and scheduler state), so the change "
                "would not apply. Drop the override to resume, or start a new run that loads only the weights."
            )


def _canonical(value: Any) -> Any:
    """``value`` with every ``class_path`` resolved to the class's defining module, so that
    ``lightning_moe.gating.SoftmaxTopK`` equals ``lightning_moe.gating.softmax_topk.SoftmaxTopK``."""
    if isinstance(value, dict):
        out = {k: _canonical(v) for k, v in value.items()}
        path = out.get("class_path")
        if isinstance(path, str):
            module, _, name = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
                out["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            except (ImportError, AttributeError, ValueError):
                pass
        return out
    return [_canonical(v) for v in value] if isinstance(value, list) else value


def _run_config(config):
    """The parsed config of the subcommand being run (``fit``, ...), or the whole config without subcommands."""
    return config[config.subcommand] if config.get("subcommand") else config


def _model_args(config) -> dict[str, Any]:
    """The model's ``init_args`` (and ``dict_kwargs``) of the parsed config, as plain data."""
    model = _run_config(config).get("model")
    if model is None or not hasattr(model, "get"):
        return {}
    args = {}
    for part in ("init_args", "dict_kwargs"):
        value = model.get(part)
        if value is not None:
            args.update(value.as_dict() if hasattr(value, "as_dict") else dict(value))
    return args


# Commands that are not LightningCLI subcommands: first word -> "module:function" taking the remaining arguments and
# returning an exit status. Imported only when used, so `fit` never pays for them.
COMMANDS: dict[str, str] = {
    "study": "lightning_moe.studies.cli:main",
    "params": "lightning_moe.params:main",
    "probe": "lightning_moe.diagnostics:main",
}


HELP_EPILOG = (
    "Other commands: `lightning-moe study run|report <study folder>` runs a study's grid and writes its report; "
    "`lightning-moe params --config <recipe>` counts parameters and FLOPs; `lightning-moe probe --config <recipe> "
    "--ckpt_path <ckpt>` measures the loss as each token's top experts are disabled. Add --help to any."
)


def main(args: list[str] | None = None) -> None:
    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    if args and args[0] in COMMANDS:
        module, _, function = COMMANDS[args[0]].partition(":")
        status = getattr(importlib.import_module(module), function)(args[1:])
        if status:
            raise SystemExit(status)
        return
    MoECLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        # None = read sys.argv: passing it again as ``args`` makes LightningCLI warn about both being given.
        args=None if from_argv else args, save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "prog": "lightning-moe", "epilog": HELP_EPILOG},
    )


if __name__ == "__main__":
    main()
