"""The routing contract shared by every gating strategy.

Shape legend (used across routing code):
    T tokens (flattened batch*sequence), E experts, K selected slots per token,
    B batch, S sequence, D model width.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_moe.utils import count_ids


@dataclass
class Routing:
    """What a router decided for one forward pass.

    Attributes:
        experts_TK: int64 expert id of each token's K slots.
        weights_TK: mixing weight of each slot (what multiplies the expert output).
        scores_TE: the router's per-expert scores (probabilities for softmax routers); what balance losses
            and metrics read.
        logits_TE: pre-normalisation logits, when the router has them (z-loss reads these).
        aux_losses: the router's auxiliary losses for this pass, already multiplied by their weights.
        mask_TK: which slots are real assignments (bool), for routers whose number of experts per token varies
            (expert choice pads every token to K = E slots with weight 0); ``None`` means every slot is one.
            Counting code should use :meth:`expert_counts`, which honours it.
    """

    experts_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    mask_TK: Tensor | None = None

    def assigned_N(self) -> Tensor:
        """Expert ids of the real (token, slot) assignments, flattened (padding slots of ``mask_TK`` dropped)."""
        experts_N = self.experts_TK.reshape(-1)
        return experts_N if self.mask_TK is None else experts_N[self.mask_TK.reshape(-1)]

    def expert_counts(self, num_experts: int) -> Tensor:
        """Assignments per expert ``counts_E`` (int64): each real (token, slot) pair counts once. No host sync:
        padding slots go to an extra bin that is dropped (a boolean-mask selection would cost a ``nonzero``)."""
        experts_N = self.experts_TK.reshape(-1)
        if self.mask_TK is None:
            return count_ids(experts_N, num_experts)
        padded_N = experts_N.masked_fill(~self.mask_TK.reshape(-1), num_experts)
        return count_ids(padded_N, num_experts + 1)[:num_experts]


class Router(nn.Module):
    """Base class of gating strategies.

    A router is built with its own hyper-parameters only; the MoE layer that owns it calls :meth:`bind` with the
    layer's dimensions, so a YAML ``class_path`` swap never repeats ``d_model`` or ``num_experts``.

    ``forward`` takes ``x_BSD`` (sequence structure matters for temporal routers) and returns a :class:`Routing`
    over the ``T = B*S`` flattened tokens. ``forward`` never changes router state: stateful routers keep their
    state in buffers (so it is in the ``state_dict``), collect statistics in :meth:`observe` (and
    :meth:`observe_errors`) during training, and change state only in :meth:`update_state`, which runs once per
    optimizer step (see :func:`lightning_moe.layers.update_router_states`).

    Per-step statistics are accumulators made with :meth:`register_pending`: :meth:`update_state` sums them over
    data-parallel ranks, hands them to :meth:`apply_pending` and zeroes them. Because an update only uses what
    was observed since the last one, a second :meth:`update_state` without a new :meth:`observe` changes nothing.

    ``causal`` is set to True by decoder models (before binding) so routers that read across the sequence can
    refuse to run where a token must not see later tokens.
    """

    def __init__(self) -> None:
        super().__init__()
        self.d_model = 0
        self.num_experts = 0
        self.top_k = 0
        self.causal = False
        self._pending: list[str] = []

    @property
    def is_bound(self) -> bool:
        return self.num_experts > 0

    def bind(self, d_model: int, num_experts: int, top_k: int) -> None:
        """Give the router its layer's dimensions and build its parameters."""
        if self.is_bound:
            raise ValueError(
                f"{type(self).__name__} is already bound to a layer (d_model={self.d_model}, "
                f"num_experts={self.num_experts}); give each MoELayer its own router instance."
            )
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.build()

    def build(self) -> None:
        """Create parameters and buffers; ``d_model``, ``num_experts`` and ``top_k`` are set."""

    def forward(self, x_BSD: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # Router state stays fp32 when the module is cast down (Lightning's bf16-true and fp16-true call
        # module.to(dtype)): on a bias of 0.5, bf16's spacing is 3.9e-3, so a sign-rule step of 1e-3 is lost, and
        # EMAs of centroids or error variances stall the same way. Device moves still apply; the buffers keep
        # their exact pre-cast values. Parameters are cast as asked.
        state = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in state.items():
            after = self._buffers[name]
            if after is not None and after.dtype in (torch.bfloat16, torch.float16):
                self._buffers[name] = before.to(after.device)
        return self

    def register_pending(self, name: str, tensor: Tensor) -> None:
        """Register a per-step accumulator: a buffer that follows the module's device but is not checkpointed
        (a checkpoint is taken after the optimizer step, when every accumulator is zero)."""
        self.register_buffer(name, tensor, persistent=False)
        self._pending.append(name)

    def observe(self, x_TD: Tensor, routing: Routing) -> None:
        """Accumulate statistics for the next :meth:`update_state` (training only, under no_grad)."""

    @property
    def wants_token_errors(self) -> bool:
        """Whether :func:`lightning_moe.layers.feed_back_errors` should hand this router per-token errors."""
        return False

    def observe_errors(self, error_T: Tensor, routing: Routing) -> None:
        """Accumulate the per-token error (e.g. cross-entropy) of the training forward that produced ``routing``;
        called only when :attr:`wants_token_errors` is True, under no_grad."""

    @torch.no_grad()
    def update_state(self) -> None:
        """Apply the accumulated statistics once per optimizer step: sum them over ranks, apply, reset."""
        if not self._pending:
            return
        pending = [getattr(self, name) for name in self._pending]
        all_reduce_sum_(*pending)
        self.apply_pending()
        for t in pending:
            t.zero_()

    def apply_pending(self) -> None:
        """Change state from the (already all-reduced) accumulators; they are zeroed afterwards."""

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` of this router, the YAML form: plain data, so checkpoints hold the
        gating strategy without pickling a module (torch.load's ``weights_only`` default refuses those).
        Routers keep each constructor argument as an attribute of the same name."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    @staticmethod
    def from_config(spec: dict) -> Router:
        """Build a router from :meth:`config`'s output (or the same mapping written in YAML)."""
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise TypeError(f"a router config is a mapping with 'class_path' (and 'init_args'), got {spec!r}.")
        module, _, name = spec["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"unknown router class_path {spec['class_path']!r}; use e.g. "
                             "'lightning_moe.gating.SoftmaxTopK'.") from e
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"class_path {spec['class_path']!r} is not a lightning_moe Router.")
        init_args = spec.get("init_args") or {}
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(init_args) - set(params) - {"self"})
        if unknown:
            valid = ", ".join(n for n in params if n != "self")
            raise TypeError(f"unknown init_args {unknown} for router {spec['class_path']!r}; valid: {valid}.")
        return cls(**init_args)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


def check_unit_interval(name: str, value: float, include_zero: bool = False) -> None:
    """Decay factors and probabilities: ``value`` in (0, 1), or [0, 1) with ``include_zero``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not (0 <= value < 1 if include_zero else 0 < value < 1):
        interval = "[0, 1)" if include_zero else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum tensors over data-parallel ranks in place, so replicas take identical state updates."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def sign_rule_update_(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing step ``b_i += rate * sign(mean(c) - c_i)`` (Wang et al. 2024).

    ``mean(c) = K*T/E`` is the balanced load, so this is also the K-Means router's ``sign(K/E - f_i)`` with
    ``f_i = c_i / T``. With no counts at all, every sign is 0 and the bias does not move.
    """
    counts_E = counts_E.float()
    bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E).to(bias_E.dtype))
