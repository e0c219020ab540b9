"""The task-routing study's LightningModule (arXiv 2606.14398): an MoE LM trained on template/key-value tasks with
an optional task-routing loss, evaluated by greedy exact match and by how its router splits the tasks.

Legend: B batch (sentences), S sequence, T = B*S tokens, E experts, K tasks (``task_ids`` -1 = no task).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_moe import MoELayer, moe_layers
from lightning_moe.data import IGNORE_INDEX
from lightning_moe.metrics import LabelSpecialization, conditional_entropy_C, share_matrix_CE, specialization_stats
from lightning_moe.modules import MoELanguageModel
from lightning_moe.studies.artifacts import ROUTING_FILE, RunArtifact
from lightning_moe.studies.task_routing.oracle import OracleRouter
from lightning_moe.utils import check_non_negative, check_positive_int

LN2 = math.log(2)


def task_experts(task_ids: Tensor, num_experts: int) -> Tensor:
    """The task -> expert map e(k) = k mod E (one-to-one when K <= E); positions without a task (-1) stay -1."""
    return torch.where(task_ids >= 0, task_ids % num_experts, task_ids)


def task_routing_loss(logits_TE: Tensor, task_ids_T: Tensor) -> Tensor:
    """L_router = -(1/N) Σ_x log p_{x, e(task(x))} over the N positions that belong to a task (every position of
    every sentence, as the theorem routes every prefix). Cross-entropy on the router logits is this exactly,
    computed stably in fp32."""
    target_T = task_experts(task_ids_T.reshape(-1), logits_TE.shape[1]).masked_fill(task_ids_T.reshape(-1) < 0,
                                                                                    IGNORE_INDEX)
    return F.cross_entropy(logits_TE.float(), target_T, ignore_index=IGNORE_INDEX)


def greedy_exact_match(logits_BSV: Tensor, labels_BS: Tensor, target_mask_BS: Tensor) -> Tensor:
    """Whether greedy decoding from the prefix before the object reproduces the whole answer, per sentence.

    Computed from one teacher-forced pass: greedy decoding emits the answer exactly iff the argmax at every answer
    position, given the true prefix, is the true next token (at the first wrong argmax greedy diverges; before it,
    greedy's prefix *is* the true prefix). So no token-by-token decoding loop is needed.
    """
    hit_BS = logits_BSV.argmax(-1) == labels_BS
    return (hit_BS | ~target_mask_BS).all(1)


class TaskAccuracy(Metric):
    """Per-task sentence counts: exact matches and object hits, over all sentences and over answerable ones (their
    fact was seen in training). Sum-reduced, so DDP-correct."""

    full_state_update = False

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n_K", "exact_K", "object_K", "n_answerable_K", "exact_answerable_K"):
            self.add_state(name, default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, task_B: Tensor, exact_B: Tensor, object_B: Tensor, answerable_B: Tensor) -> None:
        for state, weight in ((self.n_K, None), (self.exact_K, exact_B), (self.object_K, object_B),
                              (self.n_answerable_K, answerable_B), (self.exact_answerable_K, exact_B & answerable_B)):
            state += torch.bincount(task_B, weights=None if weight is None else weight.double(),
                                    minlength=state.numel()).double()

    def compute(self) -> dict[str, Tensor]:
        n = self.n_K.sum().clamp_min(1)
        return {
            "exact_match": self.exact_answerable_K.sum() / self.n_answerable_K.sum().clamp_min(1),
            "exact_match_all": self.exact_K.sum() / n,
            "object_acc": self.object_K.sum() / n,
            "exact_match_K": self.exact_K / self.n_K.clamp_min(1),
        }


def routing_scalars(top1_KE: Tensor, soft_KE: Tensor, dominant_share: float) -> dict[str, Tensor]:
    """The study's routing numbers from the task x expert tables (counts of top-1 choices; summed probabilities).

    ``task_purity`` TP = mean_k max_e R[k, e] over tasks seen (unweighted, as the spec defines it); ``dominant``
    counts tasks whose top expert takes >= ``dominant_share`` of their positions; ``cond_entropy`` is the mean of
    H(E | task) / log E; ``injective`` (K <= E only) is 1 when no two tasks share their top expert.
    """
    seen_K = top1_KE.sum(1) > 0
    R_KE, Rsoft_KE = share_matrix_CE(top1_KE)[seen_K], share_matrix_CE(soft_KE)[seen_K]
    hard, soft = specialization_stats(top1_KE), specialization_stats(soft_KE)
    top_K = R_KE.max(1).values
    out = {
        "task_purity": top_K.mean(),
        "task_purity_soft": Rsoft_KE.max(1).values.mean(),
        "nmi": hard["nmi"],
        "nmi_soft": soft["nmi"],
        "expert_purity": hard["purity_expert"],
        "dominant_tasks": (top_K >= dominant_share).sum().double(),
        "dominant_frac": (top_K >= dominant_share).double().mean(),
        "cond_entropy": conditional_entropy_C(top1_KE[seen_K]).mean(),
    }
    K, E = top1_KE.shape
    if K <= E:
        out["injective"] = torch.tensor(float(R_KE.argmax(1).unique().numel() == R_KE.shape[0]), dtype=torch.float64)
    return out


class TaskRoutingLM(MoELanguageModel):
    """:class:`MoELanguageModel` on :class:`~lightning_moe.studies.task_routing.data.TaskRoutingDataModule` batches, with
    the paper's task-routing loss and its evaluation.

    Training loss: CE + the router's own aux losses (load balancing, z-loss, as configured) +
    ``task_routing_weight`` x L_router (logged as ``train/aux/task_routing``, already weighted; ``train/loss`` is
    the parent's CE + router aux losses, without it). With an :class:`~lightning_moe.studies.task_routing.OracleRouter`
    every token is routed to e(task) = task mod E instead (the capacity sweep).

    Validation (loader 0 = test split, 1 = training split) logs, on the test split: ``val/exact_match`` (greedy
    exact match of answerable sentences, the headline), ``val/exact_match_all``, ``val/object_acc``, ``val/loss``
    and the parent's load-balance numbers; on the training split ``val/train_exact_match`` and
    ``val/train_exact_match_min_task`` (the worst task's); and the routing numbers of :func:`routing_scalars`
    under ``val/route/`` (all task positions) and ``val/route_after_subject/`` (positions after the subject slot).
    The task x expert tables and per-task accuracies are :meth:`artifact`, which the module's
    :class:`~lightning_moe.studies.artifacts.RunArtifact` writes to ``routing.json`` in the run folder.

    Args:
        num_tasks: K, the number of tasks in the data (checked against the data module).
        task_routing_weight: λ_R of the task-routing loss; 0 = off (must be 0 with an oracle router).
        dominant_share: share of a task's positions its top expert must take for the task to count as dominated.
        **kwargs: :class:`MoELanguageModel` arguments (the study uses n_layers 1, n_heads 2, top_k 1).
    """

    def __init__(self, num_tasks: int = 20, task_routing_weight: float = 0.0, dominant_share: float = 0.8,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_tasks", num_tasks)
        check_non_negative("task_routing_weight", task_routing_weight)
        if not 0 < dominant_share <= 1:
            raise ValueError(f"dominant_share must lie in (0, 1], got {dominant_share!r}.")
        layers = moe_layers(self.model)
        if len(layers) != 1:
            raise ValueError(f"the task-routing study reads one MoE layer, but the model has {len(layers)}; set "
                             "n_layers: 1 (or moe_every so that exactly one block is MoE).")
        self.layer: MoELayer = layers[0]
        self.oracle = isinstance(self.layer.router, OracleRouter)
        if self.oracle and task_routing_weight:
            raise ValueError("task_routing_weight must be 0 with an OracleRouter: the oracle has nothing to learn.")
        E = self.hparams.num_experts
        self.val_routing = LabelSpecialization(num_tasks, E)
        self.val_routing_after = LabelSpecialization(num_tasks, E)
        self.val_acc, self.train_acc = TaskAccuracy(num_tasks), TaskAccuracy(num_tasks)
        self._artifact: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data_tasks = getattr(getattr(self.trainer, "datamodule", None), "num_tasks", None)
        if data_tasks is not None and data_tasks != self.hparams.num_tasks:
            raise ValueError(f"model.num_tasks={self.hparams.num_tasks} but the data has {data_tasks} tasks; set "
                             f"model.init_args.num_tasks: {data_tasks}.")

    def _route_oracle(self, batch: dict[str, Tensor]) -> None:
        if "task_ids" not in batch:
            raise ValueError("batch is missing 'task_ids'; use TaskRoutingDataModule (per-token task labels).")
        if self.oracle:
            # Positions without a task (padding) go to expert 0; their labels are ignored, so it does not matter.
            self.layer.router.assign(task_experts(batch["task_ids"], self.hparams.num_experts).clamp_min(0))

    def _ce(self, batch: dict[str, Tensor], reduction: str = "mean") -> Tensor:
        self._route_oracle(batch)
        return super()._ce(batch, reduction)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.hparams.task_routing_weight > 0:
            routing = self.layer.routing
            if routing.logits_TE is None:
                raise ValueError(f"task_routing_weight needs router logits, which {type(self.layer.router).__name__}"
                                 " does not give; use SoftmaxTopK.")
            aux = self.hparams.task_routing_weight * task_routing_loss(routing.logits_TE, batch["task_ids"])
            self.log("train/aux/task_routing", aux, batch_size=batch["tokens"].shape[0])
            loss = loss + aux
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._route_oracle(batch)
        logits_BSV = self.model(batch["tokens"])
        exact_B = greedy_exact_match(logits_BSV, batch["labels"], batch["target_mask"])
        rows = torch.arange(len(exact_B), device=exact_B.device)
        object_B = logits_BSV[rows, batch["object_pos"]].argmax(-1) == batch["labels"][rows, batch["object_pos"]]
        task_B = batch["task_ids"][:, 0]
        acc = self.val_acc if dataloader_idx == 0 else self.train_acc
        acc.update(task_B, exact_B, object_B, batch["answerable"])
        if dataloader_idx != 0:
            return
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), batch["labels"].flatten())
        self.log_dict({"val/loss": ce, "val/bits_per_token": ce / LN2}, batch_size=len(exact_B),
                      add_dataloader_idx=False)
        routing = self.layer.routing
        self.val_load[0].update(routing.assigned_N())
        top1_T, task_T = routing.experts_TK[:, 0], batch["task_ids"].reshape(-1)
        self.val_routing.update(task_T, routing.experts_TK, top1_T, routing.scores_TE)
        after_T = task_T.masked_fill(~batch["after_subject"].reshape(-1), -1)
        self.val_routing_after.update(after_T, routing.experts_TK, top1_T, routing.scores_TE)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        test = self.val_acc.compute()
        logs = {f"val/{k}": v for k, v in test.items() if k != "exact_match_K"}
        train = self.train_acc.compute() if self.train_acc.update_called else None
        if train is not None:
            logs["val/train_exact_match"] = train["exact_match_all"]
            logs["val/train_exact_match_min_task"] = train["exact_match_K"].min()
        scalars = routing_scalars(self.val_routing.top1_CE, self.val_routing.soft_CE, self.hparams.dominant_share)
        after = routing_scalars(self.val_routing_after.top1_CE, self.val_routing_after.soft_CE,
                                self.hparams.dominant_share)
        logs.update({f"val/route/{k}": v for k, v in scalars.items()})
        logs.update({f"val/route_after_subject/{k}": after[k] for k in ("task_purity", "nmi", "dominant_frac")})
        self.log_dict({k: v.float() for k, v in logs.items()})
        if not self.trainer.sanity_checking:
            self._artifact = self._routing_tables(test, train)
        for m in (self.val_routing, self.val_routing_after, self.val_acc, self.train_acc):
            m.reset()

    def configure_callbacks(self) -> list[pl.Callback]:
        return [RunArtifact(ROUTING_FILE)]

    def artifact(self) -> dict[str, Any] | None:
        """The last validation's task x expert tables and per-task accuracies (None before the first), written
        into the run folder by :class:`~lightning_moe.studies.artifacts.RunArtifact` for the report."""
        return self._artifact

    def _routing_tables(self, test: dict[str, Tensor], train: dict[str, Tensor] | None) -> dict[str, Any]:
        data = getattr(self.trainer, "datamodule", None)
        tasks = getattr(getattr(data, "tasks", None), "tasks", None)
        return {
            "step": self.global_step,
            "num_tasks": self.hparams.num_tasks,
            "num_experts": self.hparams.num_experts,
            "d_ff": self.hparams.d_ff,
            "routing_hard": share_matrix_CE(self.val_routing.top1_CE).tolist(),
            "routing_soft": share_matrix_CE(self.val_routing.soft_CE).tolist(),
            "routing_after_subject_hard": share_matrix_CE(self.val_routing_after.top1_CE).tolist(),
            "exact_match_per_task": test["exact_match_K"].tolist(),
            "train_exact_match_per_task": None if train is None else train["exact_match_K"].tolist(),
            "complexity_per_task": None if tasks is None else [t.complexity for t in tasks],
            "width_bound_per_task": None if tasks is None else [t.width_bound for t in tasks],
        }
