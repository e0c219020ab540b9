"""Specialisation metrics (baselines §4.11) against hand-computed values on tiny tables."""

import math

import pytest
import torch

from lightning_moe.metrics import LabelSpecialization, TokenSpecialization, specialization_stats
from lightning_moe.metrics.specialization import conditional_entropy_C, share_matrix_CE
from tests.metric_helpers import assert_merge_equals_whole, assert_reductions

# A 2x2 label x expert count table and its direct formulas.
N_CE = torch.tensor([[3.0, 1.0], [1.0, 3.0]])


def _direct_mi(n):
    p = n / n.sum()
    pc, pe = p.sum(1), p.sum(0)
    return sum(float(p[c, e]) * math.log(float(p[c, e] / (pc[c] * pe[e]))) for c in range(2) for e in range(2))


def test_mutual_information_matches_the_direct_formula():
    assert specialization_stats(N_CE)["mi"].item() == pytest.approx(_direct_mi(N_CE), abs=1e-12)


def test_nmi_is_the_arithmetic_normalisation():
    # Both marginals are uniform, H(C) = H(E) = log 2, so 2I/(H(C)+H(E)) = I/log 2.
    stats = specialization_stats(N_CE)
    assert stats["nmi"].item() == pytest.approx(_direct_mi(N_CE) / math.log(2), abs=1e-12)


def test_nmi_arithmetic_and_geometric_differ_on_skewed_marginals():
    n = torch.tensor([[6.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # H(C) != H(E)
    p = n / n.sum()
    hc = -sum(float(x) * math.log(float(x)) for x in p.sum(1))
    he = -sum(float(x) * math.log(float(x)) for x in p.sum(0))
    mi = hc  # E determines C, so I = H(C)
    stats = specialization_stats(n)
    assert stats["nmi"].item() == pytest.approx(2 * mi / (hc + he), abs=1e-12)
    assert stats["nmi_geometric"].item() == pytest.approx(mi / math.sqrt(hc * he), abs=1e-12)


def test_independent_labels_and_experts_have_zero_nmi():
    stats = specialization_stats(torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    assert stats["mi"].item() == pytest.approx(0.0, abs=1e-15)
    assert stats["nmi"].item() == pytest.approx(0.0, abs=1e-15)


def test_single_label_single_expert_nmi_is_one_like_sklearn():
    assert specialization_stats(torch.tensor([[5.0]]))["nmi"].item() == 1.0


def test_purity_in_both_directions_on_a_tiny_table():
    n = torch.tensor([[4.0, 1.0, 0.0], [0.0, 2.0, 3.0]])  # n = 10
    stats = specialization_stats(n)
    assert stats["purity_expert"].item() == pytest.approx((4 + 2 + 3) / 10)  # max over labels per expert
    assert stats["purity_class"].item() == pytest.approx((4 + 3) / 10)  # max over experts per label


def test_share_matrix_rows_are_each_labels_assignment_shares():
    share = share_matrix_CE(torch.tensor([[3.0, 1.0], [0.0, 0.0]]))
    assert share.tolist() == [[0.75, 0.25], [0.0, 0.0]]


def test_conditional_entropy_is_zero_for_one_expert_and_one_for_uniform():
    h = conditional_entropy_C(torch.tensor([[5.0, 0.0], [2.0, 2.0]]))
    assert h.tolist() == pytest.approx([0.0, 1.0])


def _update_tiny(metric):
    labels_T = torch.tensor([0, 0, 1, 1, -100])  # the last token is ignored
    experts_TK = torch.tensor([[0, 1], [0, 2], [2, 1], [2, 0], [1, 2]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    top1_T = experts_TK.gather(1, weights_TK.argmax(1, keepdim=True)).squeeze(1)
    mass_TE = torch.eye(3)[[0, 2, 2, 2, 1]]
    metric.update(labels_T, experts_TK, top1_T, mass_TE)


def test_label_specialization_counts_all_slots_top1_and_soft():
    m = LabelSpecialization(num_labels=2, num_experts=3)
    _update_tiny(m)
    assert m.joint_CE.tolist() == [[2, 1, 1], [1, 1, 2]]
    assert m.top1_CE.tolist() == [[1, 0, 1], [0, 0, 2]]  # argmax of the weights; ties take the first slot
    assert m.soft_CE.tolist() == [[1, 0, 1], [0, 0, 2]]
    out = m.compute()
    assert out["purity_class_top1"].item() == pytest.approx(3 / 4)
    assert out["share_CE"][0].tolist() == pytest.approx([0.5, 0.25, 0.25])


def test_masked_slots_are_not_counted():
    m = LabelSpecialization(num_labels=1, num_experts=3)
    experts_TK = torch.tensor([[0, 1], [2, 1]])
    mask_TK = torch.tensor([[True, False], [False, False]])  # the second token got no expert at all
    m.update(torch.tensor([0, 0]), experts_TK, torch.tensor([0, 2]), torch.zeros(2, 3), mask_TK)
    assert m.joint_CE.tolist() == [[1, 0, 0]]
    assert m.top1_CE.tolist() == [[1, 0, 0]]


def test_label_out_of_range_names_the_fix():
    m = LabelSpecialization(num_labels=2, num_experts=3)
    with pytest.raises(ValueError, match="label 5 is out of range for 2 classes; raise num_labels"):
        m.update(torch.tensor([5]), torch.tensor([[0, 1]]), torch.tensor([0]), torch.zeros(1, 3))


def test_token_specialization_averages_each_ids_top_expert_share():
    m = TokenSpecialization(vocab_size=5, num_experts=2)
    # id 0: experts 0,0,1 -> 2/3; id 3: expert 1 -> 1; id 4: 0,1 -> 1/2; ids 1, 2 unseen.
    m.update(torch.tensor([0, 0, 0, 3, 4, 4]), torch.tensor([0, 0, 1, 1, 0, 1]))
    out = m.compute()
    assert out["token_specialization"].item() == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert out["token_specialization_weighted"].item() == pytest.approx((2 + 1 + 1) / 6)


def test_states_are_sum_reduced():
    assert_reductions(LabelSpecialization(2, 3))
    assert_reductions(TokenSpecialization(5, 2))


def _random_routing(n=40, labels=3, experts=4):
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(n)])
    return torch.randint(0, labels, (n,), generator=g), experts_TK, torch.rand(n, experts, generator=g)


def test_merging_two_instances_equals_one_over_all_data():
    labels_T, experts_TK, mass_TE = _random_routing()
    assert_merge_equals_whole(
        lambda: LabelSpecialization(3, 4),
        lambda m, s: m.update(labels_T[s], experts_TK[s], experts_TK[s, 0], mass_TE[s]),
        len(labels_T),
    )
    assert_merge_equals_whole(
        lambda: TokenSpecialization(3, 4), lambda m, s: m.update(labels_T[s], experts_TK[s, 0]), len(labels_T)
    )
