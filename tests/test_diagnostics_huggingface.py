"""Diagnostics on Hugging Face MoE models built from tiny configs (nothing downloaded): co-activation on three
families equals the co-selection of their own router logits; the alarms read the models' balance-loss setup."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.adapters import find_taps
from lightning_moe.callbacks import CoActivationMonitor, RoutingAlarms

transformers = pytest.importorskip("transformers", reason="Hugging Face adapters need the `hf` extra (transformers>=5)")

E, K = 4, 2
COMMON = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "num_experts_per_tok": K, "max_position_embeddings": 32}
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=E, intermediate_size=32, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=E, intermediate_size=32, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=E, moe_intermediate_size=32, intermediate_size=32,
                                                     decoder_sparse_step=1, head_dim=8, **COMMON),
}
LAYERS = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]


class HFModule(pl.LightningModule):
    def __init__(self, family: str, router_logits: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
        with torch.no_grad():  # some families start their routers at zero: randomise, so top-k has no ties
            for tap in find_taps(self.model):
                tap.router_weight_ED().normal_()
        self.router_logits = router_logits
        self.val_logits: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        return self.model(ids, labels=ids, output_router_logits=self.router_logits or None).loss

    def validation_step(self, batch, batch_idx):
        out = self.model(batch["input_ids"], output_router_logits=True)
        self.val_logits.append(torch.stack(out.router_logits))  # [layers, T, E]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def batches(n=2):
    g = torch.Generator().manual_seed(0)
    return DataLoader([{"input_ids": torch.randint(0, 64, (8,), generator=g)} for _ in range(2 * n)], batch_size=2)


def trainer(callbacks, root, steps=2):  # steps=0: for validate
    torch.set_num_threads(1)
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, accelerator="cpu",
                      num_sanity_val_steps=0, limit_val_batches=0 if steps else None)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_coactivation_equals_the_routers_own_top_k(family, tmp_path):
    module = HFModule(family)
    monitor = CoActivationMonitor(plots=False)
    trainer([monitor], tmp_path, steps=0).validate(module, batches())
    logits_LTE = torch.cat(module.val_logits, dim=1)
    for layer, logits_TE in zip(LAYERS, logits_LTE):
        experts_TK = torch.softmax(logits_TE.float(), dim=-1).topk(K, dim=-1).indices
        pairs = torch.zeros(E, E, dtype=torch.float64)
        counts = torch.zeros(E, dtype=torch.float64)
        for i, j in experts_TK.tolist():
            pairs[i, j] += 1
            pairs[j, i] += 1
            counts[i] += 1
            counts[j] += 1
        expected = pairs / counts.clamp_min(1).unsqueeze(1)
        assert torch.equal(monitor.matrices["val"][layer], expected.float()), layer
        assert monitor.logged[f"val/coact/{layer}/max"] == pytest.approx(float(expected.max()))


def fit_alarms(module, root):
    alarms = RoutingAlarms(every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer([alarms], root).fit(module, batches())
    return {k: v for k, v in alarms.fired.items() if v}, [str(w.message) for w in record]


def test_model_trained_without_router_logits_has_no_balance_loss(tmp_path):
    fired, messages = fit_alarms(HFModule("mixtral"), tmp_path)
    assert fired == {"no_balance_loss": ["model"]}
    assert any("[no_balance_loss]" in m and "output_router_logits=True" in m for m in messages)


def test_model_trained_with_its_balance_loss_is_quiet(tmp_path):
    fired, _ = fit_alarms(HFModule("olmoe", router_logits=True), tmp_path)
    assert fired == {}


def test_router_logits_that_are_already_probabilities(tmp_path):
    # transformers#45120: a gate that returns softmaxed "logits", which the balance loss softmaxes again.
    module = HFModule("mixtral", router_logits=True)
    for tap in find_taps(module.model):
        tap.router.register_forward_hook(lambda m, args, out: (torch.softmax(out[0], dim=-1), *out[1:]))
    fired, _ = fit_alarms(module, tmp_path)
    assert fired == {"softmaxed_logits": ["model"]}


def test_detached_gate_gets_no_gradient(tmp_path):
    module = HFModule("qwen3_moe", router_logits=True)
    for tap in find_taps(module.model):  # a bug: the gate's outputs are cut from the graph
        tap.router.register_forward_hook(lambda m, args, out: tuple(t.detach() for t in out))
    alarms = RoutingAlarms(every_n_steps=1, patience=2)
    trainer([alarms], tmp_path, steps=3).fit(module, batches(3))
    assert alarms.fired["no_router_grad"] == LAYERS
