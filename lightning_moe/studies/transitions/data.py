"""Synthetic tasks of the domain-transition study (arXiv 2605.00604; transitions spec §2, §4, §7.3), generated
a whole batch at a time with torch (no per-sequence Python loops), fresh batches every step from a seeded
generator, with the domain and transition labels in every batch.

Every task speaks the package's batch dialect (:mod:`lightning_moe.data.batch`), so every monitor can watch it:
``tokens`` (character ids) or ``inputs_embeds`` (float input vectors ``[B, S, D]``, the Hugging Face name),
``labels`` (what is predicted at each position: the next character, the target expert id, or the regression
target), ``domain_ids`` (the domain of each *input* position, as the LM's batches label it) and, for the tasks
with a switch, ``transition_mask`` (True at each sequence's transition step: the last input of the old domain,
whose label is already the new one's).

Legend: B batch, S sequence, D input width, V vocabulary.

- ``routing``: the toy routing task. Sequences of S = 12 noisy vectors in R^16; domain d adds +1 to dims
  [8d, 8d+8). Each sequence starts in a random domain and switches to the other at ``switch``; the target
  expert at step t is ``2 * domain(t + 1)`` (experts 1 and 3 are decoys), so the transition step is
  ``switch - 1``, where the input is still the old domain but the target is the new one.
- ``early_signal``: Table 1's Task A. One random domain per sequence whose signal is present only in the first
  ``signal_steps`` steps (noise everywhere); target = ``2 * domain`` at every step (read at the last one).
  (Table 1's Task B is ``routing`` with S = 8, the switch at 4 and noise 1.2, read at the last step.)
- ``chars``: the character task. 26 letters, a-m = domain A, n-z = domain B; each half is a first-order Markov
  chain (next = prev+1 w.p. 0.7, prev+2 w.p. 0.15, else uniform over the 13 letters); S = 64 characters, A then
  B from ``switch``. Inputs are chars 0..62, targets 1..63, so the transition step is ``switch - 1``.
- ``regression``: the precision-gating task (spec §1.2, Tables 2-3). ``x ~ N(0, I_16)``, a random domain d per
  sample, target = mean of the domain's half ``x[8d : 8d + 8]`` (no sequence; ``seq_len`` and the switch unused).

``switch_low``/``switch_high`` draw the switch per sequence uniformly from ``[low, high]`` (spec §7.3); equal
bounds give the reference's fixed position.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_moe.utils import check_non_negative, check_positive_int

TaskName = Literal["routing", "early_signal", "chars", "regression"]
HALF = 13  # letters per domain in the character task


def make_switches(generator: torch.Generator, batch: int, low: int, high: int) -> Tensor:
    """``switch_B``: the first position of the second domain, uniform in ``[low, high]``."""
    return torch.randint(low, high + 1, (batch,), generator=generator)


def routing_batch(
    generator: torch.Generator, batch: int, seq_len: int, switch_low: int, switch_high: int, d_model: int = 16,
    noise: float = 0.8,
) -> dict[str, Tensor]:
    """One batch of the toy routing task: ``inputs_embeds``, ``labels`` (target expert ids), ``domain_ids``,
    ``transition_mask``."""
    start_B = torch.randint(0, 2, (batch,), generator=generator)
    switch_B = make_switches(generator, batch, switch_low, switch_high)
    steps_S = torch.arange(seq_len)
    after_BS = steps_S >= switch_B[:, None]
    domain_BS = torch.where(after_BS, 1 - start_B[:, None], start_B[:, None])
    half = d_model // 2
    dims_D = torch.arange(d_model) // half  # which domain each input dimension signals
    signal_BSD = (dims_D == domain_BS[..., None]).float()
    x_BSD = torch.randn(batch, seq_len, d_model, generator=generator) * noise + signal_BSD
    # Target at t is the expert of the *next* step's domain; the last step has no next one (kept, unused).
    next_domain_BS = torch.cat([domain_BS[:, 1:], domain_BS[:, -1:]], dim=1)
    return {
        "inputs_embeds": x_BSD, "labels": 2 * next_domain_BS, "domain_ids": domain_BS,
        "transition_mask": steps_S == (switch_B[:, None] - 1),
    }


def early_signal_batch(
    generator: torch.Generator, batch: int, seq_len: int, signal_steps: int, d_model: int = 16, noise: float = 1.2
) -> dict[str, Tensor]:
    """One batch of Table 1's Task A: ``inputs_embeds``, ``labels`` (constant per sequence), ``domain_ids``."""
    domain_B = torch.randint(0, 2, (batch,), generator=generator)
    x_BSD = torch.randn(batch, seq_len, d_model, generator=generator) * noise
    dims_D = torch.arange(d_model) // (d_model // 2)
    signal_BSD = (dims_D == domain_B[:, None, None]) & (torch.arange(seq_len) < signal_steps)[None, :, None]
    domain_BS = domain_B[:, None].expand(batch, seq_len)
    return {"inputs_embeds": x_BSD + signal_BSD.float(), "labels": 2 * domain_BS, "domain_ids": domain_BS}


def markov_chain(generator: torch.Generator, batch: int, length: int) -> Tensor:
    """``states_BS`` in [0, 13): first uniform, then +1 (p 0.7), +2 (p 0.15) or uniform (p 0.15), mod 13."""
    u_BS = torch.rand(batch, length, generator=generator)
    uniform_BS = torch.randint(0, HALF, (batch, length), generator=generator)
    # Without a loop over time: each state is the last uniform draw (at step 0 or a jump) plus the +1/+2 steps
    # taken since, mod 13; integer arithmetic, so exactly the step-by-step chain.
    reset_BS = u_BS >= 0.85
    reset_BS[:, 0] = True
    step_BS = torch.where(u_BS < 0.7, 1, 2).masked_fill(reset_BS, 0)
    steps = torch.arange(length)
    last_reset_BS = torch.where(reset_BS, steps, 0).cummax(dim=1).values
    walked_BS = step_BS.cumsum(dim=1)
    since_BS = walked_BS - walked_BS.gather(1, last_reset_BS)
    return (uniform_BS.gather(1, last_reset_BS) + since_BS) % HALF


def chars_batch(
    generator: torch.Generator, batch: int, seq_len: int, switch_low: int, switch_high: int
) -> dict[str, Tensor]:
    """One batch of the character task: ``tokens`` (inputs, S = seq_len - 1), ``labels`` (the next chars),
    ``domain_ids`` (of the input chars), ``transition_mask``."""
    switch_B = make_switches(generator, batch, switch_low, switch_high)
    chain_a = markov_chain(generator, batch, seq_len)
    chain_b = markov_chain(generator, batch, seq_len)
    steps_S = torch.arange(seq_len)
    in_b_BS = steps_S >= switch_B[:, None]
    # Domain B restarts its chain at the switch: position t of B is chain_b's step t - switch.
    b_index_BS = (steps_S - switch_B[:, None]).clamp(min=0)
    chars_BS = torch.where(in_b_BS, HALF + chain_b.gather(1, b_index_BS), chain_a)
    return {
        "tokens": chars_BS[:, :-1], "labels": chars_BS[:, 1:], "domain_ids": in_b_BS[:, :-1].long(),
        "transition_mask": steps_S[:-1] == (switch_B[:, None] - 1),
    }


def regression_batch(generator: torch.Generator, batch: int, d_model: int = 16) -> dict[str, Tensor]:
    """One batch of the precision task, one position per sample: ``inputs_embeds`` ``[B, 1, D]``, ``labels``
    ``[B, 1]`` (float), ``domain_ids`` ``[B, 1]``."""
    x_BD = torch.randn(batch, d_model, generator=generator)
    domain_B = torch.randint(0, 2, (batch,), generator=generator)
    half = d_model // 2
    in_domain_BD = (torch.arange(d_model) // half) == domain_B[:, None]
    target_B1 = (x_BD * in_domain_BD).sum(-1, keepdim=True) / half
    return {"inputs_embeds": x_BD[:, None], "labels": target_B1, "domain_ids": domain_B[:, None]}


class _Batches(IterableDataset):
    """``steps`` batches from a generator seeded with ``seed`` (unbounded when ``steps`` is 0)."""

    def __init__(self, make, seed: int, steps: int) -> None:
        self.make, self.seed, self.steps = make, seed, steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        step = 0
        while not self.steps or step < self.steps:
            yield self.make(generator)
            step += 1


class TransitionTaskDataModule(pl.LightningDataModule):
    """Fresh synthetic batches of a transition task (see the module docstring) each training step, and a fixed
    held-out validation set of ``val_batches`` batches of ``val_batch_size`` from a separate seed.

    Args:
        task: ``routing`` (the toy routing ablation), ``early_signal`` (Table 1's Task A), ``chars`` (the character task) or ``regression`` (the
            precision task).
        seq_len: sequence length (12 for routing, 64 characters for chars).
        switch_low: earliest switch position (the first position of the second domain).
        switch_high: latest switch position; equal to ``switch_low`` for the fixed-position protocol.
        batch_size: sequences per training step (512 routing, 256 chars in the reference).
        val_batch_size: sequences per validation batch.
        val_batches: number of validation batches.
        noise: std of the Gaussian noise of the routing and early-signal tasks (0.8 ablation, 1.2 Table 1).
        signal_steps: the early-signal task's steps that carry the domain signal (3).
        seed: seeds the training stream; validation uses ``seed + 1_000_003``.
    """

    def __init__(
        self,
        task: TaskName = "routing",
        seq_len: int = 12,
        switch_low: int = 6,
        switch_high: int = 6,
        batch_size: int = 512,
        val_batch_size: int = 2048,
        val_batches: int = 4,
        noise: float = 0.8,
        signal_steps: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in ("routing", "early_signal", "chars", "regression"):
            raise ValueError(
                f"task={task!r} is not a transition task; use 'routing', 'early_signal', 'chars' or 'regression'."
            )
        check_positive_int("signal_steps", signal_steps)
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_batch_size", val_batch_size),
                            ("val_batches", val_batches)):
            check_positive_int(name, value)
        check_non_negative("noise", noise)
        if not 1 <= switch_low <= switch_high <= seq_len - 1:
            raise ValueError(
                f"switch_low={switch_low}, switch_high={switch_high} must satisfy 1 <= switch_low <= switch_high <= "
                f"seq_len - 1 = {seq_len - 1} so both domains appear; move the switch bounds inside the sequence."
            )
        self.task, self.seq_len, self.switch_low, self.switch_high = task, seq_len, switch_low, switch_high
        self.batch_size, self.val_batch_size, self.val_batches = batch_size, val_batch_size, val_batches
        self.noise, self.signal_steps, self.seed = noise, signal_steps, seed

    def make_batch(self, generator: torch.Generator, batch: int) -> dict[str, Tensor]:
        if self.task == "routing":
            return routing_batch(generator, batch, self.seq_len, self.switch_low, self.switch_high, noise=self.noise)
        if self.task == "early_signal":
            return early_signal_batch(generator, batch, self.seq_len, self.signal_steps, noise=self.noise)
        if self.task == "regression":
            return regression_batch(generator, batch)
        return chars_batch(generator, batch, self.seq_len, self.switch_low, self.switch_high)

    def train_dataloader(self) -> DataLoader:
        data = _Batches(lambda g: self.make_batch(g, self.batch_size), self.seed, 0)
        return DataLoader(data, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        data = _Batches(lambda g: self.make_batch(g, self.val_batch_size), self.seed + 1_000_003, self.val_batches)
        return DataLoader(data, batch_size=None)
