"""Forward+backward of one MoE layer on a GPU: MegaBlocks grouped vs our native grouped vs a Mixtral-style loop.

All three share one router and one set of weights (the MegaBlocks backend reads our parameters), so they compute
the same function; only the expert computation differs. bf16 weights and activations (MegaBlocks' grouped GEMMs
are bf16-only). Expert width F = 2*D/K keeps the active FLOPs per token equal across the (E, K) points. Timed
interleaved in one process (A B C A B C ...) with CUDA events, medians reported; ratios are what to read.

    python benchmarks/bench_megablocks.py            # D in {1024, 4096}, (E,K) in {(8,2), (64,8)}, T=16384
    python benchmarks/bench_megablocks.py --quick    # D=1024, (E,K)=(8,2), T=4096

Needs a CUDA GPU and MegaBlocks (README: "MegaBlocks on GPU"); exits with the reason otherwise.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_moe_layer import MixtralLoopExperts
from torch import Tensor, nn

from lightning_moe import MoELayer, SoftmaxTopK
from lightning_moe.experts.megablocks import MegaBlocksUnavailableError, load_megablocks
from lightning_moe.experts.native import _grouped_mm_ok


def fwd_bwd_ms(fn: nn.Module, x: Tensor, grad: Tensor) -> float:
    """One forward+backward timed on the GPU's own clock (the launch is asynchronous)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(x).backward(grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def run_point(T: int, D: int, E: int, K: int, reps: int) -> dict[str, float]:
    F_ = 2 * D // K
    torch.manual_seed(0)
    router = lambda: SoftmaxTopK(load_balancing_weight=0, z_loss_weight=0)
    native = MoELayer(D, F_, E, K, router=router()).cuda().to(torch.bfloat16)
    mega = MoELayer(D, F_, E, K, router=router(), backend="megablocks").cuda().to(torch.bfloat16)
    mega.load_state_dict(native.state_dict())
    impls = {"megablocks": mega, "native": native, "hf_loop": MixtralLoopExperts(native)}
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():  # warm-up: kernel selection, allocator, MegaBlocks' lazy dMoE build
        fwd_bwd_ms(fn, x, grad)
    for _ in range(reps):
        for name, fn in impls.items():
            times[name].append(fwd_bwd_ms(fn, x, grad))
    out = {name: statistics.median(t) for name, t in times.items()}
    del native, mega, impls
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small point (D=1024, E=8, K=2, T=4096)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per implementation (median reported)")
    args = p.parse_args()
    try:
        load_megablocks()
    except MegaBlocksUnavailableError as err:
        raise SystemExit(f"bench_megablocks: cannot run: {err}") from err
    T = 4096 if args.quick else 16384
    Ds = [1024] if args.quick else [1024, 4096]
    EKs = [(8, 2)] if args.quick else [(8, 2), (64, 8)]
    probe = torch.zeros(1, Ds[0], device="cuda", dtype=torch.bfloat16)
    native_path = "grouped_mm" if _grouped_mm_ok(probe, Ds[0]) else "per-expert loop (grouped_mm unavailable here)"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, T={T}, F=2D/K, forward+backward, "
          f"median of {args.reps}; native path: {native_path}")
    header = "| D | E,K | megablocks ms | native ms | hf_loop ms | native/megablocks | hf_loop/megablocks |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for D in Ds:
        for E, K in EKs:
            r = run_point(T, D, E, K, args.reps)
            m, n, lp = r["megablocks"], r["native"], r["hf_loop"]
            print(f"| {D} | {E},{K} | {m:.2f} | {n:.2f} | {lp:.2f} | {n / m:.2f} | {lp / m:.2f} |", flush=True)


if __name__ == "__main__":
    main()
