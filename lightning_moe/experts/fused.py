"""Fused dispatch + expert FFN + combine for CPU: one ``autograd.Function``, no ``[N, D]`` copies.

Legend: T tokens, D model width, F expert width, E experts, K slots per token, N = T*K routed copies,
n the rows one expert receives.

Why: on CPU every ``[N, D]`` temporary of the sorted recipe (gathered tokens, expert outputs, weighted outputs,
un-permuted outputs and their gradients) is a large fresh allocation that is page-faulted on every step, and
moving them cost ~45% of the layer at E=64. Here each expert gathers its own ``n`` rows of ``x`` with
``index_select``, runs its FFN, weights its output and adds it into ``y_TD`` with ``index_add_``; only
per-expert temporaries exist. Backward re-gathers ``x`` (and the incoming gradient) per expert instead of
keeping copies, and keeps only what a dense FFN of width K*F keeps: the ``[N, F]`` hidden activations.

Numerics follow the sorted path (:meth:`Experts._sorted_forward`): rows in stable-sorted order per expert, the
GEMMs in the compute dtype, the slot weighting in fp32 and then cast. The sum over the K slots of a token is
accumulated in fp32 in expert order (the sorted path sums in slot order), so the two agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_activation(h1_nF: Tensor, hv_nF: Tensor | None) -> Tensor:
    # tanh GELU (MegaBlocks' default) or SwiGLU; the one definition both native paths use.
    if hv_nF is None:
        return F.gelu(h1_nF, approximate="tanh")
    return F.silu(h1_nF) * hv_nF


def _weighted(t: Tensor, w_n: Tensor) -> Tensor:
    # Weight in fp32 then cast: bf16 products of two small numbers lose the router's gradient signal.
    return (t.float() * w_n.unsqueeze(-1)).to(t.dtype)


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1, v1, w2, experts_TK, num_experts: int, d_ff: int):
        T, D = x_TD.shape
        K = experts_TK.shape[1]
        flat_N = experts_TK.reshape(-1)
        # Stable sort: each expert's rows in token order, the row order (and GEMM summation order) of the
        # sorted path and of MegaBlocks.
        order_N = torch.argsort(flat_N, stable=True)
        tok_N = order_N // K
        w_N = weights_TK.reshape(-1)[order_N].float()
        # One host read of E counts per layer: free on CPU, the only place this path is chosen.
        counts = torch.bincount(flat_N, minlength=num_experts).tolist()
        # fp32 accumulator: a token's K slot outputs are summed in fp32 and rounded once, as ``sum`` does.
        y_TD = torch.zeros(T, D, dtype=torch.float32)
        hidden = []  # per expert: (h1_nF, hv_nF or None, a_nF)
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            start += n
            if n == 0:
                hidden.append(None)
                continue
            idx_n = tok_N[rows]
            x_nD = x_TD.index_select(0, idx_n)
            f = slice(e * d_ff, (e + 1) * d_ff)
            h1_nF = x_nD @ w1[f].T
            hv_nF = x_nD @ v1[f].T if v1 is not None else None
            a_nF = expert_activation(h1_nF, hv_nF)
            y_nD = _weighted(a_nF @ w2[f], w_N[rows])
            y_TD.index_add_(0, idx_n, y_nD.float())
            hidden.append((h1_nF, hv_nF, a_nF))
        ctx.counts, ctx.num_experts, ctx.d_ff, ctx.K = counts, num_experts, d_ff, K
        ctx.has_v1 = v1 is not None
        ctx.weights_dtype = weights_TK.dtype
        ctx.empty = [h is None for h in hidden]
        flat_hidden = [t for h in hidden if h is not None for t in h if t is not None]
        tensors = [x_TD, w1, w2, order_N, w_N, *flat_hidden]
        if v1 is not None:
            tensors.insert(2, v1)
        ctx.save_for_backward(*tensors)
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, g_TD):
        saved = list(ctx.saved_tensors)
        x_TD, w1 = saved[0], saved[1]
        v1 = saved[2] if ctx.has_v1 else None
        w2, order_N, w_N = saved[2 + ctx.has_v1 : 5 + ctx.has_v1]
        flat_hidden = saved[5 + ctx.has_v1 :]
        per = 3 if ctx.has_v1 else 2
        d_ff, K = ctx.d_ff, ctx.K
        g_TD = g_TD.contiguous()
        tok_N = order_N // K
        gx_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gv1 = torch.empty_like(v1) if v1 is not None else None
        gw_N = torch.zeros(order_N.shape, dtype=torch.float32)
        start, i = 0, 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            start += n
            f = slice(e * d_ff, (e + 1) * d_ff)
            if n == 0:
                # An expert with no token gets a zero gradient, as from the sorted path.
                for g in (gw1, gw2, gv1):
                    if g is not None:
                        g[f].zero_()
                continue
            if ctx.has_v1:
                h1_nF, hv_nF, a_nF = flat_hidden[i : i + per]
            else:
                (h1_nF, a_nF), hv_nF = flat_hidden[i : i + per], None
            i += per
            idx_n = tok_N[rows]
            w_n = w_N[rows]
            g_nD = g_TD.index_select(0, idx_n)
            # dL/dy_expert = w * g, weighted in fp32 then cast, as the sorted path's autograd does.
            gy_nD = _weighted(g_nD, w_n)
            torch.mm(a_nF.T, gy_nD, out=gw2[f])
            u_nF = g_nD @ w2[f].T  # unweighted dL/da: its dot with a is the slot weight's gradient
            gw_N[rows] = (u_nF.float() * a_nF.float()).sum(-1)
            ga_nF = _weighted(u_nF, w_n)
            if hv_nF is None:
                gh1_nF = torch.ops.aten.gelu_backward(ga_nF, h1_nF, approximate="tanh")
            else:
                s_nF = F.silu(h1_nF)
                ghv_nF = ga_nF * s_nF
                gh1_nF = torch.ops.aten.silu_backward(ga_nF * hv_nF, h1_nF)
            x_nD = x_TD.index_select(0, idx_n)  # re-gathered: cheaper than keeping an [N, D] copy
            torch.mm(gh1_nF.T, x_nD, out=gw1[f])
            gx_nD = gh1_nF @ w1[f]
            if hv_nF is not None:
                torch.mm(ghv_nF.T, x_nD, out=gv1[f])
                gx_nD = gx_nD + ghv_nF @ v1[f]
            gx_TD.index_add_(0, idx_n, gx_nD.float())
        gw_flat = torch.empty_like(gw_N)
        gw_flat[order_N] = gw_N
        gweights_TK = gw_flat.view(-1, K).to(ctx.weights_dtype)
        return gx_TD.to(x_TD.dtype), gweights_TK, gw1, gv1, gw2, None, None, None


def fused_experts(
    x_TD: Tensor, weights_TK: Tensor, experts_TK: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor, d_ff: int
) -> Tensor:
    """``y_t = sum_k w_tk * FFN_{e_tk}(x_t)`` with ``w1``/``v1``/``w2`` as ``[E*F, D]`` in ``x_TD``'s dtype.

    GELU (tanh) experts when ``v1`` is None, SwiGLU otherwise. CPU tensors only.
    """
    return _FusedExperts.apply(x_TD, weights_TK, w1, v1, w2, experts_TK, w1.shape[0] // d_ff, d_ff)
