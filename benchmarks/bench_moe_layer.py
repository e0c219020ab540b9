"""Forward+backward of one MoE layer: native grouped vs a Mixtral-style per-expert loop vs a dense FFN.

The dense FFN has width K*F, so it does exactly the active FLOPs of the MoE layer with no routing: the
practical limit. All three are timed interleaved in one process (A B C A B C ...) so machine noise hits them
alike; ratios are what to read. Memory is the size of the tensors autograd saves for backward (activation
memory): distinct storages, parameters excluded, counted exactly with saved-tensor hooks.

    python benchmarks/bench_moe_layer.py               # the full grid (several minutes on 2 CPU cores)
    python benchmarks/bench_moe_layer.py --quick       # T=2048, (E,K)=(8,2) only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import MoELayer, SoftmaxTopK
from lightning_moe.layers import DenseFFN


class MixtralLoopExperts(nn.Module):
    """The Hugging Face Mixtral sparse block's expert loop (mask per expert, index_add_), on our weights."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: Tensor) -> Tensor:
        r = self.layer.router(x_TD.unsqueeze(0))
        mlp = self.layer.experts.mlp
        w1, w2, v1 = mlp.per_expert("w1"), mlp.per_expert("w2"), mlp.per_expert("v1")
        out = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(r.experts_TK, mlp.num_experts).permute(2, 1, 0)
        for e in torch.nonzero(mask_EKT.sum(dim=(-1, -2)) > 0).flatten().tolist():
            slot, tok = torch.where(mask_EKT[e])
            h = x_TD[tok]
            y = (F.silu(h @ w1[e].T) * (h @ v1[e].T)) @ w2[e]
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


def fwd_bwd(fn, x: Tensor, grad: Tensor) -> float:
    t0 = time.perf_counter()
    fn(x).backward(grad)
    return time.perf_counter() - t0


def run_point(T: int, D: int, F_: int, E: int, K: int, dtype: torch.dtype, reps: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    layer = MoELayer(D, F_, E, K, router=SoftmaxTopK(load_balancing_weight=0, z_loss_weight=0)).to(dtype)
    impls = {
        "native": layer,
        "hf_loop": MixtralLoopExperts(layer),
        "dense": DenseFFN(D, K * F_).to(dtype),
    }
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, D, dtype=dtype)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small point (T=2048, E=8, K=2) in both dtypes")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per implementation (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--bf16_max_tokens", type=int, default=2048,
        help="skip bf16 points above this T: CPUs without native bf16 matmul (no AVX512-BF16/AMX) run bf16 GEMMs "
        "20-100x slower than fp32, so T=8192 bf16 takes hours there; raise it on a CPU that has them",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    D, F_ = 512, 1024
    Ts = [2048] if args.quick else [2048, 8192]
    EKs = [(8, 2)] if args.quick else [(8, 2), (64, 8)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), D={D}, F={F_}, forward+backward, "
          f"median of {args.reps}")
    header = ("| T | E,K | dtype | native ms | hf_loop ms | dense ms | native/dense | hf_loop/native | "
              "saved MiB native / loop / dense |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for T in Ts:
        for E, K in EKs:
            for dtype in (torch.float32, torch.bfloat16):
                if dtype == torch.bfloat16 and T > args.bf16_max_tokens:
                    print(f"| {T} | {E},{K} | bfloat16 | skipped: T > --bf16_max_tokens={args.bf16_max_tokens} |")
                    continue
                r = run_point(T, D, F_, E, K, dtype, args.reps)
                n, lp, d = r["native"], r["hf_loop"], r["dense"]
                print(
                    f"| {T} | {E},{K} | {str(dtype).removeprefix('torch.')} | {n['ms']:.0f} | {lp['ms']:.0f} | "
                    f"{d['ms']:.0f} | {n['ms'] / d['ms']:.2f} | {lp['ms'] / n['ms']:.2f} | "
                    f"{n['saved_mib']:.0f} / {lp['saved_mib']:.0f} / {d['saved_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
