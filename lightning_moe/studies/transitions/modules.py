"""Small LightningModules of the domain-transition study (arXiv 2605.00604; transitions spec §2-§4), built on
:class:`lightning_moe.gating.transitions.TransitionRouter`.

Legend: B batch, S sequence, D model width, E experts, V vocabulary.

- :class:`TransitionRoutingToy`: router only, trained to name the target expert of the toy routing task.
- :class:`TransitionSequenceRouting`: one routing decision per sequence, at its last step (Table 1).
- :class:`TransitionPrecisionRegression`: noisy regression experts under a precision-weighted gate (Tables 2-3).
- :class:`TransitionCharLM`: the character "LM": embedding -> dense soft mixture of 2 experts on the current
  embedding -> LayerNorm(x + mixture) -> head, no attention, so the router is the only path across time.

Routing around the switches (p(correct expert), accuracy and K at each offset) is measured by the core's
:class:`~lightning_moe.callbacks.TransitionMonitor` on the batches' ``domain_ids``, which the study's recipes attach
(it also writes ``transition_curve.json``); these modules log what belongs to their task: the loss, bits per
character and the accuracy on their own targets, at the single validation at the end of fit (``val_check_interval``
= ``max_steps``), and under ``ref/`` the reference's running mean over the last 50 training batches.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import update_router_states
from lightning_moe.gating import Router, TransitionRouter, label_frequency_error
from lightning_moe.studies.artifacts import PRECISION_FILE, RunArtifact
from lightning_moe.utils import check_non_negative, check_positive, check_positive_int

RouteOn = Literal["current", "next"]
LAST_N = 50  # the reference reports the mean of the last 50 training batches
ALIGN = 8  # the char LM's bits-per-character curve: offsets kept either side of the transition step



class _RoutedModule(pl.LightningModule):
    """What the study's modules share: one :class:`TransitionRouter` bound to ``(d_model, E)``, its state updated
    once per optimizer step, and the reference's optimiser (Adam, no weight decay or schedule)."""

    updates_router_states = True  # RouterStateUpdate leaves the module alone

    def _bind(self, router: TransitionRouter | dict, d_model: int, num_experts: int, lr: float) -> None:
        """Bind the router and save the caller's ``__init__`` arguments as hyper-parameters, the router as its
        YAML config (a dict), so ``load_from_checkpoint(path)`` alone rebuilds the module."""
        if isinstance(router, dict):  # from a checkpoint's hyper-parameters
            router = Router.from_config(router)
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        check_positive("lr", lr)
        if not isinstance(router, TransitionRouter):
            raise TypeError(f"router must be a TransitionRouter, got {type(router).__name__}; use class_path "
                            "lightning_moe.gating.TransitionRouter.")
        router.bind(d_model, num_experts, num_experts)
        self.router, self.lr = router, lr
        self.save_hyperparameters(ignore=["router"], frame=inspect.currentframe().f_back)
        self.hparams["router"] = router.config()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Pi only scales the logits of the next forward, so updating it before or after the optimizer step (the
        # reference updates after) gives the same numbers.
        update_router_states(self)


class TransitionRoutingToy(_RoutedModule):
    """Router-only trainer of the toy routing task (spec §2): loss = sum over the S - 1 routed steps of the
    batch-mean cross-entropy of the gate's logits against the target expert, plus the router's aux losses.

    Logged at the end: ``val/p_all`` and ``val/acc_all`` (soft probability and argmax accuracy on the target
    expert over all routed steps, held out), ``ref/acc_all`` (the accuracy over the last 50 training batches),
    ``val/beta_mean`` with beta, ``val/pi_{i}`` with precision. The transition step's numbers come from the
    :class:`~lightning_moe.callbacks.TransitionMonitor` with ``correct_experts=[0, 2]``.

    Args:
        router: the gate (a :class:`TransitionRouter`; the ablation's eight conditions are its three flags, with
            ``gate_bias=True``, ``anticipation_form='direct'``, ``predictor_activation='relu'``, no LB/z-loss).
        d_model: input width D (16).
        num_experts: E (4; the targets are 0 and 2).
        route_on: ``current`` routes step t on ``x_t``; ``next`` on the true ``x_{t+1}`` (the oracle).
        lr: Adam learning rate (3e-3).
    """

    def __init__(
        self,
        router: TransitionRouter,
        d_model: int = 16,
        num_experts: int = 4,
        route_on: RouteOn = "current",
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        if route_on not in ("current", "next"):
            raise ValueError(f"route_on={route_on!r} is not a routing input; use 'current' or 'next' (oracle).")
        self._bind(router, d_model, num_experts, lr)
        self.route_on = route_on
        self._recent_all: list[Tensor] = []

    def gate(self, x_BSD: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``logits_BSE`` for the S - 1 routed steps and the router's aux losses.

        The router always sees S positions, so its routing lines up with the batch's per-position labels for the
        monitors: the whole sequence (the predictor at t = S - 2 needs its target x_{S-1}), or for the oracle the
        next inputs with the last one repeated. Step S - 1 is dropped; a causal router's first S - 1 decisions do
        not depend on it."""
        B, S, _ = x_BSD.shape
        if self.route_on == "next":
            x_BSD = torch.cat([x_BSD[:, 1:], x_BSD[:, -1:]], dim=1)
        routing = self.router(x_BSD)
        return routing.logits_TE.view(B, S, -1)[:, :-1], routing.aux_losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits_BSE, aux = self.gate(batch["inputs_embeds"])
        target_BS = batch["labels"][:, :-1]
        ce_BS = F.cross_entropy(logits_BSE.transpose(1, 2).float(), target_BS, reduction="none")
        loss = ce_BS.mean(dim=0).sum() + sum(aux.values(), torch.zeros((), device=ce_BS.device))
        with torch.no_grad():
            correct_BS = (logits_BSE.argmax(-1) == target_BS).float()
            self._recent_all = (self._recent_all + [correct_BS.mean()])[-LAST_N:]
            # With precision, Pi is fed the reference ablation's label-frequency error (the share of the batch
            # whose target is not i), one EMA step per routed time step, as the reference does.
            if self.router.precision:
                for t in range(target_BS.shape[1]):
                    self.router.observe_expert_errors(label_frequency_error(target_BS[:, t], self.router.num_experts))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)  # p, acc on the target expert; tokens

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits_BSE, _ = self.gate(batch["inputs_embeds"])
        target_BS = batch["labels"][:, :-1]
        p_BS = logits_BSE.float().softmax(-1).gather(-1, target_BS[..., None]).squeeze(-1)
        acc_BS = (logits_BSE.argmax(-1) == target_BS).float()
        self._sums += torch.stack([p_BS.sum(), acc_BS.sum(), torch.tensor(p_BS.numel())]).double().cpu()

    def on_validation_epoch_end(self) -> None:
        p_all, acc_all = (self._sums[:2] / self._sums[2]).tolist()
        metrics = {"val/p_all": p_all, "val/acc_all": acc_all}
        if self._recent_all:
            metrics["ref/acc_all"] = torch.stack(self._recent_all).mean().item()
        if self.router.beta:
            metrics["val/beta_mean"] = self.router.beta_D.mean().item()
        if self.router.precision:
            metrics.update({f"val/pi_{i}": v for i, v in enumerate(self.router.precision_E.tolist())})
        self.log_dict(metrics)



Readout = Literal["last", "mean"]


class TransitionSequenceRouting(_RoutedModule):
    """Table 1's router-only task (spec §5): one routing decision per sequence, read at its last step, trained
    by cross-entropy against the sequence's target expert.

    Logged at the end: ``ref/acc`` (argmax accuracy, mean of the last 50 training batches, the reference's
    number), ``val/acc`` (held-out) and, with beta, ``val/beta_{i}``.

    Args:
        router: the gate; stateless last-token = no beta; the LIF rows = ``memory_form='capped_logit'``
            (``learn_beta`` False for the fixed-beta row), all with ``gate_bias=True``.
        d_model: input width D (16).
        num_experts: E (4; the targets are 0 and 2).
        readout: ``last`` routes on the last step's gate (of the memory, with beta); ``mean`` routes on the
            mean of the inputs over the sequence (the mean-pool row).
        loss_on_probabilities: apply the cross-entropy to the gate's softmax probabilities instead of its logits,
            the reference's double softmax (spec §7.2), which Table 1's numbers were trained with; parity only.
        lr: Adam learning rate (3e-3).
    """

    def __init__(
        self,
        router: TransitionRouter,
        d_model: int = 16,
        num_experts: int = 4,
        readout: Readout = "last",
        loss_on_probabilities: bool = False,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        if readout not in ("last", "mean"):
            raise ValueError(f"readout={readout!r} is not a readout; use 'last' or 'mean'.")
        self._bind(router, d_model, num_experts, lr)
        self.readout, self.loss_on_probabilities = readout, loss_on_probabilities
        self._recent: list[Tensor] = []

    def forward(self, x_BSD: Tensor) -> Tensor:
        """``logits_BE`` of each sequence's single routing decision."""
        if self.readout == "mean":
            return self.router(x_BSD.mean(dim=1, keepdim=True)).logits_TE
        B, S, _ = x_BSD.shape
        return self.router(x_BSD).logits_TE.view(B, S, -1)[:, -1]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits_BE = self(batch["inputs_embeds"])
        target_B = batch["labels"][:, -1]
        scores_BE = logits_BE.float().softmax(-1) if self.loss_on_probabilities else logits_BE.float()
        with torch.no_grad():
            self._recent = (self._recent + [(logits_BE.argmax(-1) == target_B).float().mean()])[-LAST_N:]
        return F.cross_entropy(scores_BE, target_B)

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros(2, dtype=torch.float64)  # correct, total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        target_B = batch["labels"][:, -1]
        correct = (self(batch["inputs_embeds"]).argmax(-1) == target_B).sum().item()
        self._correct += torch.tensor([correct, target_B.numel()], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/acc": (self._correct[0] / self._correct[1]).item()}
        if self._recent:
            metrics["ref/acc"] = torch.stack(self._recent).mean().item()
        if self.router.beta:
            metrics.update({f"val/beta_{i}": v for i, v in enumerate(self.router.beta_D.tolist())})
        self.log_dict(metrics)



class _Expert(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransitionCharLM(_RoutedModule):
    """The character task's model (spec §4): ``logits = head(LayerNorm(x_t + sum_e g_te Expert_e(x_t)))`` with
    ``x_t`` the character embedding and ``g_t`` the router's dense softmax over all E experts (no top-k).

    Loss: per-token cross-entropy with the transition step weighted by ``transition_weight``, summed and divided
    by the token count (not the weight sum, as in the reference), plus the router's aux losses.

    Logged at the end: ``val/bpc_all`` and ``val/bpc_trans`` (bits per character over all positions and at the
    transition step, held out) and ``val/bpc@<o>``, the bits per character at offset o = -8..+8 from each
    sequence's transition step. The gates around the switch come from the
    :class:`~lightning_moe.callbacks.TransitionMonitor`.

    Args:
        router: the gate (``TransitionRouter``; Standard = no beta/anticipation, beta-MoE = beta, beta+Ant = beta
            + additive anticipation; ``gate_bias=True``, no LB/z-loss in the reference).
        vocab_size: V (26).
        d_model: D (64).
        num_experts: E (2).
        d_expert: expert hidden width (256).
        transition_weight: loss weight of the transition step (5.0).
        lr: Adam learning rate (2e-3).
    """

    def __init__(
        self,
        router: TransitionRouter,
        vocab_size: int = 26,
        d_model: int = 64,
        num_experts: int = 2,
        d_expert: int = 256,
        transition_weight: float = 5.0,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("d_expert", d_expert)
        check_non_negative("transition_weight", transition_weight)
        self._bind(router, d_model, num_experts, lr)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.experts = nn.ModuleList(_Expert(d_model, d_expert) for _ in range(num_experts))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.transition_weight = transition_weight

    def forward(self, tokens_BS: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(logits_BSV, gates_BSE, aux_losses)``."""
        B, S = tokens_BS.shape
        x_BSD = self.embedding(tokens_BS)
        routing = self.router(x_BSD)
        gates_BSE = routing.scores_TE.view(B, S, -1)
        # The experts read only the current embedding, a function of the token id: evaluate them once per
        # vocabulary entry (V = 26 rows instead of B * S). The mixture sum_e g_te out_e[token_t] is then one
        # matmul of the gates, scattered into each token's vocabulary row, with the V * E expert outputs: 4x
        # faster than gathering a [B, S, D, E] tensor of outputs and summing it (same function and gradients).
        V, E = self.embedding.num_embeddings, len(self.experts)
        outs_VED = torch.stack([expert(self.embedding.weight) for expert in self.experts], dim=1)
        T = B * S
        gates_TVE = outs_VED.new_zeros(T, V, E).index_put(
            (torch.arange(T, device=tokens_BS.device), tokens_BS.reshape(T)), gates_BSE.reshape(T, E).to(outs_VED)
        )
        mixed_BSD = (gates_TVE.view(T, V * E) @ outs_VED.reshape(V * E, -1)).view(B, S, -1)
        return self.head(self.norm(x_BSD + mixed_BSD)), gates_BSE, routing.aux_losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits_BSV, _, aux = self(batch["tokens"])
        ce_BS = F.cross_entropy(logits_BSV.transpose(1, 2).float(), batch["labels"], reduction="none")
        weight_BS = 1.0 + (self.transition_weight - 1.0) * batch["transition_mask"].float()
        loss = (ce_BS * weight_BS).mean() + sum(aux.values(), torch.zeros((), device=ce_BS.device))
        if batch_idx % 50 == 0:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        O = 2 * ALIGN + 1
        self._ce_sums = torch.zeros(2, dtype=torch.float64)  # CE summed over all tokens, at the transition steps
        self._ce_counts = torch.zeros(2, dtype=torch.float64)
        self._ce_O = torch.zeros(O, dtype=torch.float64)  # CE summed per offset from the transition step
        self._count_O = torch.zeros(O, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits_BSV, _, _ = self(batch["tokens"])
        ce_BS = F.cross_entropy(logits_BSV.transpose(1, 2).float(), batch["labels"], reduction="none").double()
        trans_BS = batch["transition_mask"]
        self._ce_sums += torch.stack([ce_BS.sum(), ce_BS[trans_BS].sum()]).cpu()
        self._ce_counts += torch.tensor([ce_BS.numel(), trans_BS.sum().item()], dtype=torch.float64)
        offset_BS = torch.arange(ce_BS.shape[1], device=ce_BS.device) - trans_BS.float().argmax(dim=1, keepdim=True)
        keep_BS = offset_BS.abs() <= ALIGN
        index_N = (offset_BS[keep_BS] + ALIGN).long().cpu()
        self._ce_O.index_add_(0, index_N, ce_BS[keep_BS].cpu())
        self._count_O.index_add_(0, index_N, torch.ones_like(index_N, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        bpc_all, bpc_trans = (self._ce_sums / self._ce_counts / math.log(2)).tolist()
        bpc_O = (self._ce_O / self._count_O / math.log(2)).tolist()
        metrics = {"val/bpc_all": bpc_all, "val/bpc_trans": bpc_trans}
        metrics.update({f"val/bpc@{o - ALIGN:+d}": v for o, v in enumerate(bpc_O) if self._count_O[o] > 0})
        self.log_dict(metrics)



class TransitionPrecisionRegression(_RoutedModule):
    """The precision-gating task (spec §1.2, Tables 2-3): a dense soft mixture of E small regression experts
    whose outputs carry Gaussian noise of a per-expert std (their "reliability"), optionally swapped at
    ``shift_step``; loss = MSE of the mixture to the target.

    With ``router.precision`` the gate's Pi is fed, after each optimizer step, the batch-mean squared error of
    each expert's (noisy) output to the target (the reference's precision_gating.py), so Pi tracks reliability.
    Logged at the end (one validation at ``max_steps``): ``val/early_loss`` / ``val/final_loss`` (mean training
    loss over the first / last 100 steps, the reference's Table 2), the final Pi and ``val/pi_contrast`` =
    Pi_0 / Pi_2, and ``val/crossover_step``: the first step at or after the shift with Pi_0 < Pi_2. The per-step
    Pi and losses are :meth:`artifact`, which the module's :class:`~lightning_moe.studies.artifacts.RunArtifact`
    writes to ``precision_trajectory.json`` in the run folder (Table 3).

    Args:
        router: the gate (``TransitionRouter`` with ``gate_bias=True``; affinity = no precision).
        d_model: input width D (16).
        d_expert: expert hidden width (32; experts are Linear -> ReLU -> Linear to one output).
        expert_noise: output-noise std of each expert (its length is E).
        shifted_noise: the stds from ``shift_step`` on; ``None`` keeps them static.
        shift_step: the optimizer step of the reliability shift.
        lr: Adam learning rate (3e-3).
    """

    def __init__(
        self,
        router: TransitionRouter,
        d_model: int = 16,
        d_expert: int = 32,
        expert_noise: tuple[float, ...] = (0.1, 0.5, 1.5, 0.5),
        shifted_noise: tuple[float, ...] | None = None,
        shift_step: int = 500,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_expert", d_expert)
        check_positive_int("shift_step", shift_step)
        if len(expert_noise) < 2 or any(s < 0 for s in expert_noise):
            raise ValueError(f"expert_noise={list(expert_noise)} needs one std >= 0 per expert (at least 2).")
        if shifted_noise is not None and (len(shifted_noise) != len(expert_noise) or any(s < 0 for s in shifted_noise)):
            raise ValueError(f"shifted_noise={list(shifted_noise)} needs one std >= 0 per expert, like "
                             f"expert_noise={list(expert_noise)}; or null for static reliability.")
        E = len(expert_noise)
        self._bind(router, d_model, E, lr)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_expert), nn.ReLU(), nn.Linear(d_expert, 1)) for _ in range(E)
        )
        self.expert_noise, self.shifted_noise, self.shift_step = expert_noise, shifted_noise, shift_step
        self._losses: list[Tensor] = []
        self._precision: list[Tensor] = []

    def noise_E(self, step: int) -> Tensor:
        shifted = self.shifted_noise is not None and step >= self.shift_step
        return torch.tensor(self.shifted_noise if shifted else self.expert_noise, dtype=torch.float32)

    def forward(self, x_B1D: Tensor, noise_E: Tensor) -> tuple[Tensor, Tensor]:
        """``(mixture_B1, expert_outputs_BE1)`` with each expert's output noise added."""
        gates_BE = self.router(x_B1D).scores_TE
        x_BD = x_B1D[:, 0]
        outs_BE1 = torch.stack([expert(x_BD) for expert in self.experts], dim=1)
        outs_BE1 = outs_BE1 + torch.randn_like(outs_BE1) * noise_E.to(outs_BE1)[:, None]
        return (gates_BE[..., None].to(outs_BE1.dtype) * outs_BE1).sum(1), outs_BE1

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out_B1, outs_BE1 = self(batch["inputs_embeds"], self.noise_E(self.global_step))
        loss = F.mse_loss(out_B1, batch["labels"])
        self._losses.append(loss.detach())
        self.router.observe_expert_errors(((outs_BE1.detach() - batch["labels"][:, None]) ** 2).mean(dim=(0, 2)))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Pi after this step's update, which the next step routes with (the reference's Table 3 trajectory).
        if self.router.precision:
            self._precision.append(self.router.precision_E.clone())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out_B1, _ = self(batch["inputs_embeds"], self.noise_E(self.global_step))
        self.log("val/mse", F.mse_loss(out_B1, batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        if not self._losses:
            return
        losses = torch.stack(self._losses)
        metrics = {"val/early_loss": losses[:100].mean().item(), "val/final_loss": losses[-100:].mean().item()}
        if self._precision:
            pi_NE = torch.stack(self._precision)
            metrics.update({f"val/pi_{i}": v for i, v in enumerate(pi_NE[-1].tolist())})
            metrics["val/pi_contrast"] = (pi_NE[-1, 0] / pi_NE[-1, 2]).item()
            if self.shifted_noise is not None:
                after_N = torch.arange(len(pi_NE)) >= self.shift_step
                crossed_N = after_N & (pi_NE[:, 0] < pi_NE[:, 2])
                metrics["val/crossover_step"] = float(crossed_N.float().argmax()) if crossed_N.any() else float("nan")
        self.log_dict(metrics)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [RunArtifact(PRECISION_FILE)]

    def artifact(self) -> dict[str, list]:
        """The training loss of every step and, with precision, Pi after each step's update (Table 3); written
        into the run folder by :class:`~lightning_moe.studies.artifacts.RunArtifact`."""
        out: dict[str, list] = {"loss": torch.stack(self._losses).tolist() if self._losses else []}
        if self._precision:
            out["precision"] = torch.stack(self._precision).tolist()
        return out
