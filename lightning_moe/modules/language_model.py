"""LightningModule for MoE language models: cross-entropy + the layers' auxiliary losses, AdamW, warmup + cosine."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.data.batch import IGNORE_INDEX
from lightning_moe.experts.native import Activation, Backend
from lightning_moe.gating.base import Router
from lightning_moe.layers import (
    NonFiniteRoutingError, feed_back_errors, moe_layers, raise_deferred_checks, update_router_states,
)
from lightning_moe.metrics.load import ExpertLoad, load_stats
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.parallel import check_expert_parallel, clip_grad_norm_, expert_parallel_mesh, shard_experts
from lightning_moe.utils import DeferredChecks, check_checkpoint_file, check_non_negative, check_now, check_positive

LN2 = math.log(2)


def check_labels(
    labels_BS: Tensor, tokens_BS: Tensor, vocab_size: int, deferred: DeferredChecks | None = None
) -> Tensor:
    """Labels must be integer ids shaped like the tokens, in ``[0, vocab_size)`` or ``-100`` (ignored), with at
    least one scored; otherwise cross-entropy fails with an opaque torch error or returns NaN (0 / 0).

    Type and shape are checked at once (free). The values are too, with one host sync, unless ``deferred`` is given
    (on a GPU, where that sync would stall the stream): then they become flags read at the optimizer step
    (:func:`lightning_moe.layers.raise_deferred_checks`) and out-of-range ids are replaced by -100, so that
    cross-entropy cannot trip a device-side assert before the check raises. Returns the labels to train on.
    """
    if not isinstance(labels_BS, Tensor) or labels_BS.is_floating_point() or labels_BS.is_complex():
        kind = labels_BS.dtype if isinstance(labels_BS, Tensor) else type(labels_BS).__name__
        raise TypeError(f"batch['labels'] must be an integer tensor of token ids, got {kind}.")
    if isinstance(tokens_BS, Tensor) and labels_BS.shape != tokens_BS.shape:
        raise ValueError(
            f"batch['labels'] has shape {tuple(labels_BS.shape)} but batch['tokens'] has {tuple(tokens_BS.shape)}; "
            "give one next-token label per token (-100 where a token is not scored)."
        )
    scored = labels_BS != IGNORE_INDEX
    if deferred is not None:
        out_BS = scored & ((labels_BS < 0) | (labels_BS >= vocab_size))
        deferred.add(ValueError, "batch['labels'] has no scored label (all are -100), so the loss is NaN; drop such "
                     "batches or keep at least one label per batch.", ~scored.any())
        deferred.add(ValueError, f"label ids must lie in [0, vocab_size={vocab_size}) or be -100 (ignored) and a batch "
                     "had one outside; set vocab_size to the tokenizer's vocabulary size.", out_BS.any())
        return labels_BS.masked_fill(out_BS, IGNORE_INDEX)
    # One host sync for all three checks.
    n, lo, hi = torch.stack([
        scored.sum(), labels_BS.masked_fill(~scored, 0).min(), labels_BS.masked_fill(~scored, 0).max()
    ]).tolist() if labels_BS.numel() else (0, 0, 0)
    if n == 0:
        raise ValueError(
            f"batch['labels'] of shape {tuple(labels_BS.shape)} has no scored label (all are -100), so the loss "
            "would be NaN; drop such batches or keep at least one label per batch."
        )
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"label ids must lie in [0, vocab_size={vocab_size}) or be -100 (ignored), got [{lo}, {hi}]; set "
            "vocab_size to the tokenizer's vocabulary size."
        )
    return labels_BS


class MoELanguageModel(pl.LightningModule):
    """Trains :class:`MoETransformer` on batches ``{"tokens", "labels"}``.

    Logs ``train/loss`` (total), ``train/ce``, ``train/bits_per_token``, ``train/aux/<name>`` (summed over layers),
    ``train/maxvio_batch`` (mean over layers); at validation ``val/loss``, ``val/bits_per_token`` and, from the
    whole validation set's expert counts (mean over layers), ``val/cv``, ``val/maxvio_global``,
    ``val/load_entropy`` and ``val/dead_experts`` (total over layers). With byte-level data, bits per token is
    bits per byte.

    Model args are those of :class:`MoETransformer`; parallelism and optimiser args:

    Args:
        expert_parallel_size: P, the number of ranks that share each layer's experts (E/P each; see
            :mod:`lightning_moe.parallel`). 1 = every rank holds every expert. P > 1 needs Lightning's
            ``ModelParallelStrategy`` (``tensor_parallel_size=1``), ``backend='native'``, P dividing
            ``num_experts`` and the number of processes; the other parameters are sharded by FSDP2 over all ranks.
        lr: peak AdamW learning rate.
        weight_decay: decoupled weight decay on matrices (norms and embeddings are not decayed).
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    # Tells lightning_moe.callbacks.RouterStateUpdate that on_before_optimizer_step below already does its job.
    updates_router_states = True

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 256,
        num_experts: int = 8,
        top_k: int = 2,
        moe_every: int = 1,
        router: Router | None = None,
        activation: Activation = "swiglu",
        backend: Backend = "native",
        shared_d_ff: int = 0,
        max_seq_len: int = 512,
        expert_parallel_size: int = 1,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("warmup_steps", warmup_steps)
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}.")
        check_expert_parallel(num_experts, backend, expert_parallel_size)
        if isinstance(router, dict):  # from a checkpoint's hyper-parameters (see below)
            router = Router.from_config(router)
        self.save_hyperparameters(ignore=["router"])
        # The router is stored as its YAML config, not a pickled module, so checkpoints load with torch.load's
        # weights_only default and load_from_checkpoint rebuilds the same gating strategy.
        self.hparams["router"] = router.config() if router is not None else None
        self.model = MoETransformer(
            vocab_size, d_model, n_layers, n_heads, d_ff, num_experts, top_k, moe_every, router,
            activation, backend, shared_d_ff, max_seq_len,
        )
        self.val_load = nn.ModuleList(ExpertLoad(num_experts) for _ in moe_layers(self.model))
        # Label checks on a GPU (model.check_inputs=None), read with the layers' at the optimizer step.
        self.deferred_checks = DeferredChecks()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; a file that is not a checkpoint (truncated, empty, another format) or
        is damaged fails with a ValueError naming it (:func:`~lightning_moe.utils.check_checkpoint_file`), rather
        than torch.load's unpickling errors or a silent load of changed bytes."""
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        # Checked here, in a Trainer only (configure_model also runs in load_from_checkpoint, outside any, where an
        # expert-parallel checkpoint simply loads as one model).
        P = self.hparams.expert_parallel_size
        if P > 1 and self.device_mesh is None:
            raise ValueError(
                f"expert_parallel_size={P} needs Lightning's ModelParallelStrategy, whose device mesh the experts "
                "are sharded over; use Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1)) with N processes, or expert_parallel_size=1."
            )
        data_vocab = getattr(getattr(self.trainer, "datamodule", None), "vocab_size", None)
        if data_vocab is not None and data_vocab != self.hparams.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.hparams.vocab_size} but the data's vocab_size is {data_vocab}; "
                f"set model.init_args.vocab_size: {data_vocab}."
            )

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: shard each block, then the rest (embedding, final
        norm, head), over the data-parallel mesh; other strategies leave the model as it is. With
        ``expert_parallel_size`` P > 1 the experts are first sharded over groups of P ranks
        (:func:`lightning_moe.parallel.shard_experts`) and left out of FSDP2, which shards everything else.

        Router buffers are not sharded (FSDP2 replicates buffers) and their updates are summed over all ranks, as
        under DDP, so every rank must be a data-parallel rank: tensor parallelism is refused.
        """
        mesh = self.device_mesh
        if mesh is None:  # not ModelParallelStrategy (setup refused expert parallelism there)
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # already sharded by an earlier fit
            return
        tp = mesh["tensor_parallel"].size()
        if tp > 1:
            raise ValueError(
                f"MoELanguageModel supports ModelParallelStrategy for FSDP2 data parallelism (and expert "
                f"parallelism) only, got tensor_parallel_size={tp}; use ModelParallelStrategy("
                f"data_parallel_size={mesh.size()}, tensor_parallel_size=1)."
            )
        dp, P = mesh["data_parallel"], self.hparams.expert_parallel_size
        experts = shard_experts(self.model, expert_parallel_mesh(dp.size(), P, dp.device_type)) if P > 1 else set()
        for block in self.model.blocks:
            fully_shard(block, mesh=dp, ignored_params=experts)
        fully_shard(self.model, mesh=dp, ignored_params=experts)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Key the optimizer state by parameter position in ``self.parameters()``, as ModelParallelStrategy writes
        it, so a checkpoint of one process (or DDP) resumes under ModelParallelStrategy at any
        ``expert_parallel_size``: Lightning maps integer keys to parameter names by that position there, while a
        plain ``optimizer.state_dict()`` numbers the parameters group by group (decay, then no decay).
        ``Optimizer.load_state_dict`` reads keys only as labels matched group by group, so either numbering
        restores in one process."""
        if self.device_mesh is not None:  # ModelParallelStrategy has keyed it already
            return
        position = {id(p): i for i, p in enumerate(self.parameters())}
        for optimizer, state in zip(self.trainer.optimizers, checkpoint.get("optimizer_states", [])):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            key = {j: position[id(p)] for j, p in enumerate(params)}
            state["state"] = {key[j]: v for j, v in state["state"].items()}
            for group in state["param_groups"]:
                group["params"] = [key[j] for j in group["params"]]

    def forward(self, tokens_BS: Tensor) -> Tensor:
        return self.model(tokens_BS)

    def _ce(self, batch: dict[str, Tensor], reduction: str = "mean") -> Tensor:
        for key in ("tokens", "labels"):
            if key not in batch:
                raise ValueError(f"batch is missing {key!r}; a language-model batch needs 'tokens' and 'labels'.")
        labels_BS = batch["labels"]
        # The model's check_inputs rule: values checked at once where free (CPU), else deferred to the step.
        now = not isinstance(labels_BS, Tensor) or check_now(self.model.check_inputs, labels_BS)
        if self.model.check_inputs is not False:
            labels_BS = check_labels(labels_BS, batch["tokens"], self.hparams.vocab_size,
                                     None if now else self.deferred_checks)
        try:
            logits = self.model(batch["tokens"])
        except NonFiniteRoutingError as e:
            # Stop with where and when it happened, not a later opaque error from NaN weights.
            raise NonFiniteRoutingError(f"global step {self.global_step}, {e}") from e
        # fp32 cross-entropy: a bf16 log-softmax over the vocabulary is off by ~1e-2 nats.
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels_BS.flatten(), reduction=reduction)
        return ce.view(labels_BS.shape) if reduction == "none" else ce

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ce_BS = self._ce(batch, reduction="none")
        # Routers that learn from prediction error (precision gating) read each token's loss.
        feed_back_errors(self.model, ce_BS)
        # The mean over non-ignored labels, as reduction="mean" (check_labels made sure there is at least one, at
        # once, or at the optimizer step before this batch's update is applied).
        ce = ce_BS.sum() / (batch["labels"] != IGNORE_INDEX).sum()
        layers = moe_layers(self.model)
        aux: dict[str, Tensor] = {}
        for layer in layers:
            for name, value in layer.aux_losses.items():
                aux[name] = aux.get(name, 0) + value.float()
        loss = ce + sum(aux.values()) if aux else ce
        logs = {"train/loss": loss, "train/ce": ce, "train/bits_per_token": ce / LN2}
        logs.update({f"train/aux/{k}": v for k, v in aux.items()})
        if layers:
            # expert_counts honours expert choice's padding slots, which are not assignments.
            # check_empty=False: a layer always routes its tokens, and the emptiness test would be a host sync.
            maxvio = [load_stats(layer.routing.expert_counts(layer.experts.num_experts), check_empty=False)["maxvio"]
                      for layer in layers]
            logs["train/maxvio_batch"] = torch.stack(maxvio).mean().float()
        self.log_dict(logs, prog_bar=False, batch_size=batch["tokens"].shape[0])
        self.log("loss", ce, prog_bar=True, logger=False, batch_size=batch["tokens"].shape[0])
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except the norm under expert parallelism: expert gradients live on another mesh
        than FSDP2's, which torch's ``clip_grad_norm_`` cannot combine (:func:`lightning_moe.parallel.clip_grad_norm_`
        computes the same norm)."""
        experts_sharded = self.hparams.expert_parallel_size > 1 and self.device_mesh is not None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and experts_sharded:
            clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # On a GPU the input and routing checks of every micro-batch since the last step are read here, with one
        # host sync, before the step can apply a bad batch's update (on CPU they already ran, at once).
        raise_deferred_checks(self, self.global_step)
        # Stateful routers (bias balancing, centroids, precision) update exactly once per optimizer step,
        # after all gradient-accumulation micro-batches have been observed.
        update_router_states(self.model)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ce = self._ce(batch)
        bs = batch["tokens"].shape[0]
        self.log_dict({"val/loss": ce, "val/bits_per_token": ce / LN2}, batch_size=bs, sync_dist=True)
        for metric, layer in zip(self.val_load, moe_layers(self.model)):
            metric.update(layer.routing.assigned_N())

    def on_validation_epoch_end(self) -> None:
        # Validation has no optimizer step: its deferred checks (GPU) are read once per epoch, here.
        raise_deferred_checks(self, self.global_step)
        if not len(self.val_load):
            return
        stats = [m.compute() for m in self.val_load]
        mean = {k: torch.stack([s[k] for s in stats]).mean().float() for k in ("cv", "maxvio", "entropy")}
        self.log_dict({
            "val/cv": mean["cv"],
            "val/maxvio_global": mean["maxvio"],
            "val/load_entropy": mean["entropy"],
            "val/dead_experts": torch.stack([s["dead_experts"] for s in stats]).sum().float(),
        })
        for m in self.val_load:
            m.reset()

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
