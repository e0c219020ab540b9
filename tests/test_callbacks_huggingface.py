"""The monitors on a Hugging Face MoE model we did not write, inside a user's LightningModule."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.adapters import record_routing
from lightning_moe.callbacks import LoadBalanceMonitor, SpecializationMonitor, TransitionMonitor

transformers = pytest.importorskip("transformers", reason="Hugging Face adapters need the `hf` extra (transformers>=5)")
B, S, PAD = 2, 8, 2  # the last PAD positions of every sequence are padding


class MixtralModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.MixtralConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        )
        self.model = transformers.AutoModelForCausalLM.from_config(config)

    def training_step(self, batch, batch_idx):
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def batches(n=3):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(S, dtype=torch.long)
    mask[-PAD:] = 0
    items = []
    for _ in range(n * B):
        ids = torch.randint(0, 64, (S,), generator=g)
        items.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask,
                      "domain_ids": (torch.arange(S) >= S // 2).long()})
    return DataLoader(items, batch_size=B)


def test_monitors_tap_a_transformers_model_and_honour_its_attention_mask(tmp_path):
    torch.manual_seed(0)
    load = LoadBalanceMonitor(every_n_steps=100, plots=False)  # no logging: the window keeps every step
    spec = SpecializationMonitor(num_labels=2, token_key="input_ids", vocab_size=64, every_n_steps=3, plots=False)
    trans = TransitionMonitor(num_labels=2, window=1, every_n_steps=3, plots=False)
    pl.Trainer(max_steps=3, callbacks=[load, spec, trans], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
               accelerator="cpu").fit(MixtralModule(), batches())
    layers = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert sorted(load.taps) == layers
    for layer in layers:
        counts_E = load.metrics[f"train/{layer}/load"].counts_E
        assert counts_E.sum().item() == 3 * B * (S - PAD) * 2  # steps x real tokens x top-2: padding excluded
        assert f"train/spec/{layer}/token_specialization" in spec.logged
        assert f"train/transition/{layer}/p_correct@+0" in trans.logged


class ZayaModule(MixtralModule):
    """ZAYA: top-1 over E + 1 router classes, the last a skip class (no expert computes its tokens)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        config = transformers.ZayaConfig(
            vocab_size=64, hidden_size=16, moe_intermediate_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=1,
            max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        self.model = transformers.AutoModelForCausalLM.from_config(config)
        for layer in self.model.model.layers:  # its -1 init bias keeps the skip class unchosen: let it occur
            layer.mlp.gate.balancing_biases.zero_()


def zaya_first_step():
    """A seeded ZAYA module, the routing events of its first batch, and which of that batch's tokens are real."""
    torch.manual_seed(0)
    module = ZayaModule()
    first = next(iter(batches(1)))
    with record_routing(module.model) as events, torch.no_grad():
        module.model(first["input_ids"], attention_mask=first["attention_mask"])
    return module, events, first["attention_mask"].reshape(-1).bool()


def test_skip_slots_reach_no_expert_count_and_specialization_runs(tmp_path):
    module, events, real_T = zaya_first_step()
    want = [int((~e.skipped_TK.reshape(-1) & real_T).sum()) for e in events]  # counted slots, step 1
    assert sum(int(e.skipped_TK.sum()) for e in events) > 0
    load = LoadBalanceMonitor(every_n_steps=100, plots=False)
    # Before #17 ZAYA's scores had E + 1 columns and this monitor raised on them.
    spec = SpecializationMonitor(num_labels=2, token_key="input_ids", vocab_size=64, every_n_steps=1, plots=False)
    pl.Trainer(max_steps=1, callbacks=[load, spec], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
               accelerator="cpu").fit(module, batches(1))
    got = [load.metrics[f"train/model.{e.layer}/load"].counts_E.sum().item() for e in events]
    assert got == want
    assert f"train/spec/model.{events[0].layer}/token_specialization" in spec.logged


def test_skip_slots_are_counted_beside_the_load(tmp_path):
    module, events, real_T = zaya_first_step()
    load = LoadBalanceMonitor(every_n_steps=1, plots=False)
    pl.Trainer(max_steps=1, callbacks=[load], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu").fit(module, batches(1))
    for e in events:
        skipped = int((e.skipped_TK.reshape(-1) & real_T).sum())
        assert load.logged[f"train/load/model.{e.layer}/skipped_share"] == pytest.approx(skipped / int(real_T.sum()))
        assert load.logged[f"train/load/model.{e.layer}/dropped_share"] == 0
