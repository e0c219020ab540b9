"""Routing at domain transitions (arXiv 2605.00604; transitions spec §1, §7.5): beta memory, precision
gating and anticipation, composed on the softmax top-k affinity gate by one class.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K selected slots.

The gate, with each part present only when its flag is on (``h = x`` without beta, ``Pi = 1`` without
precision)::

    h_t     = beta * h_{t-1} + x_t                   beta   (per model dimension, beta = sigmoid(learned))
    xhat_t  = f([x_t, h_t])  (f(x_t) without beta)   anticipation, trained by 0.5 * MSE(xhat_t, x_{t+1})
    logits  = (W h_t + W_pred xhat_t) * Pi           additive form (default); direct form: W xhat_t
    Pi_i    = 1 / (var_i + eps)                      precision, var = EMA of expert i's prediction error
    routing = softmax top-k of logits                (SoftmaxTopK: renormalisation, jitter, LB and z-losses)

so the spec's 2^3 ablation is the eight values of ``(beta, precision, anticipation)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.gating.base import Routing, check_unit_interval
from lightning_moe.gating.softmax_topk import SoftmaxTopK
from lightning_moe.gating.temporal import capped_integrate, leaky_integrate
from lightning_moe.utils import check_choice, check_non_negative, check_positive, check_positive_int, count_ids

MemoryForm = Literal["leaky", "ema", "capped_logit"]
PrecisionForm = Literal["scale", "log_shift"]
AnticipationForm = Literal["additive", "direct"]
Activation = Literal["gelu", "relu"]


@dataclass
class MemoryRouting(Routing):
    """A :class:`Routing` that also carries each sequence's last memory state ``memory_BD`` (detached), which
    :meth:`TransitionRouter.observe` keeps for the next window when ``carry_state`` is on."""

    memory_BD: Tensor | None = None


def _with_memory(routing: Routing, memory_BD: Tensor | None) -> MemoryRouting:
    return MemoryRouting(**{f.name: getattr(routing, f.name) for f in fields(routing)}, memory_BD=memory_BD)


class TransitionRouter(SoftmaxTopK):
    """Softmax top-k gate with any subset of beta memory, precision weighting and anticipation.

    **beta** routes on ``h_t = beta * h_{t-1} + x_t`` instead of ``x_t`` (the reference's un-normalised leaky
    integrator, or ``h_t = beta * h_{t-1} + (1 - beta) * x_t`` with ``memory_form='ema'``). ``beta =
    sigmoid(logit_beta)`` is learned per model dimension through the whole sequence
    (:func:`lightning_moe.gating.temporal.leaky_integrate`: the recurrence with a hand-written adjoint). Each sequence starts from zero memory,
    as in the reference, unless ``carry_state``: then each *training* window starts from the previous training
    window's last state (buffer ``memory_BD``, detached, advanced by :meth:`observe` after the forward), which
    suits consecutive windows of one stream per batch row. Evaluation always starts from zero, so validation
    never disturbs the training stream; call :meth:`reset_memory` at stream boundaries.
    ``memory_form='capped_logit'`` is the paper's early per-expert variant (§4.1, Table 1): the membrane lives in
    logit space, ``U_t = min(beta_E * U_{t-1} + W x_t, memory_cap)`` with one ``beta`` per expert, and the gate
    routes on ``U_t`` (no anticipation or carried state with it).

    **precision** multiplies the logits by ``Pi_i = 1 / (var_i + eps)`` (``precision_form='log_shift'`` adds the
    centred ``log Pi`` instead, which keeps "more precise = more likely" for negative logits). ``var_E`` (buffer
    ``precision_var_E``) is an EMA of expert ``i``'s prediction error, updated once per optimizer step:
    ``var_i <- a * var_i + (1 - a) * err_i``, ``err_i = sum_t w_ti e_t / sum_t w_ti`` over the step's tokens with
    routed weight ``w_ti`` and per-token error ``e_t`` (experts that routed nothing keep ``var_i``). The error
    reaches the router through :func:`lightning_moe.layers.feed_back_errors`, which
    :class:`lightning_moe.modules.MoELanguageModel` calls with the per-token cross-entropy; call it yourself in
    your own ``training_step``. Pi is frozen outside training.

    **anticipation** predicts the next router input ``xhat_t = f([x_t, h_t])`` (``f(x_t)`` without beta; f is
    ``Linear -> GELU -> Linear`` of width ``predictor_mult * D``), adds ``W_pred xhat_t`` to the logits
    (``anticipation_form='direct'`` routes on ``W xhat_t`` alone, the toy ablation's form) and returns
    ``anticipation_weight * MSE(xhat_t, x_{t+1}.detach())`` over the positions that have a next token as aux
    loss ``anticipation``.

    Args:
        beta: route on the leaky-integrated memory ``h`` instead of ``x``.
        precision: scale the logits by the per-expert precision ``Pi``.
        anticipation: add the next-input predictor's logits and its MSE loss.
        init_beta: starting ``beta`` in every dimension (0.9 in the reference).
        memory_form: ``leaky`` (reference, ``|h|`` grows to ``|x| / (1 - beta)``), ``ema`` or ``capped_logit``.
        memory_cap: the cap ``theta`` of the ``capped_logit`` membrane (1.0 in the reference).
        learn_beta: learn ``beta`` by backpropagation; False keeps it at ``init_beta``.
        carry_state: carry the memory across consecutive training windows (see above).
        chunk_size: chunk length C of the accelerator scan (cost grows with ``C``, launches with ``S / C``);
            the CPU runs the recurrence step by step.
        precision_decay: EMA factor ``a`` of the error variance (0.95 in the reference).
        precision_eps: ``eps`` in ``1 / (var + eps)`` (1e-4 in the reference).
        precision_init_var: starting variance; 1.0 (Pi ~ 1) starts as the plain gate (the toy ablation used 0.5).
        precision_form: ``scale`` (multiply the logits, the paper's form) or ``log_shift``.
        anticipation_weight: ``lambda`` of the predictor's MSE loss (0.5 in the reference).
        anticipation_form: ``additive`` (the language-model experiment) or ``direct``.
        predictor_mult: predictor hidden width as a multiple of D (4 in the reference).
        predictor_activation: ``gelu`` (the language-model experiment) or ``relu`` (the toy ablation).
        gate_bias: give the gate ``W`` a bias ``b`` (the reference's ``nn.Linear(D, E)``; off for top-k MoE).
        normalize_weights: renormalise the K selected probabilities to sum to 1.
        jitter: multiplicative noise on the gate input during training; 0 = off.
        load_balancing_weight: Switch load-balancing loss weight (the reference has none; top-k needs some).
        z_loss_weight: router z-loss weight.
    """

    def __init__(
        self,
        beta: bool = True,
        precision: bool = False,
        anticipation: bool = True,
        init_beta: float = 0.9,
        memory_form: MemoryForm = "leaky",
        memory_cap: float = 1.0,
        learn_beta: bool = True,
        carry_state: bool = False,
        chunk_size: int = 64,
        precision_decay: float = 0.95,
        precision_eps: float = 1e-4,
        precision_init_var: float = 1.0,
        precision_form: PrecisionForm = "scale",
        anticipation_weight: float = 0.5,
        anticipation_form: AnticipationForm = "additive",
        predictor_mult: int = 4,
        predictor_activation: Activation = "gelu",
        gate_bias: bool = False,
        normalize_weights: bool = True,
        jitter: float = 0.0,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ) -> None:
        super().__init__(normalize_weights, jitter, load_balancing_weight, z_loss_weight)
        check_unit_interval("init_beta", init_beta)
        check_choice("memory_form", memory_form, ("leaky", "ema", "capped_logit"))
        if memory_form == "capped_logit" and (anticipation or carry_state or not beta):
            raise ValueError(
                f"memory_form='capped_logit' is a beta-only gate (beta={beta}, anticipation={anticipation}, "
                f"carry_state={carry_state}); set beta=True, anticipation=False, carry_state=False or use 'leaky'."
            )
        check_positive_int("chunk_size", chunk_size)
        check_unit_interval("precision_decay", precision_decay)
        check_positive("precision_eps", precision_eps)
        check_non_negative("precision_init_var", precision_init_var)
        check_choice("precision_form", precision_form, ("scale", "log_shift"))
        check_non_negative("anticipation_weight", anticipation_weight)
        check_choice("anticipation_form", anticipation_form, ("additive", "direct"))
        check_positive_int("predictor_mult", predictor_mult)
        check_choice("predictor_activation", predictor_activation, ("gelu", "relu"))
        if carry_state and not beta:
            raise ValueError("carry_state=True needs beta=True (there is no memory to carry); drop carry_state.")
        self.beta, self.precision, self.anticipation = beta, precision, anticipation
        self.init_beta, self.memory_form = init_beta, memory_form
        self.memory_cap, self.learn_beta = memory_cap, learn_beta
        self.carry_state, self.chunk_size = carry_state, chunk_size
        self.precision_decay, self.precision_eps = precision_decay, precision_eps
        self.precision_init_var, self.precision_form = precision_init_var, precision_form
        self.anticipation_weight, self.anticipation_form = anticipation_weight, anticipation_form
        self.predictor_mult, self.predictor_activation, self.gate_bias = predictor_mult, predictor_activation, gate_bias
        # Python flags (not state): only to warn once when Pi is on but nobody feeds it errors.
        self._observed = self._errors_fed = self._warned_no_errors = False

    def build(self) -> None:
        super().build()
        D, E = self.d_model, self.num_experts
        if self.gate_bias:
            # PyTorch's default Linear init, as in the reference toys (their gates are plain nn.Linear(D, E)).
            self.layer = nn.Linear(D, E)
        if self.beta:
            width = E if self.memory_form == "capped_logit" else D
            self.logit_beta = nn.Parameter(
                torch.full((width,), math.log(self.init_beta / (1 - self.init_beta))), requires_grad=self.learn_beta
            )
            if self.carry_state:
                # [B, D] once a window has been seen; empty until then (and after reset_memory).
                self.register_buffer("memory_BD", torch.zeros(0, D))
        if self.anticipation:
            d_in = 2 * D if self.beta else D
            self.predictor = nn.Sequential(
                nn.Linear(d_in, self.predictor_mult * D),
                nn.GELU() if self.predictor_activation == "gelu" else nn.ReLU(),
                nn.Linear(self.predictor_mult * D, D)
            )
            if self.anticipation_form == "additive":
                self.anticipation_layer = nn.Linear(D, E, bias=False)
                nn.init.normal_(self.anticipation_layer.weight, std=D**-0.5)
        if self.precision:
            self.register_buffer("precision_var_E", torch.full((E,), float(self.precision_init_var)))
            self.register_pending("pending_error_E", torch.zeros(E))
            self.register_pending("pending_weight_E", torch.zeros(E))
            # observe_expert_errors: n EMA steps folded into one, var <- a^n var + P with
            # P = sum_t a^(n-t) (1-a) err_t; "sources" counts the ranks that fed errors, to average P over them.
            self.register_pending("pending_ema_E", torch.zeros(E))
            self.register_pending("pending_steps", torch.zeros(()))
            self.register_pending("pending_sources", torch.zeros(()))

    # ---- beta memory ---------------------------------------------------------------------------------------

    @property
    def beta_D(self) -> Tensor:
        """The current per-dimension ``beta`` (per expert with ``memory_form='capped_logit'``)."""
        return torch.sigmoid(self.logit_beta)

    def memory(self, x_BSD: Tensor) -> Tensor:
        """``h_BSD`` (fp32) for this window, started from the carried state when that applies."""
        h0_BD = None
        if self.carry_state and self.training and self.memory_BD.numel():
            if self.memory_BD.shape[0] != x_BSD.shape[0]:
                raise ValueError(
                    f"carry_state=True carries one memory per batch row: the last window had "
                    f"{self.memory_BD.shape[0]} rows, this one has {x_BSD.shape[0]}; keep the batch size fixed "
                    "(drop_last=True) or call reset_memory() between streams."
                )
            h0_BD = self.memory_BD
        inputs_BSD = x_BSD
        if self.memory_form == "ema":
            inputs_BSD = x_BSD * torch.sigmoid(-self.logit_beta).to(x_BSD.dtype)  # (1 - beta) * x
        return leaky_integrate(inputs_BSD, self.logit_beta, h0_BD, self.chunk_size)

    def reset_memory(self) -> None:
        """Forget the carried memory: the next training window starts from zero."""
        if self.carry_state:
            self.memory_BD = self.memory_BD.new_zeros(0, self.d_model)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The carried memory's batch size is whatever the saved run used; take its shape before loading.
        key = prefix + "memory_BD"
        if self.carry_state and key in state_dict:
            self.memory_BD = self.memory_BD.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- precision -----------------------------------------------------------------------------------------

    @property
    def precision_E(self) -> Tensor:
        """The current per-expert precision ``Pi = 1 / (var + eps)``."""
        return 1.0 / (self.precision_var_E + self.precision_eps)

    def apply_precision(self, logits_TE: Tensor) -> Tensor:
        precision_E = self.precision_E.to(logits_TE.dtype)
        if self.precision_form == "scale":
            return logits_TE * precision_E
        log_precision_E = precision_E.log()
        return logits_TE + (log_precision_E - log_precision_E.mean())

    @property
    def wants_token_errors(self) -> bool:
        return self.precision

    def observe_errors(self, error_T: Tensor, routing: Routing) -> None:
        if not self.precision:
            return
        T, E = routing.experts_TK.shape[0], self.num_experts
        weights_TE = torch.zeros(T, E, dtype=torch.float32, device=error_T.device).scatter_add_(
            1, routing.experts_TK, routing.weights_TK.detach().float()
        )
        self.pending_error_E += weights_TE.T @ error_T.float()
        self.pending_weight_E += weights_TE.sum(dim=0)
        self._errors_fed = True

    def observe_expert_errors(self, error_E: Tensor) -> None:
        """Queue one EMA step of Pi on a per-expert error the module defines itself (the regression task's
        per-expert MSE, the toy ablation's :func:`label_frequency_error` once per time step); applied, in call
        order, by :meth:`update_state` at the optimizer step. Under DDP every rank must queue the same number of
        steps; their errors are averaged step by step."""
        if not self.precision:
            return
        a = self.precision_decay
        self.pending_ema_E.mul_(a).add_(error_E.detach().float().to(self.pending_ema_E), alpha=1 - a)
        if not self._errors_fed:
            self.pending_sources += 1
        self.pending_steps += 1
        self._errors_fed = True

    def apply_pending(self) -> None:
        if self._observed and not self._errors_fed and not self._warned_no_errors:
            warnings.warn(
                "TransitionRouter(precision=True) got no errors this step, so Pi stays fixed; call "
                "lightning_moe.layers.feed_back_errors(model, per_token_loss_BS) (or the router's "
                "observe_expert_errors) in training_step.",
                stacklevel=2,
            )
            self._warned_no_errors = True
        if self.pending_sources > 0:
            # All-reduced sums over the R ranks: P and the step count are R times one rank's.
            sources = self.pending_sources
            steps = (self.pending_steps / sources).round()
            var_E = self.precision_var_E
            var_E.copy_(self.precision_decay**steps * var_E + self.pending_ema_E.to(var_E) / sources)
        has_E = self.pending_weight_E > 0
        error_E = self.pending_error_E / self.pending_weight_E.clamp(min=torch.finfo(torch.float32).tiny)
        self.update_precision(error_E, has_E)
        self._observed = self._errors_fed = False

    @torch.no_grad()
    def update_precision(self, error_E: Tensor, has_E: Tensor | None = None) -> None:
        """One EMA step ``var <- a * var + (1 - a) * error`` now (only where ``has_E``, default everywhere).
        Training code queues steps with :meth:`observe_expert_errors` instead, so they apply at the optimizer
        step and are averaged over DDP ranks."""
        a, var_E = self.precision_decay, self.precision_var_E
        new_E = a * var_E + (1 - a) * error_E.to(var_E)
        var_E.copy_(new_E if has_E is None else torch.where(has_E, new_E, var_E))

    # ---- gate ----------------------------------------------------------------------------------------------

    def forward(self, x_BSD: Tensor) -> MemoryRouting:
        """Always a :class:`MemoryRouting` (one return type); ``memory_BD`` is set only with ``carry_state``."""
        B, S, D = x_BSD.shape
        if self.memory_form == "capped_logit":
            current_BSE = self.logits(x_BSD.reshape(-1, D)).view(B, S, -1)
            logits_TE = capped_integrate(current_BSE, self.logit_beta, self.memory_cap).reshape(B * S, -1)
            return _with_memory(self.route(self.apply_precision(logits_TE) if self.precision else logits_TE), None)
        memory_BSD = self.memory(x_BSD) if self.beta else None  # fp32
        h_BSD = memory_BSD.to(x_BSD.dtype) if memory_BSD is not None else x_BSD
        losses: dict[str, Tensor] = {}
        if self.anticipation:
            predictor_in = torch.cat([x_BSD, h_BSD], dim=-1) if self.beta else x_BSD
            xhat_BSD = self.predictor(predictor_in)
            losses["anticipation"] = self.anticipation_weight * self.anticipation_loss(xhat_BSD, x_BSD)
            if self.anticipation_form == "direct":
                logits_TE = self.logits(xhat_BSD.reshape(-1, D))
            else:
                logits_TE = self.logits(h_BSD.reshape(-1, D)) + self.anticipation_layer(xhat_BSD.reshape(-1, D))
        else:
            logits_TE = self.logits(h_BSD.reshape(-1, D))
        if self.precision:
            logits_TE = self.apply_precision(logits_TE)
        routing = self.route(logits_TE, losses)
        return _with_memory(routing, memory_BSD[:, -1].detach() if self.carry_state else None)

    @staticmethod
    def anticipation_loss(xhat_BSD: Tensor, x_BSD: Tensor) -> Tensor:
        """Unweighted MSE between each prediction and the next position's (detached) router input."""
        if x_BSD.shape[1] < 2:
            return xhat_BSD.new_zeros((), dtype=torch.float32)
        return F.mse_loss(xhat_BSD[:, :-1].float(), x_BSD[:, 1:].detach().float())

    def observe(self, x_TD: Tensor, routing: Routing) -> None:
        self._observed = True
        if self.carry_state and getattr(routing, "memory_BD", None) is not None:
            self.memory_BD = routing.memory_BD.to(self.memory_BD)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, beta={self.beta}, precision={self.precision}, "
            f"anticipation={self.anticipation}"
        )


def label_frequency_error(targets_B: Tensor, num_experts: int) -> Tensor:
    """``err_E``: the share of the batch whose target expert is not ``i`` (the toy ablation's "prediction error",
    spec §1.2). It depends only on the labels, so Pi converges to a constant per-expert temperature."""
    counts_E = count_ids(targets_B, num_experts).float()
    return 1.0 - counts_E / targets_B.numel()
