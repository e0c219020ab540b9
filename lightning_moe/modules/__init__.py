"""LightningModules: the MoE language model. The studies' own modules live with each study under
:mod:`lightning_moe.studies`."""

from lightning_moe.modules.language_model import MoELanguageModel

__all__ = ["MoELanguageModel"]
