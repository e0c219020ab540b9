"""``MoELayer`` = a swappable router + dropless experts (+ an optional shared expert).

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K selected slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.experts.native import Activation, Backend, Experts, gelu
from lightning_moe.gating.base import Router, Routing
from lightning_moe.gating.softmax_topk import SoftmaxTopK
from lightning_moe.utils import DeferredChecks, check_non_negative, check_now, check_positive_int


class NonFiniteRoutingError(ValueError):
    """Router scores contain NaN or inf; the message names the layer (and the step, when raised in training)."""


class DenseFFN(nn.Module):
    """A dense FFN with the same activation conventions as the experts (used for the shared expert and dense
    layers)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "swiglu") -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.v1 = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        h = F.silu(h) * self.v1(x) if self.v1 is not None else gelu(h)
        return self.w2(h)


class MoELayer(nn.Module):
    """A dropless Mixture-of-Experts FFN.

    Takes ``x`` of shape ``[..., d_model]`` and returns the same shape. A 3-D (or higher) input is read as
    ``[batch..., sequence, d_model]``; a 2-D input as one sequence of tokens (only temporal routers care).

    After each forward, ``routing`` holds the last :class:`Routing` and ``aux_losses`` the router's weighted
    auxiliary losses for that pass; add ``layer.aux_loss`` to your training loss.

    Args:
        d_model: model width D.
        d_ff: width F of each expert.
        num_experts: number of routed experts E.
        top_k: experts per token K (<= E).
        router: gating strategy; default :class:`SoftmaxTopK` with Switch load balancing and z-loss. The layer
            binds it to its dimensions, so pass a fresh instance per layer.
        activation: ``swiglu`` or ``gelu``.
        backend: ``native`` (any device) or ``megablocks`` (CUDA with MegaBlocks installed).
        shared_d_ff: width of an always-on shared expert; 0 = none.
        check_finite: raise :class:`NonFiniteRoutingError` (naming the layer) on NaN/inf router scores or
            weights, and a ValueError on expert ids out of range. ``None`` (default) checks at once where it is
            free, on CPU; on a GPU a check at once reads a value back to the host and stalls the stream every
            layer, so there the result stays on the device as a flag and is read once per optimizer step by
            :func:`raise_deferred_checks` (``MoELanguageModel`` calls it; the error names the layer and the step).
            ``True``: check at once everywhere (a debug switch that pays the sync); ``False``: never. Skipped while
            ``torch.compile`` traces, where it would split the graph.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        router: Router | None = None,
        activation: Activation = "swiglu",
        backend: Backend = "native",
        shared_d_ff: int = 0,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("top_k", top_k)):
            check_positive_int(name, value)
        check_non_negative("shared_d_ff", shared_d_ff)
        if check_finite is not None and not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True, False or None, got {check_finite!r}.")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; choose top_k <= num_experts.")
        if router is not None and not isinstance(router, Router):
            raise TypeError(f"router must be a lightning_moe Router, got {type(router).__name__}.")
        self.d_model = d_model
        self.router = router if router is not None else SoftmaxTopK()
        self.router.bind(d_model, num_experts, top_k)
        self.experts = Experts(d_model, d_ff, num_experts, activation, backend)
        self.shared_expert = DenseFFN(d_model, shared_d_ff, activation) if shared_d_ff > 0 else None
        self.check_finite = check_finite
        self.deferred_checks = DeferredChecks()  # GPU flags of check_finite=None, read at the optimizer step
        self.name = "MoELayer"  # set to the module path by models, so errors say which layer failed
        self.routing: Routing | None = None
        self.aux_losses: dict[str, Tensor] = {}

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses of the last forward (0 when there are none)."""
        if not self.aux_losses:
            return torch.zeros((), dtype=torch.float32, device=self.experts.mlp.w1.device)
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: input must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: input dtype must be floating point, got {x.dtype}; embed token ids first.")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{self.name}: last dimension of the input must be d_model={self.d_model}, got shape "
                f"{tuple(x.shape)}; project the input to d_model first."
            )
        if x.numel() == 0:
            raise ValueError(f"{self.name}: empty input of shape {tuple(x.shape)}; pass at least one token.")
        weight = self.experts.mlp.w1
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.name}: input dtype {x.dtype} differs from the layer's {weight.dtype} parameters; cast one to "
                "the other (x.to(layer dtype) or layer.to(x.dtype)), or train under autocast (precision='bf16-mixed')."
            )
        x_BSD = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.reshape(1, -1, self.d_model)
        x_TD = x_BSD.reshape(-1, self.d_model)
        routing = self.router(x_BSD)
        self._check_routing(routing, x_TD.shape[0])
        if self.training:
            with torch.no_grad():
                self.router.observe(x_TD.detach(), routing)
        self.routing, self.aux_losses = routing, routing.aux_losses
        y_TD = self.experts(x_TD, routing)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD.view(x.shape)


    def _check_routing(self, routing: Routing, T: int) -> None:
        """The router contract: shapes and dtypes always (free); finite scores and weights and expert ids in
        range where ``check_finite`` allows a host sync (CPU by default), one sync for all of them."""
        router, E = type(self.router).__name__, self.experts.num_experts
        experts_TK, weights_TK, scores_TE = routing.experts_TK, routing.weights_TK, routing.scores_TE
        if (experts_TK.dim() != 2 or experts_TK.shape[0] != T or weights_TK.shape != experts_TK.shape
                or scores_TE.shape != (T, E)):
            raise ValueError(
                f"{self.name}: router {router} returned experts_TK {tuple(experts_TK.shape)}, weights_TK "
                f"{tuple(weights_TK.shape)}, scores_TE {tuple(scores_TE.shape)} for {T} tokens and {E} experts; a "
                f"router must return [T, K] ids and weights and [T, E] scores."
            )
        if experts_TK.dtype != torch.int64:
            raise TypeError(f"{self.name}: router {router} returned expert ids of dtype {experts_TK.dtype}; "
                            "return int64 ids (e.g. from torch.topk).")
        if torch.compiler.is_compiling() or self.check_finite is False:
            return
        finite = torch.isfinite(scores_TE).all() & torch.isfinite(weights_TK).all()
        in_range = ((experts_TK.min() >= 0) & (experts_TK.max() < E) if experts_TK.numel()
                    else experts_TK.new_ones((), dtype=torch.bool))
        not_finite = (f"{self.name}: non-finite router scores or weights from {router} (NaN/inf in the layer input or "
                      "router weights); lower the learning rate, add gradient clipping, or check the data.")
        out_of_range = f"{self.name}: router {router} returned expert ids outside [0, {E}){{}}; ids must index this " \
                       f"layer's {E} experts."
        if not self._should_check_finite(scores_TE):
            # No sync: flags for raise_deferred_checks at the optimizer step (the messages name this layer).
            self.deferred_checks.add(NonFiniteRoutingError, not_finite, ~finite)
            self.deferred_checks.add(ValueError, out_of_range.format(""), ~in_range)
            return
        if bool(finite & in_range):
            return
        if not bool(in_range):
            raise ValueError(out_of_range.format(f" (min {int(experts_TK.min())}, max {int(experts_TK.max())})"))
        raise NonFiniteRoutingError(not_finite)

    def _should_check_finite(self, scores_TE: Tensor) -> bool:
        """Whether the routing checks read their result on the host now (else they are deferred or off)."""
        return check_now(self.check_finite, scores_TE)


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def raise_deferred_checks(module: nn.Module, step: int | None = None) -> None:
    """Read every deferred check's flag in ``module`` (each MoE layer's routing checks, the model's token check) with
    one host sync, clear them, and raise the first failure, naming the layer and ``step``.

    On a GPU the default checks (``check_finite=None``) keep their results on the device instead of stalling the
    stream in every layer; ``MoELanguageModel`` calls this before each optimizer step, so a bad batch still stops
    training before it updates the weights. In a plain PyTorch loop, call it once per step before
    ``optimizer.step()``. On CPU the checks run at once and there is nothing to read.
    """
    holders = [m.deferred_checks for m in module.modules() if isinstance(getattr(m, "deferred_checks", None),
                                                                           DeferredChecks)]
    pending = [p for h in holders for p in h.pending()]
    for h in holders:
        h.clear()
    if not pending:
        return
    device = pending[0][2].device
    failed = torch.stack([flag.to(device) for *_, flag in pending]).tolist()  # the one sync
    for (error, message, _), bad in zip(pending, failed):
        if bad:
            when = f"global step {step}, " if step is not None else ""
            raise error(f"{when}{message} (a check deferred to the optimizer step: it covers every batch since the "
                        "last step; set check_finite=True or check_inputs=True to stop at the batch itself)")


def update_router_states(module: nn.Module) -> None:
    """Apply every stateful router's accumulated statistics: call once per optimizer step."""
    for m in module.modules():
        if isinstance(m, Router):
            m.update_state()


def feed_back_errors(module: nn.Module, error_BS: Tensor) -> None:
    """Hand the per-token error of the last training forward to every router that learns from it.

    Call once per training forward, after the loss is known, with the unreduced per-token loss shaped like the
    tokens (e.g. ``F.cross_entropy(..., reduction="none")`` viewed as ``[B, S]``). Routers declare their interest
    with ``wants_token_errors`` (precision gating does); the others are skipped, so this is free without them.
    """
    layers = [layer for layer in moe_layers(module) if layer.router.wants_token_errors]
    error_T = error_BS.detach().reshape(-1)
    with torch.no_grad():
        for layer in layers:
            if layer.routing is None:
                raise ValueError(f"{layer.name}: feed_back_errors was called before any forward; run the model first.")
            T = layer.routing.experts_TK.shape[0]
            if error_T.numel() != T:
                raise ValueError(
                    f"{layer.name}: got {error_T.numel()} per-token errors for {T} routed tokens; pass the "
                    "unreduced loss of the last forward, one value per token (reduction='none')."
                )
            layer.router.observe_errors(error_T, layer.routing)

