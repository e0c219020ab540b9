"""The MoE transformer and its LightningModule."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.layers import DenseFFN, MoELayer, moe_layers
from lightning_moe.models import MoETransformer
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TinyLMData, fit_poisoned_at_step_2

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=32)


def test_attention_and_routing_are_causal():
    model = MoETransformer(**TINY).eval()
    tokens = torch.randint(0, 32, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 32
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def test_moe_every_places_moe_on_every_nth_block():
    model = MoETransformer(**(TINY | dict(n_layers=4)), moe_every=2)
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    assert [layer.name for layer in moe_layers(model)] == ["blocks.1.ffn", "blocks.3.ffn"]


def test_each_layer_gets_its_own_router_copy():
    model = MoETransformer(**TINY)
    r0, r1 = (layer.router for layer in moe_layers(model))
    assert r0 is not r1 and not torch.equal(r0.layer.weight, r1.layer.weight)


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        MoETransformer(**TINY)(torch.zeros(1, 33, dtype=torch.long))


def test_token_ids_outside_vocabulary_are_rejected():
    with pytest.raises(ValueError, match=r"vocab_size=32\), got \[0, 40\]"):
        MoETransformer(**TINY)(torch.tensor([[0, 40]]))


def test_odd_head_width_is_rejected():
    with pytest.raises(ValueError, match="n_heads=3"):
        MoETransformer(**(TINY | dict(n_heads=3)))


def test_training_loss_is_cross_entropy_plus_aux_losses():
    module = MoELanguageModel(**TINY)
    batch = next(iter(TinyLMData().train_dataloader()))
    module.log_dict = module.log = lambda *a, **k: None  # outside a Trainer
    loss = module.training_step(batch, 0)
    ce = torch.nn.functional.cross_entropy(module(batch["tokens"]).flatten(0, 1), batch["labels"].flatten())
    aux = sum(layer.aux_loss for layer in moe_layers(module.model))
    torch.testing.assert_close(loss, ce + aux)


def test_vocab_mismatch_with_data_is_reported_before_training(tmp_path):
    module = MoELanguageModel(**(TINY | dict(vocab_size=64)))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size: 32"):
        trainer.fit(module, datamodule=TinyLMData())


def test_fit_logs_loss_bits_and_load_balance(tmp_path):
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(MoELanguageModel(**TINY), datamodule=TinyLMData())
    m = trainer.callback_metrics
    # A snapshot, not a subset: a renamed or new key changes users' dashboards. "loss" is the progress bar's CE.
    assert set(m) == {"loss", "train/loss", "train/ce", "train/bits_per_token", "train/aux/load_balancing",
                      "train/aux/z_loss", "train/maxvio_batch", "val/loss", "val/bits_per_token", "val/cv",
                      "val/maxvio_global", "val/load_entropy", "val/dead_experts"}
    torch.testing.assert_close(m["val/bits_per_token"], m["val/loss"] / torch.log(torch.tensor(2.0)))


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_router(tmp_path):
    from lightning_moe.gating import SigmoidTopK

    module = MoELanguageModel(**TINY, router=SigmoidTopK(bias_update_rate=0.01))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TinyLMData())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)  # no pickled modules in the checkpoint
    assert raw["hyper_parameters"]["router"]["class_path"] == "lightning_moe.gating.loss_free.SigmoidTopK"
    loaded = MoELanguageModel.load_from_checkpoint(ckpt)
    router = moe_layers(loaded.model)[0].router
    assert isinstance(router, SigmoidTopK) and router.bias_update_rate == 0.01
    for (name, a), b in zip(module.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_in_routing_stops_training_with_layer_and_step(tmp_path):
    with pytest.raises(ValueError, match=r"global step 2, blocks.1.ffn: non-finite router scores"):
        fit_poisoned_at_step_2(tmp_path)


@pytest.mark.parametrize("name", ["blocks.0.attn.proj.weight", "blocks.0.ffn.shared_expert.w2.weight"])
def test_residual_output_projections_are_scaled_by_depth(name):
    """nn.Linear's default init is uniform in +-1/sqrt(fan_in); GPT-2's scaling shrinks that bound by
    1/sqrt(2 * n_layers) = 1/4 for 8 layers, the shared expert's output projection included."""
    model = MoETransformer(**{**TINY, "n_layers": 8, "shared_d_ff": 64})
    weight = dict(model.named_parameters())[name]
    bound = weight.shape[1] ** -0.5
    assert weight.abs().max() <= bound / 4
