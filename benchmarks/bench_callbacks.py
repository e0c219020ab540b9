"""Step time of MoELanguageModel training with and without the routing monitors, side by side.

Both arms train the same model (same seed, same batches) with the same Trainer settings and a CSV logger; the
only difference is the callbacks: LoadBalanceMonitor, SpecializationMonitor, RouterGeometryMonitor and
TransitionMonitor, and with ``--callbacks all`` also every diagnostic (CoActivationMonitor, MarginMonitor,
RoutingAlarms, RoutingSummary, RoutingConsistencyMonitor on a probe of one training-size batch, RoutingTraceWriter). Runs alternate (A B A B ...) so machine noise hits both alike. A step is timed from one
``on_train_batch_start`` to the next, so it includes every hook, the monitors' logging steps and the logger.
The mean is the amortised cost (logging steps included); the median is a typical non-logging step. The target
is a mean ratio <= 1.05. Wall and CPU time are both shown: on a shared machine wall time also measures the
neighbours, and both move by several percent from run to run; the last line, CPU time measured inside the
monitors' own hooks, is the stable estimate of their cost.

    python benchmarks/bench_callbacks.py                 # d=64, 2 layers, 8 experts top-2, 16 x 128 tokens/step
    python benchmarks/bench_callbacks.py --steps 30 --repeats 1   # quick look
    python benchmarks/bench_callbacks.py --callbacks all          # every monitor and diagnostic at once
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_moe.callbacks import (
    CoActivationMonitor,
    LoadBalanceMonitor,
    MarginMonitor,
    RouterGeometryMonitor,
    RoutingAlarms,
    RoutingConsistencyMonitor,
    RoutingSummary,
    RoutingTraceWriter,
    SpecializationMonitor,
    TransitionMonitor,
)
from benchmarks.bench_moe_layer import cpu_name
from lightning_moe.modules.language_model import MoELanguageModel

NUM_DOMAINS = 4


class StepTimer(pl.Callback):
    """Wall and CPU time between consecutive training-batch starts (the last step ends at ``on_train_end``).

    CPU time (this process) is reported beside wall time because on a shared machine other tenants' jobs
    stretch wall time by whatever share of the cores they take, in one arm more than the other by chance.
    """

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def step_times(self, warmup: int) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:])][warmup:]


class HookClock:
    """CPU time spent inside the monitors' per-step hooks (where all their per-step work happens), the noise-free
    part of the comparison: it does not depend on what the neighbours do to the step time."""

    HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_after_backward", "on_before_optimizer_step")

    def __init__(self, monitors: list[pl.Callback]) -> None:
        self.seconds = 0.0
        self.by_monitor: dict[str, float] = {}
        for monitor in monitors:
            for name in self.HOOKS:
                setattr(monitor, name, self._timed(getattr(monitor, name), type(monitor).__name__))

    def _timed(self, hook, owner: str):
        def timed(*args, **kwargs):
            start = time.thread_time()
            hook(*args, **kwargs)
            spent = time.thread_time() - start
            self.seconds += spent
            self.by_monitor[owner] = self.by_monitor.get(owner, 0.0) + spent

        return timed


def batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random tokens whose domain label switches at a random position in each sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n * batch_size, seq_len + 1), generator=g)
    first = torch.randint(0, NUM_DOMAINS, (n * batch_size, 1), generator=g)
    second = (first + torch.randint(1, NUM_DOMAINS, first.shape, generator=g)) % NUM_DOMAINS
    switch = torch.randint(seq_len // 4, 3 * seq_len // 4, first.shape, generator=g)
    domains = torch.where(torch.arange(seq_len) < switch, first, second)
    return [{"tokens": t[:-1], "labels": t[1:], "domain_ids": d} for t, d in zip(tokens, domains)]


def run(
    args: argparse.Namespace, monitors: bool, data: list[dict], root: str
) -> tuple[list[tuple[float, float]], float, dict[str, float]]:
    """(wall, CPU) seconds of each timed step, the CPU seconds per step spent inside the monitors' hooks, and
    that time per monitor."""
    torch.manual_seed(0)
    model = MoELanguageModel(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=2 * args.d_model,
        num_experts=args.experts, top_k=args.top_k, max_seq_len=args.seq, warmup_steps=10,
    )
    timer = StepTimer()
    monitor_list: list[pl.Callback] = [
        LoadBalanceMonitor(),
        SpecializationMonitor(num_labels=NUM_DOMAINS),
        RouterGeometryMonitor(),
        TransitionMonitor(num_labels=NUM_DOMAINS),
    ] if monitors else []
    if monitors and args.callbacks == "all":
        monitor_list += [
            CoActivationMonitor(), MarginMonitor(), RoutingAlarms(), RoutingSummary(),
            RoutingConsistencyMonitor(probe=[{k: torch.stack([d[k] for d in data[:args.batch]]) for k in data[0]}]),
            RoutingTraceWriter(dirpath=f"{root}/traces"),
        ]
    clock = HookClock(monitor_list)
    callbacks: list[pl.Callback] = [timer, *monitor_list]
    trainer = pl.Trainer(
        max_steps=args.steps, log_every_n_steps=args.every, callbacks=callbacks, logger=CSVLogger(root),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        accelerator="cpu", default_root_dir=root,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    return timer.step_times(args.warmup), clock.seconds / args.steps, {k: v / args.steps for k, v in clock.by_monitor.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the statistics")
    p.add_argument("--every", type=int, default=10, help="Trainer log_every_n_steps = the monitors' cadence")
    p.add_argument("--repeats", type=int, default=3, help="A/B pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--callbacks", choices=("monitors", "all"), default="monitors",
                   help="the four monitors, or every monitor and diagnostic")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    data = batches(args.steps, args.batch, args.seq, args.vocab)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    in_hooks: list[float] = []
    per_monitor: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            for monitors in (False, True):
                steps, hook_seconds, by_monitor = run(args, monitors, data, root)
                times[monitors] += steps
                if monitors:
                    in_hooks.append(hook_seconds)
                    for name, seconds in by_monitor.items():
                        per_monitor.setdefault(name, []).append(seconds)
    print(
        f"{cpu_name()}, torch {torch.__version__}: "
        f"MoELanguageModel d={args.d_model} layers={args.layers} E={args.experts} k={args.top_k}, "
        f"{args.batch}x{args.seq} tokens/step, {args.threads} thread(s), monitors log every {args.every} steps, "
        f"{args.repeats} x {args.steps - args.warmup} timed steps per arm"
    )
    print(f"{'ms per step':>24} {'wall mean':>10} {'wall median':>12} {'CPU mean':>9} {'CPU median':>11}")
    rows = {}
    with_label = "all four monitors" if args.callbacks == "monitors" else "every diagnostic"
    for monitors, label in ((False, "no callbacks"), (True, with_label)):
        wall, cpu = zip(*times[monitors])
        rows[label] = [statistics.mean(wall), statistics.median(wall), statistics.mean(cpu), statistics.median(cpu)]
        print(f"{label:>24} " + " ".join(f"{1e3 * v:{w}.2f}" for v, w in zip(rows[label], (10, 12, 9, 11))))
    ratio = [a / b for a, b in zip(rows[with_label], rows["no callbacks"])]
    print(f"{'ratio (with / without)':>24} " + " ".join(f"{v:{w}.3f}" for v, w in zip(ratio, (10, 12, 9, 11))))
    hooks = statistics.mean(in_hooks)
    base = rows["no callbacks"][2]
    print(f"monitors' own work: {1e3 * hooks:.2f} ms CPU per step inside their hooks = {hooks / base:.1%} of the "
          f"no-callback step (ratio {(base + hooks) / base:.3f})")
    print("per callback, ms CPU per step: " + ", ".join(
        f"{name} {1e3 * statistics.mean(v):.2f}" for name, v in sorted(per_monitor.items(), key=lambda kv: -sum(kv[1]))))

if __name__ == "__main__":
    main()
