"""Every router in a 2-step Lightning fit of the MoE language model, its state through a state_dict round trip,
and its selection by ``class_path`` in the CLI."""

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_moe import MoELayer
from lightning_moe.cli import main
from lightning_moe.gating import ExpertChoice, KMeansRouter, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TinyLMData
from tests.test_recipes import ROOT

TINY = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=16)

ROUTERS = {
    "softmax": lambda: SoftmaxTopK(),
    "sigmoid": lambda: SigmoidTopK(bias_update_rate=0.01, sequence_balance_weight=1e-4),
    "expert_choice": lambda: ExpertChoice(group="position"),
    "kmeans": lambda: KMeansRouter(bias_update_rate=0.01),
    "transitions": lambda: TransitionRouter(beta=True, precision=True, anticipation=True, carry_state=True),
}
# Buffers that a fit must have moved away from their initial values.
STATE = {"sigmoid": ["expert_bias"], "kmeans": ["expert_bias", "centroids_ED"],
         "transitions": ["precision_var_E", "memory_BD"]}


def fit_two_steps(module, tmp_path, accumulate=1):
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TinyLMData(batches=2 * accumulate, seq_len=16))
    return trainer


@pytest.mark.parametrize("name", ROUTERS)
def test_router_trains_in_the_language_model_and_its_state_round_trips(name, tmp_path):
    module = MoELanguageModel(**TINY, router=ROUTERS[name]())
    initial = {k: v.clone() for k, v in module.model.blocks[0].ffn.router.state_dict().items()}
    trainer = fit_two_steps(module, tmp_path)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    router = module.model.blocks[0].ffn.router
    trained = router.state_dict()
    for key in STATE.get(name, []):
        assert initial[key].shape != trained[key].shape or not torch.equal(initial[key], trained[key])

    restored = MoELanguageModel(**TINY, router=ROUTERS[name]())
    restored.load_state_dict(module.state_dict())
    for key, value in trained.items():
        torch.testing.assert_close(restored.model.blocks[0].ffn.router.state_dict()[key], value)
    tokens = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(restored.eval()(tokens), module.eval()(tokens))


class CountingSigmoid(SigmoidTopK):
    def __init__(self):
        super().__init__()
        self.observed = self.applied = 0

    def observe(self, x_TD, routing):
        super().observe(x_TD, routing)
        self.observed += 1

    def apply_pending(self):
        super().apply_pending()
        self.applied += 1


def test_one_state_update_per_optimizer_step_with_gradient_accumulation(tmp_path):
    module = MoELanguageModel(**TINY, router=CountingSigmoid())
    fit_two_steps(module, tmp_path, accumulate=2)
    router = module.model.blocks[0].ffn.router
    assert (router.observed, router.applied) == (4, 2)


CLASS_PATHS = ["SigmoidTopK", "ExpertChoice", "KMeansRouter", "TransitionRouter"]


@pytest.mark.parametrize("name", CLASS_PATHS)
def test_router_is_selected_by_class_path(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--print_config",
              "--model.init_args.router", f"lightning_moe.gating.{name}"])
    assert exit_info.value.code == 0
    router = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["router"]
    assert router["class_path"] == f"lightning_moe.gating.{name}" and "d_model" not in router["init_args"]


def test_literal_arguments_are_checked_when_the_config_is_parsed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--print_config",
              "--model.init_args.router", "lightning_moe.gating.ExpertChoice",
              "--model.init_args.router.init_args.group", "batch"])
    assert exit_info.value.code != 0 and "batch" in capsys.readouterr().err


def test_training_loss_is_mean_cross_entropy_plus_aux_and_feeds_token_errors():
    module = MoELanguageModel(**TINY, router=TransitionRouter(beta=True, precision=True, anticipation=True))
    module.log_dict = module.log = lambda *a, **k: None  # outside a Trainer
    batch = next(iter(TinyLMData().train_dataloader()))
    loss = module.training_step(batch, 0)
    layer = module.model.blocks[0].ffn
    ce_BS = torch.nn.functional.cross_entropy(module(batch["tokens"]).flatten(0, 1), batch["labels"].flatten(),
                                              reduction="none")
    torch.testing.assert_close(loss, ce_BS.mean() + layer.aux_loss)
    routing = layer.routing
    w_TE = torch.zeros(32, 4).scatter_add_(1, routing.experts_TK, routing.weights_TK.detach())
    torch.testing.assert_close(layer.router.pending_error_E, w_TE.T @ ce_BS.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ROUTERS)
def test_router_runs_under_bf16_autocast(name):
    layer = MoELayer(16, 16, num_experts=4, top_k=2, router=ROUTERS[name]()).train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        loss = y.float().square().mean() + layer.aux_loss
    loss.backward()
    assert torch.isfinite(x.grad).all() and layer.routing.weights_TK.dtype == torch.float32
