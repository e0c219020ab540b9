"""bf16 training steps on CPU with the native backend, for every kind of router."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.gating import KMeansRouter, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import moe_layers
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TinyLMData

ROUTERS = {"softmax": SoftmaxTopK, "sigmoid": SigmoidTopK, "kmeans": KMeansRouter,
           "transition": lambda: TransitionRouter(precision=True)}


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_steps_run_with_fp32_router_math(precision, router, tmp_path):
    module = MoELanguageModel(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=2,
                              router=ROUTERS[router]())
    trainer = pl.Trainer(max_steps=3, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TinyLMData())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    routing = moe_layers(module.model)[0].routing
    # Router probabilities and every balance loss stay fp32 whatever the module's dtype.
    assert routing.scores_TE.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in routing.aux_losses.values())
