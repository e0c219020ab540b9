"""``CouplingMonitor`` in a tiny fit: what it logs, the JSON artifact, and the pooled ρ against a reference
recomputed from the fitted model with a per-token loop."""

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.callbacks import CouplingMonitor
from lightning_moe.gating import SoftmaxTopK
from lightning_moe.layers import moe_layers
from lightning_moe.metrics.coupling import correlation_log10_p, coupling_stats
from lightning_moe.metrics.geometry import paired_alignment
from lightning_moe.metrics.load import load_stats
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TinyLMData

LAYERS = ["model.blocks.0.ffn", "model.blocks.1.ffn"]
E = 4


class BatchMaxVio(pl.Callback):
    """Reference: each training batch's MaxVio per layer, straight from the layers' routing."""

    def __init__(self):
        self.per_step = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append([float(load_stats(layer.routing.expert_counts(E))["maxvio"])
                              for layer in moe_layers(pl_module.model)])


def tiny_fit(root, monitor, max_steps=4, router=None, extra_callbacks=(), ckpt_path=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoELanguageModel(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=8, num_experts=E, top_k=2,
                             max_seq_len=16, warmup_steps=1, router=router)
    trainer = pl.Trainer(
        max_steps=max_steps, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1,
        callbacks=[monitor, *extra_callbacks], default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu",
    )
    trainer.fit(model, datamodule=TinyLMData(), ckpt_path=ckpt_path)
    return trainer, model


class InitialRows(pl.Callback):
    """Reference: every layer's router rows before the first training step."""

    def on_train_start(self, trainer, pl_module):
        self.rows = [layer.router.layer.weight.detach().clone() for layer in moe_layers(pl_module.model)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("coupling")
    monitor, reference, initial = CouplingMonitor(min_group_pairs=4, plots=False), BatchMaxVio(), InitialRows()
    trainer, model = tiny_fit(root, monitor, extra_callbacks=(reference, initial))
    return trainer, model, monitor, TinyLMData(), root, reference.per_step, initial.rows


def test_headline_and_per_layer_values_reach_callback_metrics(fitted):
    trainer, *_ = fitted
    got = trainer.callback_metrics
    for key in ("rho", "log10_p", "n", "median_group_rho"):
        assert f"val/coupling/weight_vs_gate_norm/{key}" in got
    for layer in LAYERS:
        assert f"val/coupling/{layer}/logit_vs_up_norm/rho" in got
        assert f"val/geometry/{layer}/mean_cosine" in got
        assert f"val/train_maxvio_batch/{layer}" in got
    assert {"val/geometry/mean_cosine", "val/train_maxvio_batch", "val/coupling/negative_weight_fraction"} <= set(got)


def reference_pairs(model, data):
    """(weight, ||h W_gate_e^T||, layer * E + e) of every validation (token, slot), one token at a time."""
    inputs = {}
    layers = moe_layers(model.model)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    weights, norms, groups = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            model(batch["tokens"])
            for i, layer in enumerate(layers):
                gate_EFD = layer.experts.mlp.per_expert("w1")
                r = layer.routing
                for t in range(r.experts_TK.shape[0]):
                    for k in range(r.experts_TK.shape[1]):
                        e = int(r.experts_TK[t, k])
                        weights.append(float(r.weights_TK[t, k]))
                        norms.append(float((gate_EFD[e] @ inputs[i][t]).norm()))
                        groups.append(i * E + e)
    for h in hooks:
        h.remove()
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64), torch.tensor(groups)


def test_pooled_rho_matches_a_per_token_reference(fitted):
    trainer, model, _, data, *_ = fitted
    ref = coupling_stats(*reference_pairs(model, data))
    got = trainer.callback_metrics
    assert float(got["val/coupling/weight_vs_gate_norm/n"]) == ref["n"] == 2 * 2 * 2 * 16 * 2  # batches x B x S x K x L
    assert float(got["val/coupling/weight_vs_gate_norm/rho"]) == pytest.approx(ref["rho"], abs=1e-5)
    assert float(got["val/coupling/weight_vs_gate_norm/log10_p"]) == pytest.approx(
        correlation_log10_p(ref["rho"], ref["n"]), abs=1e-3)


def test_train_maxvio_batch_averages_the_batches_since_the_previous_validation(fitted):
    trainer, *_, per_step, _ = fitted
    # log_every_n_steps=1: the training log window (one step) is shorter than the validation interval (two).
    for i, layer in enumerate(LAYERS):
        expected = (per_step[2][i] + per_step[3][i]) / 2  # steps 3 and 4, after the validation at step 2
        assert float(trainer.callback_metrics[f"val/train_maxvio_batch/{layer}"]) == pytest.approx(expected)


def test_artifact_keeps_one_history_entry_per_validation_with_other_val_keys(fitted):
    *_, root, _, _ = fitted
    art = json.loads((root / "coupling.json").read_text())
    assert art["layers"] == LAYERS
    assert [h["step"] for h in art["history"]] == [2, 4]
    assert "val/loss" in art["history"][-1]["metrics"]
    assert len(art["coupling"]["weight_vs_up_norm"]["pooled"]["deciles"]) == 10
    assert set(art["coupling"]["weight_vs_up_norm"]["layers"]) == set(LAYERS)
    assert set(art["geometry"]) == set(LAYERS)


def test_history_round_trips_through_the_callback_state(fitted):
    _, _, monitor, *_ = fitted
    fresh = CouplingMonitor()
    fresh._load_extra_state(monitor._extra_state())
    assert fresh.history == monitor.history


def routed_inputs(model, data):
    """Per layer, each validation token's MoE input and its K selected experts, one forward at a time."""
    inputs = {}
    layers = moe_layers(model.model)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    per_layer = [([], []) for _ in layers]
    model.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            model(batch["tokens"])
            for i, layer in enumerate(layers):
                per_layer[i][0].append(inputs[i])
                per_layer[i][1].append(layer.routing.experts_TK)
    for h in hooks:
        h.remove()
    return [(torch.cat(x), torch.cat(e)) for x, e in per_layer]


def test_history_check_compares_each_rows_change_with_the_mean_input_of_its_own_expert(fitted):
    trainer, model, _, data, *_, rows0 = fitted
    for i, (layer, (x_TD, experts_TK)) in enumerate(zip(moe_layers(model.model), routed_inputs(model, data))):
        mu_ED = torch.stack([x_TD[(experts_TK == e).any(1)].double().mean(0) for e in range(E)])  # top-2: distinct
        ref = paired_alignment(layer.router.layer.weight.detach() - rows0[i], mu_ED)
        for k in ("matched", "mismatched", "match_rate"):
            got = float(trainer.callback_metrics[f"val/coupling/{LAYERS[i]}/history/{k}"])
            assert got == pytest.approx(float(ref[k]), abs=1e-5), k


def test_up_direction_check_uses_the_top_right_singular_vector_of_each_experts_up_projection(fitted):
    trainer, model, *_ = fitted
    for i, layer in enumerate(moe_layers(model.model)):
        rows_ED, up_EFD = layer.router.layer.weight.detach(), layer.experts.mlp.per_expert("v1").detach()  # SwiGLU's linear branch
        cos_EE = torch.empty(E, E)
        for a in range(E):
            for b in range(E):
                top_D = torch.linalg.svd(up_EFD[b].double()).Vh[0]
                cos_EE[a, b] = abs(float(torch.nn.functional.cosine_similarity(rows_ED[a].double(), top_D, dim=0)))
        got = trainer.callback_metrics
        assert float(got[f"val/coupling/{LAYERS[i]}/up_direction/matched"]) == pytest.approx(
            float(cos_EE.diagonal().mean()), abs=1e-5)
        assert float(got[f"val/coupling/{LAYERS[i]}/up_direction/mismatched"]) == pytest.approx(
            float(cos_EE[~torch.eye(E, dtype=torch.bool)].mean()), abs=1e-5)


def test_history_and_up_direction_means_over_layers_are_logged(fitted):
    got = fitted[0].callback_metrics
    for check in ("history", "up_direction"):
        per_layer = [float(got[f"val/coupling/{layer}/{check}/matched"]) for layer in LAYERS]
        assert float(got[f"val/coupling/{check}/matched"]) == pytest.approx(sum(per_layer) / len(per_layer))


def test_a_resumed_fit_keeps_the_origin_of_the_first(tmp_path):
    initial = InitialRows()
    trainer, _ = tiny_fit(tmp_path, CouplingMonitor(min_group_pairs=4, plots=False), max_steps=2,
                          extra_callbacks=(initial,))
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = CouplingMonitor(min_group_pairs=4, plots=False)
    tiny_fit(tmp_path, resumed, max_steps=4, ckpt_path=tmp_path / "step2.ckpt")
    assert all(torch.equal(resumed.initial_rows[layer], initial.rows[i]) for i, layer in enumerate(LAYERS))


def test_a_frozen_router_has_no_history_to_check(tmp_path):
    trainer, _ = tiny_fit(tmp_path, CouplingMonitor(min_group_pairs=4, plots=False), max_steps=2,
                          router=SoftmaxTopK(frozen=True))
    got = trainer.callback_metrics
    assert not any("/history/" in k for k in got)
    assert "val/coupling/up_direction/matched" in got


def test_artifact_must_be_a_file_name():
    with pytest.raises(ValueError, match="artifact must be a plain file name"):
        CouplingMonitor(artifact="plots/coupling.json")


def test_min_group_pairs_must_be_positive():
    with pytest.raises(ValueError, match="min_group_pairs"):
        CouplingMonitor(min_group_pairs=0)


def test_cosine_scores_with_a_negative_sum_still_give_a_routing_distribution():
    # K-Means scores are cosines; a token whose cosines sum below zero used to get masses of ±1e38 and broke the
    # specialisation monitor's soft table. Negative affinities now carry no mass.
    from lightning_moe.adapters import RoutingEvent

    event = RoutingEvent("layer", torch.tensor([[0, 1]]), torch.tensor([[0.2, -0.1]]),
                         scores_TE=torch.tensor([[0.2, -0.1, -0.5, 0.6]]))
    assert event.routing_mass_TE(4).tolist() == [[0.25, 0.0, 0.0, 0.75]]
