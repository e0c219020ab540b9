"""Score–activation coupling statistics: the t-test p-value against closed forms, z-scoring per group, decile
curves, the pooled / per-layer / per-group metric, and the per-pair expert responses against a per-token loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.metrics.coupling import (
    COUPLING_RESPONSES,
    COUPLING_SCORES,
    LayerCoupling,
    correlation_log10_p,
    coupling_stats,
    decile_means,
    expert_responses_N,
)
from lightning_moe.metrics.geometry import spearman
from tests.metric_helpers import SUM_OR_CAT, assert_reductions


def t_stat(rho, n):
    return rho * math.sqrt((n - 2) / (1 - rho * rho))


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9, -0.7])
def test_p_value_matches_the_closed_form_t_tail_with_one_degree_of_freedom(rho):
    # Student t with df = 1 is Cauchy: two-sided p = 1 - 2 atan(|t|) / pi.
    expected = 1 - 2 * math.atan(abs(t_stat(rho, 3))) / math.pi
    assert 10 ** correlation_log10_p(rho, 3) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rho", [0.3, 0.8, 0.99])
def test_p_value_matches_the_closed_form_t_tail_with_two_degrees_of_freedom(rho):
    t = t_stat(rho, 4)
    expected = 1 - t / math.sqrt(2 + t * t)
    assert 10 ** correlation_log10_p(rho, 4) == pytest.approx(expected, rel=1e-12)


def test_tiny_p_values_are_exact_in_log_space():
    # df = 2 again, rewritten so it does not cancel: p = 2 / (s (s + t)), s = sqrt(2 + t^2). Here p ~ 1e-12.
    rho = 1 - 1e-12
    t = t_stat(rho, 4)
    s = math.sqrt(2 + t * t)
    assert correlation_log10_p(rho, 4) == pytest.approx(math.log10(2 / (s * (s + t))), rel=1e-9)


def test_large_samples_approach_the_normal_tail():
    # With a million pairs the t distribution is normal to ~1e-6; log10 p of rho = 0.005 (t ~ 5) agrees to 1e-3.
    n, rho = 1_000_000, 0.005
    normal = math.log10(math.erfc(abs(t_stat(rho, n)) / math.sqrt(2)))
    assert correlation_log10_p(rho, n) == pytest.approx(normal, abs=1e-3)


def test_p_value_edge_cases():
    assert correlation_log10_p(1.0, 10) == -math.inf
    assert math.isnan(correlation_log10_p(0.5, 2))
    assert correlation_log10_p(0.0, 10) == 0.0


def test_decile_means_of_a_line():
    x = torch.arange(20.0)
    assert decile_means(x, x).tolist() == [0.5 + 2 * d for d in range(10)]


def test_coupling_is_measured_within_groups_not_across_them():
    # Within each group y rises with x, across groups it falls: raw Spearman is -0.543, per-group z-scores give
    # ranks [1.5, 3.5, 5.5, 1.5, 3.5, 5.5] against x's 1..6, so rho = 8 / sqrt(17.5 * 16).
    x = torch.tensor([1.0, 2, 3, 4, 5, 6])
    y = torch.tensor([10.0, 11, 12, 0, 1, 2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert float(spearman(x, y)) == pytest.approx(-9.5 / 17.5)
    stats = coupling_stats(x, y, groups)
    assert stats["rho"] == pytest.approx(8 / math.sqrt(280))
    assert stats["n"] == 6
    assert stats["log10_p"] == pytest.approx(correlation_log10_p(8 / math.sqrt(280), 6))


def test_groups_without_a_z_score_are_left_out():
    x = torch.tensor([1.0, 2, 3, 4, 5, 6, 7])
    y = torch.tensor([1.0, 2, 3, 5, 5, 5, 9])  # group 1 is constant, group 2 has one pair
    stats = coupling_stats(x, y, torch.tensor([0, 0, 0, 1, 1, 1, 2]))
    assert stats["n"] == 3 and stats["rho"] == pytest.approx(1.0)


def random_pairs(N=300, L=2, E=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, L, (N,), generator=g)
    experts = torch.randint(0, E, (N,), generator=g)
    values = {k: torch.randn(N, generator=g) for k in (*COUPLING_SCORES, *COUPLING_RESPONSES)}
    values["up_norm"] = values["weight"] + 0.5 * torch.randn(N, generator=g)  # one coupled pair of variables
    return layer, experts, values


def fed_metric(L=2, E=3, min_group_pairs=20, N=300):
    layer, experts, values = random_pairs(N, L, E)
    m = LayerCoupling(L, E, min_group_pairs)
    for i in range(L):
        sel = layer == i
        m.update(i, experts[sel], {s: values[s][sel] for s in COUPLING_SCORES}, {r: values[r][sel] for r in COUPLING_RESPONSES})
    return m, layer, experts, values


def test_layer_coupling_pools_layers_with_per_layer_expert_groups():
    m, layer, experts, values = fed_metric()
    out = m.compute()
    groups = layer * 3 + experts
    ref = coupling_stats(values["weight"], values["up_norm"], groups)
    got = out["weight/up_norm"]["pooled"]
    assert got["rho"] == pytest.approx(ref["rho"], abs=1e-12) and got["n"] == ref["n"] == 300
    assert got["rho"] > 0.8  # the coupled pair


def test_layer_coupling_per_layer_stats_use_that_layer_only():
    m, layer, experts, values = fed_metric()
    got = m.compute()["logit/gate_act"]["layers"][1]
    sel = layer == 1
    ref = coupling_stats(values["logit"][sel], values["gate_act"][sel], experts[sel])
    assert got["rho"] == pytest.approx(ref["rho"], abs=1e-12) and got["n"] == ref["n"] == int(sel.sum())


def test_median_group_rho_uses_groups_with_enough_pairs():
    m, layer, experts, values = fed_metric(min_group_pairs=50)
    groups = layer * 3 + experts
    big = [g for g in range(6) if int((groups == g).sum()) >= 50]
    rhos = sorted(float(spearman(values["weight"][groups == g], values["gate_norm"][groups == g])) for g in big)
    assert 0 < len(big) < 6  # the threshold keeps some groups and drops others
    mid = len(rhos) // 2
    expected = rhos[mid] if len(rhos) % 2 else (rhos[mid - 1] + rhos[mid]) / 2
    assert m.compute()["weight/gate_norm"]["median_group_rho"] == pytest.approx(expected, abs=1e-12)


def test_negative_weight_fraction_counts_pairs_with_a_negative_dispatch_weight():
    m, _, _, values = fed_metric()
    expected = float((values["weight"] < 0).double().mean())
    assert 0 < expected < 1 and m.compute()["negative_weight_fraction"] == pytest.approx(expected)


def test_layer_coupling_states_are_cat_reduced():
    assert_reductions(LayerCoupling(2, 3), SUM_OR_CAT)


def test_layer_coupling_merges_like_one_instance():
    whole, _, _, _ = fed_metric()
    first, layer, experts, values = fed_metric()
    second = LayerCoupling(2, 3, 20)
    first.reset()
    for i, part in ((0, first), (1, second)):
        sel = layer == i
        part.update(i, experts[sel], {s: values[s][sel] for s in COUPLING_SCORES}, {r: values[r][sel] for r in COUPLING_RESPONSES})
    first.merge_state(second)
    a, b = whole.compute()["weight/up_norm"], first.compute()["weight/up_norm"]
    assert a["pooled"]["rho"] == pytest.approx(b["pooled"]["rho"], abs=1e-12)
    assert a["median_group_rho"] == pytest.approx(b["median_group_rho"], abs=1e-12)


def test_update_rejects_a_layer_out_of_range():
    m = LayerCoupling(2, 3)
    with pytest.raises(ValueError, match="layer must lie in"):
        m.update(2, torch.zeros(1, dtype=torch.long), {s: torch.zeros(1) for s in COUPLING_SCORES},
                 {r: torch.zeros(1) for r in COUPLING_RESPONSES})


def test_update_names_a_missing_response():
    m = LayerCoupling(2, 3)
    with pytest.raises(ValueError, match="gate_act"):
        m.update(0, torch.zeros(1, dtype=torch.long), {s: torch.zeros(1) for s in COUPLING_SCORES},
                 {"gate_norm": torch.zeros(1), "up_norm": torch.zeros(1)})


def test_update_rejects_misshaped_values():
    m = LayerCoupling(2, 3)
    with pytest.raises(ValueError, match="one value per pair"):
        m.update(0, torch.zeros(2, dtype=torch.long), {s: torch.zeros(3) for s in COUPLING_SCORES},
                 {r: torch.zeros(2) for r in COUPLING_RESPONSES})


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_says_what_to_do():
    with pytest.raises(ValueError, match="update the metric first"):
        LayerCoupling(2, 3).compute()


def test_expert_responses_match_a_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    x_ND, experts_N = torch.randn(7, 4, generator=g), torch.tensor([0, 2, 2, 1, 0, 2, 1])
    gate_EFD, up_EFD = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    got = expert_responses_N(x_ND, experts_N, gate_EFD, up_EFD)
    for n, e in enumerate(experts_N.tolist()):
        h_gate, h_up = gate_EFD[e] @ x_ND[n], up_EFD[e] @ x_ND[n]
        assert got["gate_norm"][n] == pytest.approx(float(h_gate.norm()), rel=1e-5)
        assert got["up_norm"][n] == pytest.approx(float(h_up.norm()), rel=1e-5)
        assert got["gate_act"][n] == pytest.approx(float(F.silu(h_gate).mean()), rel=1e-5, abs=1e-7)
