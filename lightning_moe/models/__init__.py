from lightning_moe.models.transformer import MoETransformer

__all__ = ["MoETransformer"]
