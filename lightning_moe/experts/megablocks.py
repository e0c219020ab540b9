"""MegaBlocks' dropless grouped experts (CUDA) behind our ``Experts`` interface.

Legend: T tokens, D model width, F expert width, E experts, K slots per token.

Our router already ran in ``MoELayer``; its :class:`Routing` reaches MegaBlocks through MegaBlocks' own router
seam: ``dMoE.router`` is replaced by :class:`RoutingSeam`, a module that returns the routing it was handed as the
``(scores_TE, weights_TK, experts_TK)`` triple MegaBlocks expects. The expert weights stay ours
(``experts.mlp.w1/w2/v1``, the layout MegaBlocks uses), so checkpoints move between backends unchanged; the dMoE
is a private runtime object, never a submodule, and reads our parameters at every call.

MegaBlocks keeps load-balancing state in process-global lists that its caller must clear. Our router computes
the aux losses itself (identical to the native path), so the dMoE is built with both MegaBlocks loss weights at
0 and the lists are cleared around every call, in training and validation alike: a recomputation under
activation checkpointing finds them empty too.

``megablocks`` is imported only when this backend is built (it cannot be imported without its CUDA extension).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.gating.base import Routing

INSTALL_HINT = (
    "install it on a CUDA machine with a CUDA build of torch: `pip install --no-build-isolation --no-deps "
    "stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0` (see the README section 'MegaBlocks on GPU'), "
    "or use backend='native' (same numbers, any device)"
)


class MegaBlocksUnavailableError(ValueError):
    """``backend='megablocks'`` was asked for where MegaBlocks cannot run; the message says why and what to do."""


def load_megablocks() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """Import ``megablocks.layers.{arguments, dmoe, moe, router}``, or raise one clear error."""
    if not torch.cuda.is_available():
        raise MegaBlocksUnavailableError(
            "backend='megablocks' needs a CUDA GPU and none is visible to torch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); run on a GPU or use "
            "backend='native'."
        )
    try:
        modules = tuple(importlib.import_module(f"megablocks.layers.{m}") for m in ("arguments", "dmoe", "moe", "router"))
    except ImportError as err:  # also the missing compiled extension `megablocks_ops`
        raise MegaBlocksUnavailableError(
            f"backend='megablocks' could not import MegaBlocks ({err}); {INSTALL_HINT}."
        ) from err
    return modules  # type: ignore[return-value]


class RoutingSeam(nn.Module):
    """Stands in for ``dMoE.router``: returns the routing our router already computed, as MegaBlocks' triple."""

    def __init__(self) -> None:
        super().__init__()
        self.routing: Routing | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.routing
        if r is None:
            raise RuntimeError("RoutingSeam called without a routing; MegaBlocksExperts.forward sets it first.")
        # MegaBlocks' kernels index with int32 and scale rows by weights of the activation dtype.
        return r.scores_TE, r.weights_TK.to(x.dtype), r.experts_TK.int()


class MegaBlocksExperts:
    """Runs MegaBlocks' grouped dMoE on weights owned by an ``ExpertWeights`` module.

    A plain object (not an ``nn.Module``) so nothing of MegaBlocks enters our ``state_dict`` or ``parameters()``.
    One dMoE is built per (device, K) on first use, with MegaBlocks' broken defaults overridden: grouped GEMMs
    (``mlp_impl='grouped'``), bf16 (grouped_gemm has no fp16/fp32 kernels), an explicit device, no bias (so its
    forward returns one tensor, never ``(x, bias)``), and both MegaBlocks loss weights 0.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: str) -> None:
        self.arguments, self.dmoe, self.moe, self.router = load_megablocks()
        self.d_model, self.d_ff, self.num_experts, self.activation = d_model, d_ff, num_experts, activation
        self._layers: dict[tuple[torch.device, int], nn.Module] = {}

    def _build(self, device: torch.device, top_k: int) -> nn.Module:
        glu = self.activation == "swiglu"
        args = self.arguments.Arguments(
            hidden_size=self.d_model,
            ffn_hidden_size=self.d_ff,
            moe_num_experts=self.num_experts,
            moe_top_k=top_k,
            mlp_type="glu" if glu else "mlp",
            mlp_impl="grouped",
            # Same activations as the native path: GLU with SiLU, or tanh-approximate GELU.
            activation_fn=F.silu if glu else (lambda x: F.gelu(x, approximate="tanh")),
            bias=False,
            return_bias=False,
            fp16=False,
            bf16=True,
            device=device,
            moe_loss_weight=0.0,
            moe_zloss_weight=0.0,
            moe_jitter_eps=None,
            moe_normalize_expert_weights=None,
        )
        layer = self.dmoe.dMoE(args)
        layer.router = RoutingSeam()  # its own LearnedRouter (and weight) is dropped
        return layer

    @contextmanager
    def _fresh_global_state(self) -> Iterator[None]:
        self.moe.clear_load_balancing_loss()
        self.router.clear_router_zloss()
        try:
            yield
        finally:
            self.moe.clear_load_balancing_loss()
            self.router.clear_router_zloss()

    def __call__(self, x_TD: Tensor, routing: Routing, weights: nn.Module, training: bool) -> Tensor:
        check_runnable(x_TD, weights)
        key = (x_TD.device, routing.experts_TK.shape[1])
        if key not in self._layers:
            self._layers[key] = self._build(*key)
        layer = self._layers[key]
        layer.train(training)
        # Bind our parameters at every call: `.to()`, FSDP or checkpoint loading may have replaced them.
        mlp = layer.experts.mlp
        mlp.w1, mlp.w2 = weights.w1, weights.w2
        if weights.v1 is not None:
            mlp.v1 = weights.v1
        layer.router.routing = routing
        try:
            with self._fresh_global_state():
                out = layer(x_TD)
        finally:
            layer.router.routing = None  # do not keep the step's graph alive
        return out


def check_runnable(x_TD: Tensor, weights: nn.Module) -> None:
    """The inputs MegaBlocks' grouped kernels accept: CUDA tensors, bf16 activations and weights."""
    dtypes = {x_TD.dtype, weights.w1.dtype}
    if dtypes != {torch.bfloat16}:
        raise MegaBlocksUnavailableError(
            f"backend='megablocks' needs bf16 activations and expert weights (grouped_gemm has bf16 kernels "
            f"only), got input {x_TD.dtype} and weights {weights.w1.dtype}; train with precision='bf16-true' "
            "(bf16-mixed keeps fp32 weights) or use backend='native'."
        )
    if x_TD.device.type != "cuda":
        raise MegaBlocksUnavailableError(
            f"backend='megablocks' runs on CUDA only, got input on {x_TD.device}; move the model to a GPU "
            "(Trainer(accelerator='gpu')) or use backend='native'."
        )
