"""The transition study's synthetic tasks: labels, switch positions, Markov statistics, determinism."""

import pytest
import torch

from lightning_moe.studies.transitions.data import (
    TransitionTaskDataModule,
    chars_batch,
    early_signal_batch,
    markov_chain,
    routing_batch,
)


def test_routing_labels_follow_the_next_steps_domain():
    g = torch.Generator().manual_seed(0)
    b = routing_batch(g, 64, 12, 6, 6, noise=0.0)
    # Noise-free inputs are the domain signal itself: +1 on dims [8d, 8d + 8).
    assert torch.equal(b["inputs_embeds"][..., 8:].mean(-1), b["domain_ids"].float())
    assert torch.equal(b["inputs_embeds"][..., :8].mean(-1), 1.0 - b["domain_ids"].float())
    assert torch.equal(b["domain_ids"][:, 6], 1 - b["domain_ids"][:, 5])
    assert torch.equal(b["labels"][:, :11], 2 * b["domain_ids"][:, 1:])
    assert b["transition_mask"].sum(1).eq(1).all() and b["transition_mask"][:, 5].all()
    # At the transition step the input is the old domain but the target the new expert.
    assert torch.equal(b["labels"][:, 5], 2 * (1 - b["domain_ids"][:, 5]))


def test_random_switch_covers_the_range_and_marks_each_sequences_own_transition():
    b = routing_batch(torch.Generator().manual_seed(1), 4000, 12, 3, 9)
    switch_B = (b["domain_ids"][:, 1:] != b["domain_ids"][:, :-1]).float().argmax(1) + 1
    assert set(switch_B.tolist()) == set(range(3, 10))
    assert torch.equal(b["transition_mask"].float().argmax(1), switch_B - 1)


def test_markov_chain_has_the_reference_transition_probabilities():
    states = markov_chain(torch.Generator().manual_seed(2), 4000, 50)
    step = (states[:, 1:] - states[:, :-1]) % 13
    # P(+1) = 0.7 + 0.15/13 = 0.7115, P(+2) = 0.15 + 0.15/13 = 0.1615 (spec §4).
    assert (step == 1).float().mean().item() == pytest.approx(0.7115, abs=0.005)
    assert (step == 2).float().mean().item() == pytest.approx(0.1615, abs=0.005)
    assert (step == 5).float().mean().item() == pytest.approx(0.0115, abs=0.002)


def test_markov_chain_equals_the_step_by_step_chain_on_the_same_draws():
    length = 40
    g = torch.Generator().manual_seed(5)
    u_BS, uniform_BS = torch.rand(64, length, generator=g), torch.randint(0, 13, (64, length), generator=g)
    states = [uniform_BS[:, 0]]
    for t in range(1, length):  # the reference's generator, one step at a time
        step_B = torch.where(u_BS[:, t] < 0.7, 1, 2)
        states.append(torch.where(u_BS[:, t] >= 0.85, uniform_BS[:, t], (states[-1] + step_B) % 13))
    assert torch.equal(markov_chain(torch.Generator().manual_seed(5), 64, length), torch.stack(states, dim=1))


def test_chars_are_a_then_b_with_shifted_targets():
    b = chars_batch(torch.Generator().manual_seed(3), 32, 64, 32, 32)
    assert b["tokens"].shape == (32, 63)
    assert (b["tokens"][:, :32] < 13).all() and (b["tokens"][:, 32:] >= 13).all()
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])
    assert b["transition_mask"][:, 31].all() and b["transition_mask"].sum().item() == 32
    assert torch.equal(b["domain_ids"], (b["tokens"] >= 13).long())  # of the input chars


def test_streams_are_deterministic_fresh_per_step_and_validation_is_separate():
    dm = TransitionTaskDataModule(batch_size=8, val_batch_size=8, val_batches=2, seed=5)
    first, second = list(zip(range(2), dm.train_dataloader()))
    again = next(iter(TransitionTaskDataModule(batch_size=8, seed=5).train_dataloader()))
    assert torch.equal(first[1]["inputs_embeds"], again["inputs_embeds"])
    assert not torch.equal(first[1]["inputs_embeds"], second[1]["inputs_embeds"])
    val = list(dm.val_dataloader())
    assert len(val) == 2 and not torch.equal(val[0]["inputs_embeds"], first[1]["inputs_embeds"])


@pytest.mark.parametrize("kwargs, field", [
    ({"task": "text"}, "task"), ({"switch_low": 0}, "switch_low"), ({"switch_high": 12}, "switch_high"),
    ({"switch_low": 7, "switch_high": 6}, "switch_low"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TransitionTaskDataModule(**kwargs)


def test_early_signal_carries_the_domain_only_in_the_first_steps():
    b = early_signal_batch(torch.Generator().manual_seed(6), 16, 8, 3, noise=0.0)
    domain = b["domain_ids"][:, 0]
    assert torch.equal(b["inputs_embeds"][:, :3, 8:].mean(-1), domain[:, None].float().expand(16, 3))
    assert b["inputs_embeds"][:, 3:].abs().sum() == 0
    assert torch.equal(b["labels"][:, -1], 2 * domain)
