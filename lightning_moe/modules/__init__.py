from lightning_moe.modules.language_model import MoELanguageModel

__all__ = ["MoELanguageModel"]
