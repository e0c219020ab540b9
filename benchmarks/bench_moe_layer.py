"""Forward+backward of one MoE layer: native vs a Mixtral-style per-expert loop vs a dense FFN.

The dense FFN has width K*F, so it does exactly the active FLOPs of the MoE layer with no routing: the
practical limit. All three are timed interleaved in one process (A B C A B C ...) so machine noise hits them
alike; ratios are what to read. Parameter gradients are cleared (``grad = None``) before every step, as
Lightning does: letting them accumulate adds a read-modify-write of every weight gradient. Memory is the size of
the tensors autograd saves for backward (activation memory): distinct storages, parameters and the input
excluded, counted exactly with saved-tensor hooks.

    python -m benchmarks.bench_moe_layer                 # fp32 grid at T=4096 (a few minutes on 1 core)
    python -m benchmarks.bench_moe_layer --bf16_tokens 256   # add bf16 at a small T (slow on CPUs without
                                                         # bf16 matrix instructions)
    python -m benchmarks.bench_moe_layer --quick         # one small point, for a smoke run
    python -m benchmarks.bench_moe_layer --device cuda   # on a GPU: bf16 at T=16384, CUDA-event timing

On CUDA the layers run in bf16 (``--tokens`` defaults to 16384 there) and each forward+backward is timed on the
GPU's own clock with CUDA events (launches are asynchronous); "native" is then the sorted ``grouped_mm`` path (the
per-expert loop where grouped_mm has no kernel, e.g. before Hopper), and the header says which.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import MoELayer, SoftmaxTopK
from lightning_moe.experts.native import _grouped_mm_ok, gelu
from lightning_moe.layers import DenseFFN

# (E, K, F): few wide experts, many narrow ones, and very many narrower ones; K*F (the dense width) is 2048,
# 2048 and 1024.
POINTS = [(8, 2, 1024), (64, 8, 256), (128, 8, 128)]


class MixtralLoopExperts(nn.Module):
    """The Hugging Face Mixtral sparse block's expert loop (mask per expert, index_add_), on our weights."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: Tensor) -> Tensor:
        r = self.layer.router(x_TD.unsqueeze(0))
        mlp = self.layer.experts.mlp
        w1, w2 = mlp.per_expert("w1"), mlp.per_expert("w2")
        v1 = mlp.per_expert("v1") if mlp.v1 is not None else None
        out = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(r.experts_TK, mlp.num_experts).permute(2, 1, 0)
        for e in torch.nonzero(mask_EKT.sum(dim=(-1, -2)) > 0).flatten().tolist():
            slot, tok = torch.where(mask_EKT[e])
            h = x_TD[tok]
            a = F.silu(h @ w1[e].T) * (h @ v1[e].T) if v1 is not None else gelu(h @ w1[e].T)
            y = a @ w2[e]
            out.index_add_(0, tok, (y * r.weights_TK[tok, slot, None]).to(x_TD.dtype))
        return out


def saved_bytes(fn: nn.Module, x: Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward, parameters and the input excluded."""
    skip = {p.untyped_storage().data_ptr() for p in fn.parameters()} | {x.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(storages.values())


def fwd_bwd(fn: nn.Module, x: Tensor, grad: Tensor) -> float:
    """Seconds of one forward+backward: wall clock on CPU, CUDA events on a GPU (launches are asynchronous)."""
    for p in fn.parameters():
        p.grad = None
    x.grad = None
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(x).backward(grad)
    return time.perf_counter() - t0


def run_point(
    T: int, D: int, F_: int, E: int, K: int, activation: str, dtype: torch.dtype, reps: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    router = SoftmaxTopK(load_balancing_weight=0, z_loss_weight=0)
    layer = MoELayer(D, F_, E, K, router=router, activation=activation).to(device, dtype)
    impls = {
        "native": layer,
        "hf_loop": MixtralLoopExperts(layer),
        "dense": DenseFFN(D, K * F_, activation).to(device, dtype),
    }
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(T, D, dtype=dtype, device=device)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():  # warm-up
        fwd_bwd(fn, x, grad)
    for _ in range(reps):
        for name, fn in impls.items():
            times[name].append(fwd_bwd(fn, x, grad))
    return {
        name: {"ms": 1e3 * statistics.median(times[name]), "saved_mib": saved_bytes(fn, x) / 2**20}
        for name, fn in impls.items()
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=512, E=8 only, both activations: a smoke run")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per implementation (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: bf16 points at --tokens (default 16384), timed with CUDA events")
    p.add_argument("--tokens", type=int, default=None, help="T for the fp32 points (bf16 on CUDA); default 4096 "
                   "on CPU, 16384 on CUDA")
    p.add_argument(
        "--bf16_tokens", type=int, default=0,
        help="T for bf16 points (0 = no bf16): CPUs without bf16 matrix instructions (no AVX512-BF16/AMX) run "
        "bf16 GEMMs at a few GFLOP/s, 20-100x slower than fp32, so keep it small there (e.g. 256)",
    )
    p.add_argument("--activations", nargs="+", default=["gelu", "swiglu"], choices=["gelu", "swiglu"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    D = 512
    points = POINTS[:1] if args.quick else POINTS
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"bench_moe_layer: --device cuda but no CUDA GPU is visible to torch {torch.__version__} "
                         f"(CUDA build: {torch.version.cuda is not None}); run on a GPU or drop --device cuda.")
    tokens = args.tokens or (16384 if cuda else 4096)
    # bf16 on a GPU: the dtype MoE layers train in there (and the one grouped_mm has CUDA kernels for).
    runs = [(512 if args.quick else tokens, torch.bfloat16 if cuda else torch.float32)]
    if args.bf16_tokens and not cuda:
        runs.append((args.bf16_tokens, torch.bfloat16))
    if cuda:
        probe = torch.zeros(1, D, device="cuda", dtype=torch.bfloat16)
        path = "grouped_mm" if _grouped_mm_ok(probe, POINTS[0][2]) else "per-expert loop (no grouped_mm kernel)"
        where = (f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), CUDA "
                 f"{torch.version.cuda}, CUDA events; native path: {path}")
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} thread(s)"
    print(f"{where}, torch {torch.__version__}, D={D}, forward+backward, median of {args.reps}")
    header = ("| T | E,K,F | act | dtype | native ms | hf_loop ms | dense ms | native/dense | hf_loop/native | "
              "saved MiB native / loop / dense |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for T, dtype in runs:
        for E, K, F_ in points:
            for act in args.activations:
                r = run_point(T, D, F_, E, K, act, dtype, args.reps, args.device)
                n, lp, d = r["native"], r["hf_loop"], r["dense"]
                print(
                    f"| {T} | {E},{K},{F_} | {act} | {str(dtype).removeprefix('torch.')} | {n['ms']:.0f} | "
                    f"{lp['ms']:.0f} | {d['ms']:.0f} | {n['ms'] / d['ms']:.2f} | {lp['ms'] / n['ms']:.2f} | "
                    f"{n['saved_mib']:.1f} / {lp['saved_mib']:.1f} / {d['saved_mib']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
