"""ExpertLoad (baselines §4.10): per-batch MaxVio next to the whole-set statistics."""

import pytest
import torch

from lightning_moe.metrics import ExpertLoad
from tests.metric_helpers import assert_merge_equals_whole, assert_reductions


def test_maxvio_batch_averages_each_updates_own_maxvio():
    m = ExpertLoad(num_experts=2)
    m.update(torch.tensor([[0], [0], [0], [1]]))  # loads 3, 1: mean 2, MaxVio 0.5
    m.update(torch.tensor([[1], [1]]))  # loads 0, 2: MaxVio 1
    out = m.compute()
    assert out["maxvio_batch"].item() == pytest.approx((0.5 + 1.0) / 2)
    assert out["maxvio"].item() == pytest.approx(3 / 3 - 1)  # summed loads 3, 3: balanced over the set


def test_an_empty_update_is_not_a_batch():
    m = ExpertLoad(num_experts=2)
    m.update(torch.tensor([[0], [1]]))
    m.update(torch.empty(0, 1, dtype=torch.long))
    assert m.batches.item() == 1


def test_expert_id_out_of_range_names_num_experts():
    with pytest.raises(ValueError, match="expert id 4 is out of range for 2 classes; num_experts=2"):
        ExpertLoad(num_experts=2).update(torch.tensor([[4]]))


def test_states_are_sum_reduced_and_merge_exactly():
    assert_reductions(ExpertLoad(4))
    experts_TK = torch.randint(0, 4, (30, 2), generator=torch.Generator().manual_seed(0))
    assert_merge_equals_whole(lambda: ExpertLoad(4), lambda m, s: m.update(experts_TK[s]), 30)


def test_slot_counts_give_the_skipped_and_dropped_shares_of_counted_tokens():
    from lightning_moe.metrics import SlotCounts

    m = SlotCounts()
    skipped_TK = torch.tensor([[True, False], [False, False], [True, True]])
    dropped_TK = torch.tensor([[False, True], [False, False], [False, False]])
    m.update(skipped_TK, dropped_TK, token_mask_T=torch.tensor([True, True, False]))  # token 2 is padding
    out = m.compute()
    assert out["skipped_share"].item() == 0.25 and out["dropped_share"].item() == 0.25
