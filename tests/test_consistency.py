"""Routing consistency: router saturation (OLMoE) and routing fluctuation (StableMoE) on hand-made routings, and
RoutingConsistencyMonitor on a tiny fit: probe routing, resume, plot."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.callbacks import RoutingConsistencyMonitor
from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.gating import ExpertChoice
from lightning_moe.metrics import RoutingOverlap, order_by_weight, router_saturation, routing_fluctuation
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TINY, TinyLMData, fit_two_layer_lm

A_TK = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])


def test_identical_routings_saturate_and_do_not_fluctuate():
    assert router_saturation(A_TK, A_TK).item() == 1.0
    assert routing_fluctuation(A_TK, A_TK).item() == 0.0


def test_disjoint_routings_give_zero_saturation_and_full_fluctuation():
    B_TK = torch.tensor([[2, 3], [0, 1], [3, 2], [1, 0]])
    assert router_saturation(A_TK, B_TK).item() == 0.0
    assert routing_fluctuation(A_TK, B_TK).item() == 1.0


def test_partial_overlaps_are_exact():
    # Per token: {0,1}v{0,2} 1/2, {2,3}v{3,2} 2/2 (top-1 changed), {1,0}v{1,3} 1/2, {3,2}v{0,1} 0.
    B_TK = torch.tensor([[0, 2], [3, 2], [1, 3], [0, 1]])
    assert router_saturation(A_TK, B_TK).item() == 0.5  # (0.5 + 1 + 0.5 + 0) / 4
    assert routing_fluctuation(A_TK, B_TK).item() == 0.5  # tokens 1 and 3 changed their top-1
    keep_T = torch.tensor([True, True, False, False])
    assert router_saturation(A_TK, B_TK, keep_T).item() == 0.75
    assert routing_fluctuation(A_TK, B_TK, keep_T).item() == 0.5


def test_slots_are_ordered_by_weight_before_comparing_top1():
    experts_TK = torch.tensor([[0, 1], [2, 3]])
    weights_TK = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    assert order_by_weight(experts_TK, weights_TK).tolist() == [[1, 0], [2, 3]]


def test_functions_and_metric_equal_a_plain_python_loop():
    g = torch.Generator().manual_seed(0)
    T, E, K = 200, 8, 3
    a_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    b_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    keep_T = torch.rand(T, generator=g) > 0.3
    pairs = [(a, b) for a, b, k in zip(a_TK.tolist(), b_TK.tolist(), keep_T.tolist()) if k]
    saturation = sum(len(set(a) & set(b)) / K for a, b in pairs) / len(pairs)
    fluctuation = sum(a[0] != b[0] for a, b in pairs) / len(pairs)
    assert router_saturation(a_TK, b_TK, keep_T).item() == pytest.approx(saturation, abs=1e-12)
    assert routing_fluctuation(a_TK, b_TK, keep_T).item() == pytest.approx(fluctuation, abs=1e-12)
    metric = RoutingOverlap()
    for part in range(0, T, 64):  # in batches, as a validation set would arrive
        metric.update(a_TK[part:part + 64], b_TK[part:part + 64], keep_T[part:part + 64])
    out = metric.compute()
    assert out["saturation"].item() == pytest.approx(saturation, abs=1e-12)
    assert out["fluctuation"].item() == pytest.approx(fluctuation, abs=1e-12)


def test_mismatched_shapes_name_both_and_the_fix():
    with pytest.raises(ValueError, match=r"experts_TK \(4, 2\) and ref_TK \(3, 2\) must be the same"):
        router_saturation(A_TK, A_TK[:3])


# ------------------------------------------------------------------------------------------------ the monitor
LAYERS = ["model.blocks.0.ffn", "model.blocks.1.ffn"]


def _fit(root, max_steps, ckpt_path=None, save_at=None, probe_batches=2):
    monitor = RoutingConsistencyMonitor(every_n_steps=2, probe_batches=probe_batches)
    return monitor, fit_two_layer_lm(root, monitor, max_steps, ckpt_path, save_at)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("consistency")
    return (*_fit(root, max_steps=6, save_at=4), root)


def test_probe_is_routed_at_every_check_with_exact_counts(full):
    monitor, _, _ = full
    assert monitor.history_steps == [2, 4, 6]
    assert sorted(monitor.history) == LAYERS
    # 2 probe batches x 2 sequences x 16 tokens, top-2, stored as uint8 (E = 4)
    assert all(h.shape == (64, 2) and h.dtype == torch.uint8 for v in monitor.history.values() for h in v)
    for layer in LAYERS:
        assert monitor.curves["saturation_vs_ref"][layer][0] == 1.0  # the reference is the first check
        assert len(monitor.curves["fluctuation"][layer]) == 2
        assert f"train/consistency/{layer}/saturation_vs_prev" in monitor.logged


def test_saturation_against_the_final_check_is_stored_and_plotted(full):
    monitor, _, root = full
    for layer in LAYERS:
        curve = monitor.saturation_vs_final[layer]
        assert len(curve) == 3 and curve[-1] == 1.0
        h = monitor.history[layer]
        assert curve[0] == router_saturation(h[0].long(), h[2].long()).item()
    assert (root / "plots" / "consistency_saturation.png").stat().st_size > 0


def test_probe_routing_leaves_the_training_untouched(full, tmp_path):
    _, with_monitor, _ = full
    pl.seed_everything(0, workers=True)
    module = MoELanguageModel(**{**TINY, "vocab_size": 256, "n_layers": 2}, warmup_steps=2)
    pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
               default_root_dir=tmp_path, accelerator="cpu").fit(
        module, datamodule=ByteCorpusDataModule(seq_len=16, batch_size=2, bytes_per_domain=3000))
    for key, value in module.state_dict().items():
        assert torch.equal(value, with_monitor.state_dict()[key]), key
    assert module.training == with_monitor.training


def test_state_survives_resume(full):
    monitor, _, root = full
    resumed, _ = _fit(root / "resumed", max_steps=6, ckpt_path=root / "ckpt" / "step=4.ckpt")
    assert resumed.history_steps == monitor.history_steps
    for layer in LAYERS:
        assert all(torch.equal(a, b) for a, b in zip(resumed.history[layer], monitor.history[layer]))
    assert resumed.curves == monitor.curves
    assert resumed.saturation_vs_final == monitor.saturation_vs_final
    assert resumed.logged == monitor.logged


def test_reference_step_must_be_a_step():
    with pytest.raises(ValueError, match="reference_step must be None or an optimizer step >= 0, got -1"):
        RoutingConsistencyMonitor(reference_step=-1)


# ------------------------------------------------------------------------------------ Hugging Face families
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_huggingface_families_are_traced_and_compared(family, tmp_path):
    pytest.importorskip("pyarrow")
    from lightning_moe.callbacks import RoutingTraceWriter, read_routing_traces
    from tests.test_adapters_huggingface import _model

    class HFModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(family).train()

        def forward(self, input_ids):
            return self.model(input_ids)

        def training_step(self, batch, batch_idx):
            return self.model(batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g)} for _ in range(8)]
    probe = {"input_ids": torch.randint(0, 64, (2, 8), generator=g)}
    consistency = RoutingConsistencyMonitor(probe=probe, input_key="input_ids", every_n_steps=1, plots=False)
    traces = RoutingTraceWriter(dirpath=tmp_path, tokens_per_step=3, every_n_steps=2, label_keys=["input_ids"])
    pl.Trainer(max_steps=4, callbacks=[consistency, traces], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
               accelerator="cpu").fit(HFModule(), torch.utils.data.DataLoader(data, batch_size=2))
    layers = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert read_routing_traces(tmp_path, format="arrow").num_rows == 2 * 2 * 3  # steps 2, 4 x 2 layers x 3 tokens
    assert consistency.history_steps == [1, 2, 3, 4] and sorted(consistency.saturation_vs_final) == layers
    for layer in layers:
        assert all(0.0 <= s <= 1.0 for s in consistency.saturation_vs_final[layer])
        assert len(consistency.curves["fluctuation"][layer]) == 3
    assert min(min(v) for v in consistency.saturation_vs_final.values()) < 1.0  # lr=0.5 moves the routing


def test_without_validation_data_or_probe_it_warns_and_logs_nothing(tmp_path):
    monitor = RoutingConsistencyMonitor(every_n_steps=1, plots=False)
    module = MoELanguageModel(**TINY, warmup_steps=1)
    with pytest.warns(UserWarning, match="RoutingConsistencyMonitor found no probe set") as record:
        pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                   callbacks=[monitor]).fit(module, TinyLMData().train_dataloader())
    assert len([w for w in record if "found no probe set" in str(w.message)]) == 1
    assert monitor.history_steps == [] and monitor.logged == {}


def test_expert_choice_layers_are_skipped_with_one_warning(tmp_path):
    module = MoELanguageModel(**TINY, router=ExpertChoice(allow_non_causal=True), warmup_steps=1)
    monitor = RoutingConsistencyMonitor(probe={"tokens": torch.zeros(2, 8, dtype=torch.long)}, every_n_steps=1,
                                        plots=False)
    with pytest.warns(UserWarning, match="variable number of experts") as record:
        pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                   callbacks=[monitor]).fit(module, TinyLMData().train_dataloader())
    assert len([w for w in record if "variable number of experts" in str(w.message)]) == 1
    assert monitor.history == {}
