"""Native dropless experts: fused per-expert loop on CPU; token sort, grouped GEMM, un-permute elsewhere.

Legend: T tokens, D model width, F expert width, E experts, K slots per token, N = T*K routed copies.

On CPU the experts run fused (:mod:`lightning_moe.experts.fused`): one ``autograd.Function`` that never builds
``[N, D]`` copies, measured near a dense FFN of equal FLOPs. Elsewhere (CUDA) the sorted recipe below runs, with
dispatch (sort + gather), the expert GEMMs (``grouped_mm``) and combine (weight + un-permute) as separate steps;
it is also the reference the fused path is tested against. The sorted recipe is MegaBlocks' grouped dMoE step by
step, so both backends give the same numbers:
flatten the [T, K] expert ids -> stable argsort -> counts per expert -> gather ``x[order // K]`` ->
per-expert ``act(x @ w1[e].T) @ w2[e]`` (GLU: ``act(x @ w1.T) * (x @ v1.T) @ w2``) -> multiply by the slot
weight in fp32 -> un-permute to [T, K, D] -> sum over K.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.experts.fused import expert_activation, fused_experts
from lightning_moe.gating.base import Routing
from lightning_moe.utils import check_choice, check_positive_int, count_ids, syncs_are_free

Activation = Literal["swiglu", "gelu"]
Backend = Literal["native", "megablocks"]
ACTIVATIONS: tuple[str, ...] = ("swiglu", "gelu")
BACKENDS: tuple[str, ...] = ("native", "megablocks")


def gelu(x: Tensor) -> Tensor:
    # tanh approximation: MegaBlocks' default activation, kept so the two backends agree to rounding.
    return F.gelu(x, approximate="tanh")


class ExpertWeights(nn.Module):
    """``w1``, ``w2`` (and ``v1`` for GLU) as ``[E*F, D]``: MegaBlocks' grouped dMoE layout and names."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, glu: bool) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts * d_ff, d_model))
        self.v1 = nn.Parameter(torch.empty(num_experts * d_ff, d_model)) if glu else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is an independent FFN: fan-in D for w1/v1 and F for w2, as a dense FFN of that width.
        nn.init.normal_(self.w1, std=self.d_model**-0.5)
        nn.init.normal_(self.w2, std=self.d_ff**-0.5)
        if self.v1 is not None:
            nn.init.normal_(self.v1, std=self.d_model**-0.5)

    def local(self, name: str) -> Tensor:
        """The rows of weight ``name`` this rank holds, as a plain tensor: all ``[E*F, D]``, or this rank's
        ``[E/P*F, D]`` slice under expert parallelism, where the parameter is a DTensor sharded on dim 0
        (:func:`lightning_moe.parallel.shard_experts`). Differentiable: gradients reach the parameter."""
        w = getattr(self, name)
        return w.to_local() if hasattr(w, "to_local") else w

    def per_expert(self, name: str) -> Tensor:
        """A weight viewed as ``[E, F, D]``, all E experts. Under expert parallelism this gathers the shards (a
        collective: every rank of the group must call it, as monitors do on every rank), for readers of the
        weights such as the geometry and coupling monitors; the experts' own forward uses :meth:`local`."""
        w = getattr(self, name)
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        return w.view(self.num_experts, self.d_ff, self.d_model)

    @property
    def local_experts(self) -> int:
        """Experts whose weights this rank holds: E, or E/P under expert parallelism."""
        return self.local("w1").shape[0] // self.d_ff


def _contiguous_grad(t: Tensor) -> Tensor:
    # grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from a plain ``y.sum().backward()``.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _grouped_mm_ok(x: Tensor, d_ff: int) -> bool:
    """Whether ``grouped_mm`` can take these operands; the per-expert loop handles every other case."""
    if not hasattr(F, "grouped_mm"):  # torch < 2.9
        return False
    # Operand strides must be multiples of 16 bytes: D and F divisible by 4 in fp32, by 8 in bf16.
    align = 16 // x.element_size()
    if x.shape[-1] % align or d_ff % align:
        return False
    if x.device.type == "cuda":
        # CUDA kernels exist for bf16 on Hopper and newer.
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Under autocast (bf16-mixed) the expert GEMMs run in the autocast dtype, like nn.Linear would.
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class Experts(nn.Module):
    """E dropless expert FFNs applied to routed tokens.

    Args:
        d_model: model width D.
        d_ff: width F of each expert.
        num_experts: E.
        activation: ``swiglu`` (GLU with SiLU, adds ``v1``) or ``gelu`` (tanh-approximate GELU MLP).
        backend: ``native`` (on CPU a fused per-expert loop; elsewhere sort + grouped GEMM, with a per-expert loop
            fallback where ``grouped_mm`` has no kernel) or ``megablocks`` (MegaBlocks' grouped
            kernels: CUDA, bf16 weights, MegaBlocks installed; same parameters and numbers as ``native``).
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, activation: Activation = "swiglu", backend: Backend = "native"
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            check_positive_int(name, value)
        self.activation, self.backend = activation, backend
        self.mlp = ExpertWeights(d_model, d_ff, num_experts, glu=activation == "swiglu")
        self._megablocks = None
        if backend == "megablocks":
            # Imported here: building the backend is what imports MegaBlocks (and fails clearly without it).
            from lightning_moe.experts.megablocks import MegaBlocksExperts

            self._megablocks = MegaBlocksExperts(d_model, d_ff, num_experts, activation)

    @property
    def num_experts(self) -> int:
        return self.mlp.num_experts

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        if self._megablocks is not None:
            return self._megablocks(x_TD, routing, self.mlp, self.training)
        if syncs_are_free(x_TD):  # CPU: the fused loop reads per-expert counts on the host, which is free there
            return self._fused_forward(x_TD, routing)
        return self._sorted_forward(x_TD, routing)

    def _local_weight(self, name: str) -> Tensor:
        """This rank's rows of ``w1``/``v1``/``w2`` (:meth:`ExpertWeights.local`), where expert parallelism adds
        its gradient reduction."""
        return self.mlp.local(name)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        """``w1``, ``v1`` (None without GLU), ``w2`` as ``[E_local*F, D]`` in the compute dtype."""
        v1 = self._local_weight("v1").to(dtype) if self.mlp.v1 is not None else None
        return self._local_weight("w1").to(dtype), v1, self._local_weight("w2").to(dtype)

    @torch.compiler.disable(reason="per-expert loop over host-side token counts; runs eagerly on CPU")
    def _fused_forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        dtype = _compute_dtype(x_TD)
        w1, v1, w2 = self._weights(dtype)
        return fused_experts(x_TD.to(dtype), routing.weights_TK, routing.experts_TK, w1, v1, w2, self.mlp.d_ff)

    def _sorted_forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Dispatch (stable sort, gather) -> expert GEMMs -> combine (fp32 weighting, un-permute, sum over K)."""
        x_ND, order_N, counts_E = self._dispatch(x_TD, routing, self.mlp.local_experts)
        if _grouped_mm_ok(x_ND, self.mlp.d_ff):
            y_ND = self._grouped(x_ND, counts_E)
        else:
            y_ND = self._loop(x_ND, counts_E)
        return self._combine(y_ND, order_N, routing)

    def _dispatch(self, x_TD: Tensor, routing: Routing, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` gathered into expert-sorted rows ``x_ND``, the sort ``order_N`` and ``counts_E`` (ids in
        ``[0, num_experts)``)."""
        K = routing.experts_TK.shape[1]
        flat_N = routing.experts_TK.reshape(-1)
        # Stable sort keeps each expert's tokens in token order: the same row order as MegaBlocks, hence the
        # same floating-point summation order inside each expert GEMM.
        order_N = torch.argsort(flat_N, stable=True)
        counts_E = count_ids(flat_N, num_experts)  # no host sync (bincount reads the max back on CUDA)
        return x_TD[order_N // K].to(_compute_dtype(x_TD)), order_N, counts_E

    def _combine(self, y_ND: Tensor, order_N: Tensor, routing: Routing) -> Tensor:
        T, K = routing.experts_TK.shape
        # Weight in fp32 then cast: bf16 products of two small numbers lose the router's gradient signal.
        w_N = routing.weights_TK.reshape(-1)[order_N]
        y_ND = (y_ND.float() * w_N.float().unsqueeze(-1)).to(y_ND.dtype)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        # D spelled out: T is 0 on an expert-parallel rank that receives no row, and -1 cannot be inferred then.
        return y_ND[inverse_N].view(T, K, y_ND.shape[-1]).sum(dim=1)

    def _per_expert(self, dtype: torch.dtype) -> list[Tensor | None]:
        """:meth:`_weights` viewed as ``[E_local, F, D]``."""
        m = self.mlp
        return [w.view(-1, m.d_ff, m.d_model) if w is not None else None for w in self._weights(dtype)]

    def _grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        w1, v1, w2 = self._per_expert(x_ND.dtype)

        def mm(a: Tensor, w_EFD: Tensor, transpose: bool) -> Tensor:
            return _contiguous_grad(F.grouped_mm(a, w_EFD.transpose(-2, -1) if transpose else w_EFD, offs=offs_E))

        v = mm(x_ND, v1, True) if v1 is not None else None
        h_NF = expert_activation(mm(x_ND, w1, True), v)
        return mm(h_NF, w2, False)

    def _loop(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        w1, v1, w2 = self._per_expert(x_ND.dtype)
        outs = []
        # Reads the counts on the host (one sync per layer): only CUDA setups without grouped_mm kernels
        # (fp32, or pre-Hopper GPUs) come here.
        for e, x_nD in enumerate(torch.split(x_ND, counts_E.tolist())):
            if x_nD.shape[0] == 0:
                continue
            h = expert_activation(x_nD @ w1[e].T, x_nD @ v1[e].T if v1 is not None else None)
            outs.append(h @ w2[e])
        return torch.cat(outs) if outs else x_ND.new_zeros(x_ND.shape)

    def extra_repr(self) -> str:
        m = self.mlp
        return f"d_model={m.d_model}, d_ff={m.d_ff}, num_experts={m.num_experts}, activation={self.activation!r}"

