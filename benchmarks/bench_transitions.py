"""Speed of the domain-transition study's models (arXiv 2605.00604) against the reference prototypes' measured
time per step, and of the two kernels that made them fast, each beside what it replaced.

1. **beta memory scan**, forward + backward of ``h_t = beta * h_{t-1} + x_t`` (grads to x, beta and h0):
   autograd through a step-by-step loop, autograd through the chunked closed form (our previous kernel), and
   :func:`lightning_moe.gating.leaky_integrate` (the recurrence with its hand-written adjoint).
2. **char-LM mixture** ``sum_e g_te out_e[token_t]``, forward + backward: gathering a ``[B, S, D, E]`` tensor of
   expert outputs and summing it (our previous form) vs scattering the gates into each token's vocabulary row
   and one matmul (``TransitionCharLM.forward``).
3. **training step** of each study model (batch, forward, backward, Adam, the precision update), without
   Lightning, beside the reference's uncontended time per step on the same 2-core machine (transitions spec
   §6), and the beta+Ant predictor alone (``[x, h] 128 -> 256 GELU -> 64`` on 256 x 63 tokens), which bounds
   the beta+Ant language model from below.

Variants alternate within each repeat (A B C A B C ...) so machine noise hits them alike; medians are shown.

    python benchmarks/bench_transitions.py              # 1 torch thread (the study's setting)
    python benchmarks/bench_transitions.py --threads 2  # the reference ran on both cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.studies.transitions.data import TransitionTaskDataModule
from lightning_moe.gating import TransitionRouter, leaky_integrate
from lightning_moe.gating.temporal import chunked_scan
from lightning_moe.studies.transitions.modules import TransitionCharLM, TransitionRoutingToy

# Reference prototypes, uncontended ms per step on this machine (transitions spec §6): the toy's 800-epoch runs
# (baseline 30.0 s, beta+Ant 33.6 s) and the LM's 1500-step runs (Standard 270 s, beta 304 s, beta+Ant from a
# 150-step slice). The reference's other toy conditions were not timed one by one.
REFERENCE_MS = {"toy baseline": 37.5, "toy beta+ant": 42.0, "lm standard": 180.0, "lm beta": 203.0,
                "lm beta+ant": 358.0}


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    """Median over ``repeats`` of the mean time of ``inner`` calls, variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---- 1. scan ---------------------------------------------------------------------------------------------------

def loop_scan(x_BSD, logit_beta_D, h0_BD):
    beta_D, h_BD, out = torch.sigmoid(logit_beta_D), h0_BD, []
    for t in range(x_BSD.shape[1]):
        h_BD = beta_D * h_BD + x_BSD[:, t]
        out.append(h_BD)
    return torch.stack(out, dim=1)


def bench_scan(repeats: int) -> None:
    print("\n## beta memory scan, forward + backward (ms)\n")
    print("| B, S, D | autograd loop | autograd chunked | leaky_integrate | loop / ours | chunked / ours |")
    print("|---|---|---|---|---|---|")
    for B, S, D in ((512, 12, 16), (256, 63, 64), (8, 2048, 256)):
        x = torch.randn(B, S, D, requires_grad=True)
        logit_beta, h0 = torch.full((D,), 2.0, requires_grad=True), torch.randn(B, D, requires_grad=True)
        upstream = torch.randn(B, S, D)

        def run(fn, inputs=(x, logit_beta, h0), upstream=upstream):
            return lambda: torch.autograd.grad((fn(*inputs) * upstream).sum(), inputs)

        ms = median_ms({"loop": run(loop_scan), "chunked": run(chunked_scan), "ours": run(leaky_integrate)},
                       repeats, inner=5)
        print(f"| {B}, {S}, {D} | {ms['loop']:.2f} | {ms['chunked']:.2f} | {ms['ours']:.2f} | "
              f"{ms['loop'] / ms['ours']:.1f}x | {ms['chunked'] / ms['ours']:.1f}x |")


# ---- 2. mixture ------------------------------------------------------------------------------------------------

def bench_mixture(repeats: int) -> None:
    B, S, D, E, V = 256, 63, 64, 2, 26
    tokens_BS = torch.randint(0, V, (B, S))
    outs_VED = torch.randn(V, E, D, requires_grad=True)
    gates_BSE = torch.rand(B, S, E, requires_grad=True)
    upstream = torch.randn(B, S, D)

    def gathered():  # the previous forward: outputs stacked on a last E axis, gathered per token, summed over E
        outs_BSDE = outs_VED.transpose(1, 2).contiguous()[tokens_BS]
        return (outs_BSDE * gates_BSE.unsqueeze(2)).sum(-1)

    def scattered():
        T = B * S
        gates_TVE = outs_VED.new_zeros(T, V, E).index_put((torch.arange(T), tokens_BS.reshape(T)),
                                                          gates_BSE.reshape(T, E))
        return (gates_TVE.view(T, V * E) @ outs_VED.reshape(V * E, D)).view(B, S, D)

    torch.testing.assert_close(gathered(), scattered())

    def run(fn):
        return lambda: torch.autograd.grad((fn() * upstream).sum(), (outs_VED, gates_BSE))

    ms = median_ms({"gathered": run(gathered), "scattered": run(scattered)}, repeats, inner=5)
    print(f"\n## char-LM mixture, forward + backward, B={B}, S={S}, D={D}, E={E}, V={V} (ms)\n")
    print("| gather [B,S,D,E] + sum | scatter gates + matmul | ratio |\n|---|---|---|")
    print(f"| {ms['gathered']:.2f} | {ms['scattered']:.2f} | {ms['gathered'] / ms['scattered']:.1f}x |")


# ---- 3. training steps -----------------------------------------------------------------------------------------

NO_LOSSES = {"gate_bias": True, "load_balancing_weight": 0.0, "z_loss_weight": 0.0}


def toy(beta: bool, anticipation: bool, precision: bool = False):
    router = TransitionRouter(beta=beta, anticipation=anticipation, precision=precision, anticipation_form="direct",
                              predictor_activation="relu", anticipation_weight=5.5, precision_init_var=0.5,
                              **NO_LOSSES)
    data = TransitionTaskDataModule(task="routing", seq_len=12, switch_low=6, switch_high=6, batch_size=512)
    return TransitionRoutingToy(router), data


def char_lm(beta: bool, anticipation: bool):
    router = TransitionRouter(beta=beta, anticipation=anticipation, precision=False, **NO_LOSSES)
    data = TransitionTaskDataModule(task="chars", seq_len=64, switch_low=32, switch_high=32, batch_size=256)
    return TransitionCharLM(router), data


MODELS = {
    "toy baseline": lambda: toy(False, False), "toy beta": lambda: toy(True, False),
    "toy beta+ant": lambda: toy(True, True), "toy beta+pi+ant": lambda: toy(True, True, True),
    "lm standard": lambda: char_lm(False, False), "lm beta": lambda: char_lm(True, False),
    "lm beta+ant": lambda: char_lm(True, True),
}


def training_step(build) -> Callable[[], None]:
    torch.manual_seed(0)
    model, data = build()
    model.log = lambda *args, **kwargs: None  # no Trainer attached: nothing to log to
    data.setup("fit")
    batches, optimizer = iter(data.train_dataloader()), model.configure_optimizers()
    step = 0

    def run() -> None:
        nonlocal step
        batch = next(batches)
        loss = model.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if isinstance(model, TransitionRoutingToy):
            model.on_train_batch_end(None, batch, step)
        step += 1

    return run


def predictor_alone() -> Callable[[], None]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    x, y = torch.randn(256 * 63, 128, requires_grad=True), torch.randn(256 * 63, 64)
    return lambda: F.mse_loss(net(x), y).backward()


def bench_steps(repeats: int) -> None:
    fns = {name: training_step(build) for name, build in MODELS.items()}
    fns["lm beta+ant predictor alone"] = predictor_alone()
    ms = median_ms(fns, repeats, inner=10)
    print("\n## training step without Lightning (ms), against the reference prototypes (spec §6)\n")
    print("| model | ours | reference | speed-up |\n|---|---|---|---|")
    for name, value in ms.items():
        ref = REFERENCE_MS.get(name)
        ref_text, ratio = (f"{ref:.1f}", f"{ref / value:.1f}x") if ref else ("—", "—")
        print(f"| {name} | {value:.2f} | {ref_text} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the study runs use 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant (median shown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    bench_scan(args.repeats)
    bench_mixture(args.repeats)
    bench_steps(args.repeats)


if __name__ == "__main__":
    main()
