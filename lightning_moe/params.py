"""Parameter, FLOP and memory calculator for decoder-only MoE models, and its inverse (sparsity spec §3.2).

Counts follow :class:`lightning_moe.models.MoETransformer` exactly (no biases, RMSNorm weights, bias-free linear
router), generalised to grouped-query attention, QK-norm, shared experts and leading dense layers so published
models (OLMoE-1B-7B: 6.9B total / 1.3B active) can be checked too.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, dataclass, replace

from lightning_moe.utils import check_non_negative, check_positive_int


@dataclass(frozen=True)
class MoEShape:
    """The five quantities that pin down an MoE architecture (layers, width, expert width, experts, top-k) plus
    the rest of the model.

    Args:
        d_model: width d.
        n_layers: blocks L.
        num_experts: routed experts E per MoE layer.
        top_k: experts per token k.
        d_expert: width of each expert d_e.
        vocab_size: vocabulary V.
        n_heads: attention heads.
        n_kv_heads: key/value heads (grouped-query attention); None = n_heads.
        n_shared: always-on shared experts of width d_expert.
        glu: SwiGLU experts (3 matrices) rather than a 2-matrix MLP.
        tied_embeddings: output head shares the input embedding.
        qk_norm: RMSNorm on queries and keys over the full width (OLMoE).
        n_dense_layers: leading dense blocks of width ``d_ff_dense``.
        d_ff_dense: width of the dense blocks' FFN.
        seq_len: context length, for the attention-score FLOPs.
    """

    d_model: int
    n_layers: int
    num_experts: int
    top_k: int
    d_expert: int
    vocab_size: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_shared: int = 0
    glu: bool = True
    tied_embeddings: bool = True
    qk_norm: bool = False
    n_dense_layers: int = 0
    d_ff_dense: int = 0
    seq_len: int = 128

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "num_experts", "top_k", "d_expert", "vocab_size", "n_heads", "seq_len"):
            check_positive_int(name, getattr(self, name))
        for name in ("n_shared", "n_dense_layers", "d_ff_dense"):
            check_non_negative(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}.")
        if self.n_kv_heads is not None:
            check_positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                # Grouped-query attention shares each key/value head among n_heads / n_kv_heads query heads.
                raise ValueError(
                    f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; choose a divisor of "
                    "n_heads, or None for n_heads."
                )


def count(shape: MoEShape, bytes_per_param: int = 4) -> dict[str, float]:
    """Total and active parameters, sparsity, FLOPs per token and memory of a model shape."""
    m = shape
    d, hd = m.d_model, m.d_model // m.n_heads
    n_kv = m.n_kv_heads or m.n_heads
    attn = d * m.n_heads * hd + 2 * d * n_kv * hd + m.n_heads * hd * d
    norms = 2 * d + (2 * d if m.qk_norm else 0)
    mats = 3 if m.glu else 2
    per_expert = mats * d * m.d_expert
    router = d * m.num_experts
    moe_total = attn + norms + router + (m.num_experts + m.n_shared) * per_expert
    moe_active = attn + norms + router + (m.top_k + m.n_shared) * per_expert
    dense = attn + norms + mats * d * m.d_ff_dense
    n_moe = m.n_layers - m.n_dense_layers
    total_nonemb = m.n_dense_layers * dense + n_moe * moe_total + d  # + final norm
    active_nonemb = m.n_dense_layers * dense + n_moe * moe_active + d
    emb = m.vocab_size * d * (1 if m.tied_embeddings else 2)
    # Kaplan-style training FLOPs per token: 2 per active weight forward (x3 with backward), the output head,
    # and the attention scores (2*L*ctx*d forward).
    flops = 3 * (2 * active_nonemb + 2 * m.vocab_size * d + 2 * m.n_layers * m.seq_len * d)
    total = total_nonemb + emb
    return {
        "total": total,
        "active": active_nonemb + emb,
        "total_nonemb": total_nonemb,
        "active_nonemb": active_nonemb,
        "embedding": emb,
        "attention_per_layer": attn,
        "sparsity": m.num_experts / m.top_k,
        "activation_ratio": m.top_k / m.num_experts,
        "train_flops_per_token": flops,
        "weights_bytes": total * bytes_per_param,
        # AdamW keeps two fp32 moments per parameter, plus the gradient.
        "train_state_bytes": total * (bytes_per_param * 2 + 8),
    }


def solve(
    total: float,
    num_experts: int,
    top_k: int,
    active: float | None = None,
    n_layers: tuple[int, ...] = (2, 3, 4, 5, 6),
    d_grid: tuple[int, ...] = tuple(range(32, 1025, 8)),
    expert_ratio: float | None = None,
    nonembedding: bool = True,
    top: int = 5,
    **fixed,
) -> list[tuple[float, MoEShape, dict[str, float]]]:
    """Core dimensions (d, L, d_e) that meet a total (and optionally an active) parameter budget.

    With ``expert_ratio`` the expert width is tied to the width (d_e = ratio * d); otherwise d_e is solved from
    the total budget for each (L, d). Returns the ``top`` best (relative error, shape, counts), smallest error first;
    the error is the largest relative miss over the given budgets. ``fixed`` holds other :class:`MoEShape` fields
    (``vocab_size``, ``n_heads``...). d must be divisible by ``n_heads`` (default 4 -> d a multiple of 8 keeps
    rotary head widths even).
    """
    check_positive_int("num_experts", num_experts)
    check_positive_int("top_k", top_k)
    if total <= 0 or (active is not None and not 0 < active <= total):
        raise ValueError(f"need 0 < active <= total, got total={total}, active={active}.")
    key_t, key_a = ("total_nonemb", "active_nonemb") if nonembedding else ("total", "active")
    n_heads = fixed.get("n_heads", 4)
    found = []
    for L, d in itertools.product(n_layers, d_grid):
        if d % n_heads or (d // n_heads) % 2:
            continue
        probe = MoEShape(d, L, num_experts, top_k, 1, **fixed)
        if expert_ratio is not None:
            d_e = max(1, round(expert_ratio * d))
        else:
            # Counts are affine in d_e: solve the total budget for it, then round.
            c1 = count(probe)[key_t]
            per_unit = count(replace(probe, d_expert=2))[key_t] - c1
            d_e = round((total - c1) / per_unit) + 1
            if d_e < 1:
                continue
        shape = replace(probe, d_expert=d_e)
        c = count(shape)
        err = abs(c[key_t] - total) / total
        if active is not None:
            err = max(err, abs(c[key_a] - active) / active)
        found.append((err, shape, c))
    if not found:
        raise ValueError("no (n_layers, d_model) on the grid fits; widen n_layers or d_grid.")
    found.sort(key=lambda r: r[0])
    return found[:top]


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str] | None = None) -> None:
    """``lightning-moe params``: count a model, or ``--solve`` for core dimensions meeting a budget."""
    p = argparse.ArgumentParser(prog="lightning-moe params", description=main.__doc__)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--d_expert", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=None)
    p.add_argument("--n_shared", type=int, default=0)
    p.add_argument("--gelu", action="store_true", help="2-matrix GELU experts instead of SwiGLU")
    p.add_argument("--untied", action="store_true", help="separate output head")
    p.add_argument("--qk_norm", action="store_true")
    p.add_argument("--n_dense_layers", type=int, default=0)
    p.add_argument("--d_ff_dense", type=int, default=0)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--bytes_per_param", type=int, default=4)
    p.add_argument("--solve", action="store_true", help="solve for (d_model, n_layers, d_expert) from budgets")
    p.add_argument("--total", type=float, help="total-parameter budget (non-embedding unless --with_embedding)")
    p.add_argument("--active", type=float, help="active-parameter budget")
    p.add_argument("--expert_ratio", type=float, help="tie d_expert = ratio * d_model")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="n_layers to search")
    p.add_argument("--with_embedding", action="store_true", help="budgets include embeddings")
    a = p.parse_args(argv)
    common = dict(vocab_size=a.vocab_size, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, n_shared=a.n_shared,
                  glu=not a.gelu, tied_embeddings=not a.untied, qk_norm=a.qk_norm, seq_len=a.seq_len)
    if a.solve:
        if a.total is None:
            p.error("--solve needs --total (and optionally --active).")
        rows = solve(a.total, a.num_experts, a.top_k, a.active, tuple(a.layers), expert_ratio=a.expert_ratio,
                     nonembedding=not a.with_embedding, **common)
        print("| error | n_layers | d_model | d_expert | N_total | N_active | N_total non-emb | N_active non-emb |")
        print("|---|---|---|---|---|---|---|---|")
        for err, s, c in rows:
            print(f"| {100 * err:.1f}% | {s.n_layers} | {s.d_model} | {s.d_expert} | {_fmt(c['total'])} | "
                  f"{_fmt(c['active'])} | {_fmt(c['total_nonemb'])} | {_fmt(c['active_nonemb'])} |")
        return
    shape = MoEShape(a.d_model, a.n_layers, a.num_experts, a.top_k, a.d_expert, n_dense_layers=a.n_dense_layers,
                     d_ff_dense=a.d_ff_dense, **common)
    c = count(shape, a.bytes_per_param)
    width = max(map(len, c))
    for k, v in asdict(shape).items():
        print(f"{k:<{width}}  {v}")
    for k, v in c.items():
        shown = f"{v:.3g}" if k in ("sparsity", "activation_ratio") else _fmt(v)
        print(f"{k:<{width}}  {shown}" + (f"  ({v / 2**30:.2f} GiB)" if k.endswith("bytes") else ""))


__all__ = ["MoEShape", "count", "main", "solve"]
