"""Expert parallelism on CPU (gloo): bytes exchanged per token and step time of one MoE layer for P in {1,2,4}.

One global batch of T tokens is split over P processes (strong scaling); each rank routes its T/P tokens, sends
the routed copies to the ranks owning their experts and gets the outputs back (lightning_moe.parallel). Step =
forward + backward of the layer, parameter gradients cleared before each step (as Lightning does); the step time
of a P is the slowest rank's, median over steps. "in all_to_all" is the time spent inside the token exchanges,
waiting for the other ranks included. Bytes are counted from the actual routing: every copy that leaves its rank
travels four times (tokens out and outputs back in forward, their gradients in backward); the per-expert count
exchange (P*E/P int64 per layer) is listed apart.

    python -m benchmarks.bench_expert_parallel            # T=4096, D=256, F=512, E=8, K=2, fp32 (~1 min)
    python -m benchmarks.bench_expert_parallel --quick    # a smoke run

On a CPU with fewer cores than P the ranks share cores, so step times measure the exchange's cost and the
oversubscription, not the speedup a GPU per rank gives; the expected GPU scaling is printed as a calculation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from benchmarks.bench_moe_layer import cpu_name
from lightning_moe import MoELayer, SoftmaxTopK
from lightning_moe.parallel import expert_parallel, expert_parallel_mesh, shard_experts


def _timed_exchange(spent: list[float]):
    exchange = expert_parallel._exchange

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = exchange(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    return timed


def _rank(rank: int, P: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if P > 1:
        dist.init_process_group("gloo", rank=rank, world_size=P)
    torch.manual_seed(0)
    layer = MoELayer(args.d_model, args.d_ff, args.experts, args.top_k,
                     router=SoftmaxTopK(load_balancing_weight=0.0, z_loss_weight=0.0))
    if P > 1:
        shard_experts(layer, expert_parallel_mesh(P, P))
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(args.tokens, args.d_model, generator=g).chunk(P)[rank].contiguous().requires_grad_()
    grad_TD = torch.randn(args.tokens, args.d_model, generator=g).chunk(P)[rank].contiguous()
    spent: list[float] = []
    expert_parallel._exchange = _timed_exchange(spent)  # a forked child: the patch dies with it
    steps, exchanges = [], []
    for i in range(args.warmup + args.steps):
        for p in layer.parameters():
            p.grad = None
        x_TD.grad = None
        if P > 1:
            dist.barrier()
        spent.clear()
        t0 = time.perf_counter()
        layer(x_TD).backward(grad_TD)
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
            exchanges.append(sum(spent))
    # Copies leaving this rank: those whose expert lives on another rank.
    L = args.experts // P
    owner_N = layer.routing.experts_TK.reshape(-1) // L
    remote = int((owner_N != rank).sum())
    T = x_TD.shape[0]
    result = {"steps": steps, "exchange": exchanges, "remote": remote, "copies": owner_N.numel(), "tokens": T}
    torch.save(result, out / f"P{P}_rank{rank}.pt")
    if P > 1:
        dist.destroy_process_group()


def measure(P: int, args: argparse.Namespace, out: Path) -> dict:
    torch.multiprocessing.start_processes(_rank, args=(P, find_free_network_port(), args, out), nprocs=P,
                                          start_method="fork")
    ranks = [torch.load(out / f"P{P}_rank{r}.pt") for r in range(P)]
    step = statistics.median(max(r["steps"][i] for r in ranks) for i in range(args.steps))
    exchange = statistics.median(max(r["exchange"][i] for r in ranks) for i in range(args.steps))
    elem = 4  # fp32
    remote = sum(r["remote"] for r in ranks)
    return {
        "P": P,
        "step_ms": 1e3 * step,
        "exchange_ms": 1e3 * exchange,
        "remote_share": remote / sum(r["copies"] for r in ranks),
        "bytes_per_token": 4 * remote * args.d_model * elem / args.tokens,
        "count_bytes": P * (args.experts // P) * 8 if P > 1 else 0,
    }


def nccl_estimate(P: int, d_model: int = 4096, d_ff: int = 14336, top_k: int = 2, elem: int = 2,
                  flops: float = 989e12 * 0.5, link: float = 450e9) -> tuple[float, float, float]:
    """Per token and layer at balanced routing: (bytes exchanged, exchange us, expert compute us), for a
    Mixtral-sized SwiGLU layer in bf16 on H100s (989 TFLOP/s dense bf16 at 50% utilisation; NVLink 450 GB/s
    per direction per GPU)."""
    bytes_ = 4 * top_k * d_model * elem * (P - 1) / P
    compute = top_k * 3 * (2 * d_model * d_ff) * 3  # 3 GEMMs of 2*D*F FLOPs per copy; backward = 2x forward
    return bytes_, 1e6 * bytes_ / link, 1e6 * compute / flops


def comm_share(comm: float, compute: float) -> float:
    return comm / (comm + compute)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="global batch T (split over the P ranks)")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--d_ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="expert-parallel sizes P")
    parser.add_argument("--quick", action="store_true", help="T=512, D=64, F=128, 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.d_model, args.d_ff, args.steps, args.warmup = 512, 64, 128, 2, 1
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores visible), torch {torch.__version__}, gloo, 1 thread per rank")
    print(f"one SwiGLU MoE layer: T={args.tokens} global, D={args.d_model}, F={args.d_ff}, E={args.experts}, "
          f"K={args.top_k}, fp32, forward + backward, median of {args.steps} steps (slowest rank)\n")
    print("| P | tokens per rank | copies sent away | bytes exchanged per token | count bytes per layer | "
          "step ms | in all_to_all ms |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for P in args.sizes:
            r = measure(P, args, Path(tmp))
            print(f"| {P} | {args.tokens // P} | {r['remote_share']:.1%} | {r['bytes_per_token']:.0f} | "
                  f"{r['count_bytes']} | {r['step_ms']:.0f} | {r['exchange_ms']:.0f} |")
    print("\nExpected on GPUs (NCCL), per token and MoE layer, balanced routing; Mixtral-sized layer "
          "(D=4096, F=14336, K=2, bf16), H100 at 50% of 989 TFLOP/s:")
    print("bytes = 4 * K * D * 2 B * (P-1)/P (tokens out, outputs back, both gradients); "
          "expert FLOPs = K * 3 GEMMs * 2*D*F * 3 (forward + backward)")
    for P in (2, 4, 8):
        b, nvlink, comp = nccl_estimate(P)
        _, ib, _ = nccl_estimate(P, link=50e9)
        print(f"  P={P}: {b / 1024:.0f} KiB; exchange {nvlink:.3f} us on NVLink (450 GB/s), {ib:.2f} us on "
              f"400 Gb/s InfiniBand (50 GB/s) vs {comp:.2f} us expert compute -> {comm_share(nvlink, comp):.1%} / "
              f"{comm_share(ib, comp):.1%} of the step if not overlapped; expert weights per GPU 1/{P}")
    print("With a fixed batch per GPU, the expert compute per GPU stays that of P=1 (each GPU runs K copies per "
          "local token on average), so throughput grows ~P x (1 - that share), less the load imbalance: the "
          "step waits for the busiest expert rank.")


if __name__ == "__main__":
    main()
