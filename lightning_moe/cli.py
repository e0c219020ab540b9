"""The ``lightning-moe`` command: LightningCLI (fit/validate/test/predict) for any of our modules and data."""

from __future__ import annotations

import importlib
import sys

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["MoECLI", "main"]


class MoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--torch_threads", type=int, default=1,
            help="torch CPU threads; 1 is fastest for the tiny models of the recipes on a shared CPU (0 = torch's "
            "default).",
        )

    def before_instantiate_classes(self) -> None:
        threads = self.config[self.subcommand].torch_threads if self.subcommand else self.config.torch_threads
        if threads < 0:
            raise ValueError(f"--torch_threads must be >= 0, got {threads}.")
        if threads:
            torch.set_num_threads(threads)


# Commands that are not LightningCLI subcommands: first word -> "module:function" taking the remaining arguments and
# returning an exit status. Imported only when used, so `fit` never pays for them.
COMMANDS: dict[str, str] = {
    "study": "lightning_moe.studies.cli:main",
    "params": "lightning_moe.params:main",
    "probe": "lightning_moe.diagnostics:main",
}


def main(args: list[str] | None = None) -> None:
    args = list(args if args is not None else sys.argv[1:])
    if args and args[0] in COMMANDS:
        module, _, function = COMMANDS[args[0]].partition(":")
        status = getattr(importlib.import_module(module), function)(args[1:])
        if status:
            raise SystemExit(status)
        return
    MoECLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


if __name__ == "__main__":
    main()
