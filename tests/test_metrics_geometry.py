"""Router geometry and score–activation coupling (geometric-coupling spec §2.2) on hand-checkable inputs."""

import math

import pytest
import torch

from lightning_moe.metrics import RoutedMean, ScoreActivationCoupling, rankdata, router_geometry, spearman
from lightning_moe.metrics.geometry import (paired_alignment, projection_norms_N, top_right_singular_ED,
                                            zscore_per_group)
from tests.metric_helpers import SUM_OR_CAT, assert_merge_equals_whole, assert_reductions


def test_effective_rank_of_orthogonal_rows_is_their_number():
    rows = 3.0 * torch.eye(4, 6)
    assert router_geometry(rows)["effective_rank"].item() == pytest.approx(4.0)


def test_effective_rank_of_parallel_rows_is_one_and_their_cosines_are_one():
    g = router_geometry(torch.tensor([[1.0, 2.0], [2.0, 4.0], [-0.5, -1.0]]))
    assert g["effective_rank"].item() == pytest.approx(1.0)
    # cosines: (1,2) 1, (1,3) -1, (2,3) -1 -> mean over the 6 ordered pairs = -1/3
    assert g["mean_cosine"].item() == pytest.approx(-1 / 3)
    assert g["nn_cosine"].item() == pytest.approx(1 / 3)  # rows 1 and 2: 1; row 3: -1


def test_mean_and_nearest_neighbour_cosine_by_hand():
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    g = router_geometry(rows)
    assert g["mean_cosine"].item() == pytest.approx((c + 0 + c) * 2 / 6)
    assert g["nn_cosine"].item() == pytest.approx(c)


def test_common_energy_is_one_for_equal_rows_and_zero_when_they_cancel():
    assert router_geometry(torch.ones(3, 2))["common_energy"].item() == pytest.approx(1.0)
    assert router_geometry(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))["common_energy"].item() == pytest.approx(0.0)


def test_centering_removes_the_shared_mean_row():
    rows = torch.tensor([[1.0, 5.0], [-1.0, 5.0]])  # nearly parallel because of the shared +5 component
    assert router_geometry(rows)["mean_cosine"].item() > 0.9
    assert router_geometry(rows, center=True)["mean_cosine"].item() == pytest.approx(-1.0)


def test_rankdata_averages_ties():
    assert rankdata(torch.tensor([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]


def test_spearman_matches_the_textbook_formula_without_ties():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])
    d2 = ((torch.arange(5.0) - torch.tensor([1.0, 0.0, 3.0, 2.0, 4.0])) ** 2).sum().item()
    assert spearman(x, y).item() == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))


def test_spearman_with_ties_is_pearson_of_average_ranks():
    x = torch.tensor([1.0, 1.0, 2.0, 3.0])
    y = torch.tensor([1.0, 2.0, 2.0, 4.0])
    rx, ry = torch.tensor([1.5, 1.5, 3.0, 4.0]), torch.tensor([1.0, 2.5, 2.5, 4.0])
    expected = torch.corrcoef(torch.stack([rx, ry]))[0, 1].item()
    assert spearman(x, y).item() == pytest.approx(expected)


def test_projection_norms_are_per_selected_expert():
    w_EFD = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # expert 1 doubles the norm
    x_ND = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert projection_norms_N(x_ND, torch.tensor([0, 1]), w_EFD).tolist() == [5.0, 10.0]


def test_zscore_is_per_group_and_drops_singleton_groups():
    z, keep = zscore_per_group(torch.tensor([1.0, 3.0, 10.0, 30.0, 7.0]), torch.tensor([0, 0, 1, 1, 2]))
    assert keep.tolist() == [True, True, True, True, False]
    assert z[keep].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


def test_coupling_ranks_weights_against_per_expert_zscored_norms():
    m = ScoreActivationCoupling(num_experts=2)
    # Expert 1's norms are 10x expert 0's: without per-expert z-scoring they would dominate the ranking.
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    norms = torch.tensor([1.0, 2.0, 10.0, 20.0])
    m.update(weights, norms, torch.tensor([0, 0, 1, 1]))
    out = m.compute()
    z = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert out["spearman"].item() == pytest.approx(spearman(weights, z).item())


def test_coupling_states_gather_and_merge_exactly():
    assert_reductions(ScoreActivationCoupling(3), allowed=SUM_OR_CAT)
    g = torch.Generator().manual_seed(0)
    w, y, e = torch.rand(40, generator=g), torch.rand(40, generator=g), torch.randint(0, 3, (40,), generator=g)
    assert_merge_equals_whole(lambda: ScoreActivationCoupling(3), lambda m, s: m.update(w[s], y[s], e[s]), 40)


def test_paired_alignment_by_hand():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    out = paired_alignment(a, b)  # cos(a_i, b_j): [[1, c], [0, c]]
    assert out["matched"].item() == pytest.approx((1 + c) / 2)
    assert out["mismatched"].item() == pytest.approx((c + 0) / 2)
    assert out["match_rate"].item() == 1.0  # row 0: 1 > c; row 1: c > 0


def test_paired_alignment_counts_a_row_best_aligned_elsewhere_as_a_miss():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.1]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert paired_alignment(a, b)["match_rate"].item() == 0.5  # row 1 points along b_0, not b_1


def test_paired_alignment_leaves_out_rows_without_a_direction():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # row 1 never moved
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [float("nan"), float("nan")]])  # expert 2 got no token
    out = paired_alignment(a, b)
    assert out["matched"].item() == pytest.approx(1.0)  # only row 0 is left
    assert math.isnan(out["mismatched"].item())  # one row has no mismatched partner
    assert all(math.isnan(v.item()) for v in paired_alignment(torch.zeros(3, 2), b).values())


def test_paired_alignment_absolute_ignores_the_sign():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-2.0, 0.0], [0.0, -1.0]])
    assert paired_alignment(a, b)["matched"].item() == pytest.approx(-1.0)
    assert paired_alignment(a, b, absolute=True)["matched"].item() == pytest.approx(1.0)


def test_top_right_singular_vector_of_a_rank_one_projection_is_its_input_direction():
    v_ED = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    u_F = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    top_ED = top_right_singular_ED(u_F[None, :, None] * v_ED[:, None, :])  # W_e = u v_eᵀ
    assert torch.allclose(top_ED.abs(), v_ED.abs(), atol=1e-12)


def test_paired_alignment_needs_two_tables_of_one_shape():
    with pytest.raises(ValueError, match=r"both must be \[E, D\] of one shape, got \(2, 3\) and \(3, 3\)"):
        paired_alignment(torch.zeros(2, 3), torch.zeros(3, 3))


def test_routed_mean_matches_a_per_expert_loop_and_is_nan_for_an_unused_expert():
    g = torch.Generator().manual_seed(0)
    x, experts = torch.randn(12, 3, generator=g), torch.tensor([0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    m = RoutedMean(3, 3)
    m.update(x[:5], experts[:5])
    m.update(x[5:], experts[5:])
    mu = m.compute()
    for e in (0, 1):
        assert torch.allclose(mu[e], x[experts == e].double().mean(0))
    assert mu[2].isnan().all()


def test_routed_mean_sums_reduce_and_merge_exactly():
    assert_reductions(RoutedMean(3, 2))
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(30, 2, generator=g), torch.randint(0, 3, (30,), generator=g)
    whole, first, second = RoutedMean(3, 2), RoutedMean(3, 2), RoutedMean(3, 2)
    whole.update(x, e)
    first.update(x[:13], e[:13])
    second.update(x[13:], e[13:])
    first.merge_state(second)
    assert torch.allclose(first.compute(), whole.compute())


def test_routed_mean_names_the_shapes_it_needs():
    with pytest.raises(ValueError, match=r"x \[N, 2\] and experts \[N\], got shapes \(4, 3\) and \(4,\)"):
        RoutedMean(3, 2).update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
