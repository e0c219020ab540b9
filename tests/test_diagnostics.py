"""Routing diagnostics: co-activation, decision margins, load percentiles, their monitors, the end-of-fit summary
and the redundancy probe — exact numbers on tiny hand-made inputs and a plain-Python reference."""

import itertools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_moe.callbacks import (
    CoActivationMonitor,
    LoadBalanceMonitor,
    MarginMonitor,
    RoutingAlarms,
    RoutingSummary,
    routing_summary,
)
from lightning_moe.diagnostics import mask_top_experts, redundancy_probe
from lightning_moe.gating import Router, Routing
from lightning_moe.layers import MoELayer
from lightning_moe.metrics import CoActivation, MarginHistogram, decision_margins_T, load_percentiles
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TINY, TinyLMData

LAYERS = ["model.blocks.0.ffn", "model.blocks.1.ffn"]


# ------------------------------------------------------------------------------------------------ co-activation
def test_coactivation_matrix_by_hand():
    # Tokens: {0,1}, {0,2}, {1,0}, {3,1}. Expert 0 is chosen 3 times, twice with 1, once with 2.
    m = CoActivation(4)
    m.update(torch.tensor([[0, 1], [0, 2], [1, 0], [3, 1]]))
    expected = torch.tensor([
        [0, 2 / 3, 1 / 3, 0],
        [2 / 3, 0, 0, 1 / 3],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
    ], dtype=torch.float64)
    assert torch.equal(m.compute(), expected)


def test_coactivation_counts_only_kept_slots():
    m = CoActivation(3)
    m.update(torch.tensor([[0, 1], [0, 2]]), keep_TK=torch.tensor([[True, True], [True, False]]))
    assert torch.equal(m.pairs_EE, torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert torch.equal(m.counts_E, torch.tensor([2, 1, 0], dtype=torch.float64))


def test_coactivation_equals_a_plain_python_reference_on_random_routings():
    g = torch.Generator().manual_seed(0)
    E, K = 6, 3
    m = CoActivation(E)
    rows = []
    for _ in range(3):
        experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(20)])
        m.update(experts_TK)
        rows += experts_TK.tolist()
    pairs = [[0] * E for _ in range(E)]
    counts = [0] * E
    for row in rows:
        for i in row:
            counts[i] += 1
        for i, j in itertools.permutations(row, 2):
            pairs[i][j] += 1
    reference = torch.tensor([[pairs[i][j] / counts[i] if counts[i] else 0.0 for j in range(E)] for i in range(E)],
                             dtype=torch.float64)
    torch.testing.assert_close(m.compute(), reference, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ margins
def test_margins_on_a_constructed_score_table():
    # Powers of two: every margin is exact. Top-2 of each row, lowest selected vs best unselected.
    scores_TE = torch.tensor([
        [0.5, 0.25, 0.125, 0.125],  # (0.25 - 0.125) / 0.25 = 0.5
        [0.25, 0.25, 0.25, 0.25],   # exact tie: 0
        [0.5, 0.5, 0.0, 0.0],       # nothing else scored: 1
        [0.5, 0.125, 0.25, 0.125],  # selection [0, 1] skips 2 (a bias-shifted choice): (0.125 - 0.25) / 0.125 = -1
    ])
    experts_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert torch.equal(decision_margins_T(scores_TE, experts_TK), torch.tensor([0.5, 0.0, 1.0, -1.0]))


def test_margins_need_fewer_selected_than_experts():
    with pytest.raises(ValueError, match="decision margins need K < E, got K=2 selected of E=2"):
        decision_margins_T(torch.full((1, 2), 0.5), torch.tensor([[0, 1]]))


def test_margin_quantiles_and_near_ties():
    m = MarginHistogram(near_tie=0.01)
    # 10 margins: 2 near-ties (0.0, 0.005), one negative, the rest on bin edges of width 0.001.
    m.update(torch.tensor([-1.0, 0.0, 0.005, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]))
    got = {k: float(v) for k, v in m.compute().items() if k != "hist_B"}
    # p10 falls on the negative bin (reported as 0); p50 on the 5th margin 0.2 -> bin [0.2, 0.201), upper edge
    # 0.201; p90 on 0.75 -> 0.751.
    assert got == pytest.approx({"p10": 0.0, "p50": 0.201, "p90": 0.751, "near_tie_share": 0.3,
                                 "negative_share": 0.1}, abs=1e-12)


def test_margin_histogram_is_a_plain_python_reference():
    g = torch.Generator().manual_seed(1)
    margins = torch.rand(200, generator=g) * 1.2 - 0.1
    m = MarginHistogram(near_tie=0.05, bins=10)
    m.update(margins[:120])
    m.update(margins[120:])
    hist = [0] * 11
    for v in margins.tolist():
        hist[0 if v < 0 else min(int(v * 10), 9) + 1] += 1
    out = m.compute()
    assert out["hist_B"].tolist() == hist
    assert float(out["near_tie_share"]) == sum(v < 0.05 for v in margins.tolist()) / 200


def test_near_tie_must_be_a_share():
    with pytest.raises(ValueError, match="near_tie must be a number in \\(0, 1\\), got 0"):
        MarginMonitor(near_tie=0)


# ------------------------------------------------------------------------------------------------ load percentiles
def test_load_percentiles_by_hand():
    # Loads as share x E: counts [1, 1, 2, 4] of 8 -> [0.5, 0.5, 1, 2]; linear interpolation between sorted loads.
    got = {k: float(v) for k, v in load_percentiles(torch.tensor([4.0, 1.0, 2.0, 1.0])).items()}
    assert got == pytest.approx({"p50": 0.75, "p90": 1.7, "p99": 1.97}, abs=1e-12)


# ------------------------------------------------------------------------------------------------ on a fit
def tiny_model():
    torch.manual_seed(0)
    return MoELanguageModel(**{**TINY, "n_layers": 2}, warmup_steps=1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diag")
    callbacks = [CoActivationMonitor(every_n_steps=2), MarginMonitor(every_n_steps=2),
                 LoadBalanceMonitor(every_n_steps=2), RoutingAlarms(every_n_steps=2), RoutingSummary(print_table=False)]
    trainer = pl.Trainer(max_steps=4, limit_val_batches=2, val_check_interval=4, log_every_n_steps=2,
                         callbacks=callbacks, default_root_dir=root, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(tiny_model(), datamodule=TinyLMData())
    trainer.save_checkpoint(root / "done.ckpt")
    return trainer, callbacks, root


def test_diagnostic_keys_are_logged(fitted):
    _, (coact, margin, load, _, _), _ = fitted
    for stage in ("train", "val"):
        for layer in LAYERS:
            assert f"{stage}/coact/{layer}/max" in coact.logged
            assert {f"{stage}/margin/{layer}/{k}" for k in ("p10", "p50", "p90", "near_tie_share",
                                                            "negative_share")} <= set(margin.logged)
            assert {f"{stage}/load/{layer}/{k}" for k in ("p50", "p90", "p99")} <= set(load.logged)
        assert load.logged[f"{stage}/load/worst_layer"] == float(LAYERS.index(load.worst_layer[stage]))


def test_worst_layer_is_the_highest_maxvio(fitted):
    _, (_, _, load, _, _), _ = fitted
    maxvio = {layer: load.logged[f"val/load/{layer}/maxvio_global"] for layer in LAYERS}
    assert load.worst_layer["val"] == max(maxvio, key=maxvio.get)
    assert load.logged["val/load/worst_layer_maxvio"] == max(maxvio.values())


def test_figures_are_written(fitted):
    _, _, root = fitted
    assert {"coact_train.png", "coact_val.png", "margin_train.png", "margin_val.png"} <= {
        p.name for p in (root / "plots").glob("*.png")}


def test_summary_table_has_a_row_per_layer(fitted):
    _, (_, margin, load, _, summary), root = fitted
    text = (root / "routing_summary.md").read_text()
    assert summary.path == root / "routing_summary.md"
    layer = LAYERS[0]
    row = (f"| `{layer}` | {load.logged[f'val/load/{layer}/cv']:.3f} | "
           f"{load.logged[f'val/load/{layer}/maxvio_global']:.3f} | 0 | n/a | "
           f"{margin.logged[f'val/margin/{layer}/p50']:.3f} | none |")
    assert row in text.splitlines()
    assert f"Worst layer by MaxVio (val): `{load.worst_layer['val']}`" in text


def test_summary_reads_saturation_from_any_monitor():
    class Consistency:  # another monitor, known only by its logged keys
        logged = {"train/consistency/l0/saturation": 0.25}

    class Alarms:
        taps = {"l0": None}
        fired = {"collapse": ["l0"], "no_balance_loss": ["model"]}

    text = routing_summary([Alarms(), Consistency()], "t")
    assert "| `l0` | n/a | n/a | n/a | 0.250 | n/a | collapse |" in text
    assert "Model-wide alarms: no_balance_loss (`model`)." in text


def test_monitor_state_survives_resume(fitted, tmp_path):
    _, callbacks, root = fitted
    saved = [cb.state_dict() for cb in callbacks[:2]]
    assert saved[1]["extra"]["histograms"]["val"]
    resumed = [CoActivationMonitor(every_n_steps=2, plots=False), MarginMonitor(every_n_steps=2, plots=False)]
    pl.Trainer(max_steps=4, limit_val_batches=0, callbacks=resumed, default_root_dir=tmp_path, logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               accelerator="cpu").fit(tiny_model(), datamodule=TinyLMData(), ckpt_path=root / "done.ckpt")
    for before, cb in zip(saved, resumed):
        after = cb.state_dict()
        assert after["metrics"].keys() == before["metrics"].keys()
        for key, states in before["metrics"].items():
            for name, t in states.items():
                assert torch.equal(after["metrics"][key][name], t), (key, name)
        extra = next(iter(before["extra"]))
        for stage, per_layer in before["extra"][extra].items():
            for layer, t in per_layer.items():
                assert torch.equal(after["extra"][extra][stage][layer], t)


# ------------------------------------------------------------------------------------------------ redundancy probe
class FixedRouter(Router):
    """Returns a fixed score table (one row per token); top-k renormalised, like Mixtral."""

    def __init__(self, scores_TE):
        super().__init__()
        self.scores = scores_TE

    def forward(self, x_BSD):
        weights_TK, experts_TK = self.scores.topk(self.top_k, dim=1)
        return Routing(experts_TK, weights_TK / weights_TK.sum(1, keepdim=True), self.scores)


SCORES = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])


def probe_layer():
    torch.manual_seed(0)
    return MoELayer(d_model=4, d_ff=8, num_experts=4, top_k=2, router=FixedRouter(SCORES))


def total(model, x):
    return model(x).sum()


def test_probe_r0_is_the_plain_loss():
    layer, x = probe_layer(), torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    curves = redundancy_probe(layer, x, total, max_r=2)
    with torch.no_grad():
        assert curves[""][0] == float(layer.eval()(x).sum())


def test_probe_routes_to_the_next_experts_by_hand():
    layer, x = probe_layer(), torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    curves = redundancy_probe(layer, x, total, max_r=2)
    # r=1: token 0 loses expert 0 -> experts 1, 2 with 0.3 : 0.2; token 1 loses 3 -> 2, 1 with 0.3 : 0.2.
    # r=2: token 0 -> 2, 3 with 0.2 : 0.1; token 1 -> 1, 0 with 0.2 : 0.1.
    hand = {1: ([[1, 2], [2, 1]], [[0.6, 0.4], [0.6, 0.4]]), 2: ([[2, 3], [1, 0]], [[2 / 3, 1 / 3], [2 / 3, 1 / 3]])}
    for r, (experts, weights) in hand.items():
        routing = Routing(torch.tensor(experts), torch.tensor(weights), SCORES)
        with torch.no_grad():
            want = float(layer.experts(x, routing).sum())
        assert curves[""][r] == pytest.approx(want, rel=1e-6)


def test_mask_keeps_the_total_weight():
    routing = Routing(torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.1]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    masked = mask_top_experts(routing, 1)
    assert masked.experts_TK.tolist() == [[1, 2]]
    torch.testing.assert_close(masked.weights_TK, torch.tensor([[0.24, 0.16]]))


def test_probe_restores_the_model_even_when_the_loss_fails():
    layer, x = probe_layer(), torch.randn(2, 4)
    layer.train()
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return model(batch).sum()

    with pytest.raises(RuntimeError, match="boom"):
        redundancy_probe(layer, x, failing, max_r=1)
    assert layer.training and not layer.router._forward_hooks
    torch.testing.assert_close(layer(x), layer(x))  # plain again: the same routing as before the probe
    assert layer.routing.experts_TK.tolist() == SCORES.topk(2, dim=1).indices.tolist()


def test_probe_rejects_too_many_disabled_experts():
    with pytest.raises(ValueError, match="max_r=3 is too large for layer '' \\(K=2, E=4\\); use max_r <= 2"):
        redundancy_probe(probe_layer(), torch.randn(2, 4), total, max_r=3)


def test_probe_on_the_language_model_per_layer():
    model = tiny_model()
    batch = TinyLMData().items[0]
    tokens = batch["tokens"].unsqueeze(0)

    def ce(m, b):
        return F.cross_entropy(m(b).flatten(0, 1), batch["labels"])

    curves = redundancy_probe(model, tokens, ce, max_r=2)
    assert sorted(curves) == LAYERS and all(len(c) == 3 for c in curves.values())
    assert curves[LAYERS[0]][0] == curves[LAYERS[1]][0]
    assert curves[LAYERS[0]][1] != curves[LAYERS[0]][0]


def test_probe_command_prints_the_mean_curve(tmp_path, capsys):
    from lightning_moe.cli import main
    from lightning_moe.data import ByteCorpusDataModule
    from lightning_moe.diagnostics import language_model_loss

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  class_path: lightning_moe.modules.MoELanguageModel\n  init_args:\n"
        "    vocab_size: 256\n    d_model: 16\n    n_layers: 2\n    n_heads: 2\n    d_ff: 16\n    num_experts: 4\n"
        "    top_k: 2\n    max_seq_len: 16\n"
        "data:\n  class_path: lightning_moe.data.ByteCorpusDataModule\n  init_args:\n"
        "    seq_len: 16\n    batch_size: 2\n    bytes_per_domain: 4000\n"
    )
    torch.manual_seed(3)
    model = MoELanguageModel(vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2,
                             max_seq_len=16)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.ckpt")
    main(["probe", "--config", str(config), "--ckpt_path", str(tmp_path / "m.ckpt"), "--max_r", "1",
          "--batches", "1"])
    data = ByteCorpusDataModule(seq_len=16, batch_size=2, bytes_per_domain=4000)
    data.setup("validate")
    curves = redundancy_probe(model, next(iter(data.val_dataloader())), language_model_loss, max_r=1)
    out = capsys.readouterr().out
    for layer, (r0, r1) in curves.items():
        assert f"| `{layer}` | {r0:.4f} | {r1:.4f} |" in out
