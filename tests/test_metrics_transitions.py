"""Routing at labelled domain switches (transitions spec §2, §4, §7.5) on constructed routings."""

import math

import pytest
import torch

from lightning_moe.metrics import TransitionRouting, experts_for_coverage, mass_coverage_T
from tests.metric_helpers import assert_merge_equals_whole, assert_reductions

A, B = [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]  # domain 0 prefers expert 0, domain 1 expert 2


def _routing(labels_BS, overrides=None):
    mass_TE = torch.tensor([A if d == 0 else B for d in labels_BS.reshape(-1).tolist()])
    for t, row in (overrides or {}).items():
        mass_TE[t] = torch.tensor(row)
    return mass_TE


def test_probability_on_the_correct_expert_at_offset_zero():
    labels = torch.tensor([[0, 0, 0, 1, 1, 1]])
    m = TransitionRouting(num_labels=2, num_experts=4, window=1)
    m.update(labels, _routing(labels, {3: [0.5, 0.0, 0.25, 0.25]}))  # the first domain-1 token still leans to 0
    out = m.compute()
    assert out["offsets"].tolist() == [-1, 0, 1]
    assert out["p_correct"].tolist() == pytest.approx([0.1, 0.25, 0.7])
    assert out["acc_correct"].tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_correct_expert_is_the_one_that_rises_most_on_the_domain():
    # Expert 3 has the largest mean on domain 1 (0.4) but also on domain 0 (0.4): expert 2 rises most.
    labels = torch.tensor([[0, 0, 1, 1]])
    mass = torch.tensor([[0.4, 0.1, 0.1, 0.4], [0.4, 0.1, 0.1, 0.4], [0.1, 0.1, 0.35, 0.45], [0.1, 0.1, 0.35, 0.45]])
    m = TransitionRouting(2, 4, window=1)
    m.update(labels, mass)
    assert m.correct_experts_C().tolist() == [0, 2]


def test_given_correct_experts_are_used_as_they_are():
    labels = torch.tensor([[0, 0, 1, 1]])
    m = TransitionRouting(2, 4, window=1, correct_experts=[1, 3])
    m.update(labels, _routing(labels))
    assert m.compute()["p_correct"].tolist() == pytest.approx([0.1, 0.1, 0.1])


def test_offsets_stop_at_the_next_switch_and_the_sequence_ends():
    # Switches at 2 (0->1) and 3 (1->0); window 2 around each.
    labels = torch.tensor([[0, 0, 1, 0, 0]])
    m = TransitionRouting(2, 4, window=2)
    m.update(labels, _routing(labels))
    n_O = m.window_OCX[..., 2 * 4].sum(1)
    # offset -2: only the first switch (position 0); -1: both; 0: both; +1: only the second (position 4);
    # +2: none (the first switch's run ends, the second runs off the sequence).
    assert n_O.tolist() == [1, 2, 2, 1, 0]
    assert math.isnan(m.compute()["p_correct"][-1].item())


def test_ignored_labels_never_make_a_switch():
    labels = torch.tensor([[0, 0, -100, 1, 1]])
    m = TransitionRouting(2, 4, window=1)
    m.update(labels, _routing(labels.clamp_min(0)))
    assert m.window_OCX.sum().item() == 0


def test_k99_reproduces_the_papers_numbers():
    # transitions.md §2: p = 0.006 -> K = 765.2; p = 0.748 -> 3.34; clamped as lm_experiment.py does.
    k = experts_for_coverage(torch.tensor([0.006, 0.748, 0.9995, 0.0001]))
    assert k[:2].tolist() == pytest.approx([765.2, 3.34], abs=0.05)
    assert k[2:].tolist() == [1.0, 999.0]


def test_coverage_counts_the_fewest_experts_holding_99_percent():
    mass = torch.tensor([[0.99, 0.01, 0.0, 0.0], [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert mass_coverage_T(mass).tolist() == [1, 4, 4]
    assert mass_coverage_T(torch.tensor([[0.6, 0.395, 0.005, 0.0]])).tolist() == [2]


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="one expert id in \\[0, 4\\) per label"):
        TransitionRouting(2, 4, correct_experts=[0, 9])
    with pytest.raises(TypeError, match="window must be an integer"):
        TransitionRouting(2, 4, window=1.5)
    with pytest.raises(ValueError, match="labels must be \\[batch, seq\\]"):
        TransitionRouting(2, 4).update(torch.tensor([0, 1]), torch.zeros(2, 4))


def test_states_are_sum_reduced_and_merge_exactly():
    assert_reductions(TransitionRouting(3, 4))
    g = torch.Generator().manual_seed(0)
    switch = torch.randint(3, 13, (40, 1), generator=g)
    labels = torch.where(torch.arange(16) < switch, torch.randint(0, 3, (40, 1), generator=g), 2)
    mass = torch.softmax(torch.randn(40, 16, 4, generator=g), -1)
    assert_merge_equals_whole(
        lambda: TransitionRouting(3, 4, window=3), lambda m, s: m.update(labels[s], mass[s].reshape(-1, 4)), 40
    )


def test_precomputed_switch_windows_give_the_same_states_as_computing_them():
    from lightning_moe.metrics.transitions import switch_windows

    g = torch.Generator().manual_seed(0)
    labels_BS = torch.randint(-1, 3, (4, 12), generator=g)
    mass_TE = torch.rand(48, 5, generator=g).softmax(-1)
    direct, shared = TransitionRouting(3, 5, window=3), TransitionRouting(3, 5, window=3)
    direct.update(labels_BS, mass_TE)
    shared.update(labels_BS, mass_TE, switch_windows(labels_BS, 3, 3))
    assert torch.equal(direct.window_OCX, shared.window_OCX) and torch.equal(direct.label_CX, shared.label_CX)
    assert direct.window_OCX[..., -2].sum() > 0  # the random labels do switch
