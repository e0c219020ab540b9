"""Offline routing probes: how much a model relies on each token's top experts (DeepSeekMoE's redundancy test,
arXiv 2401.06066 §4.5: disable the top routed experts and route to the next ones).

Legend: T tokens, K selected slots per token, E experts, R disabled experts per token (r in the text).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.data.batch import IGNORE_INDEX
from lightning_moe.gating.base import Routing
from lightning_moe.layers import MoELayer

__all__ = ["language_model_loss", "mask_top_experts", "redundancy_probe"]

LossFn = Callable[[nn.Module, Any], Tensor]


def mask_top_experts(routing: Routing, r: int) -> Routing:
    """``routing`` with each token's ``r`` highest-weight experts disabled: the token goes to the top-K of its
    remaining scores instead, with weights proportional to those scores and the same total weight as before
    (renormalised routers keep weights summing to 1; ``route_scale`` and unnormalised weights keep their mass).

    Selection is by ``scores_TE`` (for bias-balanced routers: without the bias). Needs token-choice routing
    (no ``mask_TK``) and ``r <= K``, ``r <= E - K``.
    """
    if routing.mask_TK is not None:
        raise TypeError("mask_top_experts needs token-choice routing (a fixed K per token); expert choice pads "
                        "slots (mask_TK), so it has no per-token top experts to disable.")
    experts_TK, weights_TK, scores_TE = routing.experts_TK, routing.weights_TK, routing.scores_TE
    K, E = experts_TK.shape[1], scores_TE.shape[1]
    if not 0 <= r <= min(K, E - K):
        raise ValueError(f"r={r} must lie in [0, min(K={K}, E-K={E - K})]: a token can only lose its own K experts "
                         "and needs r others to take their place.")
    if r == 0:
        return routing
    # Stable sort: equal weights disable the earlier slot first, the same choice on every run.
    order_TK = torch.sort(weights_TK.detach(), dim=1, descending=True, stable=True).indices
    disabled_TR = experts_TK.gather(1, order_TK[:, :r])
    masked_TE = scores_TE.detach().scatter(1, disabled_TR, float("-inf"))
    new_scores_TK, new_experts_TK = masked_TE.topk(K, dim=1)
    mass_T1 = weights_TK.sum(dim=1, keepdim=True)
    new_weights_TK = (new_scores_TK / new_scores_TK.sum(dim=1, keepdim=True) * mass_T1).to(weights_TK.dtype)
    return Routing(new_experts_TK, new_weights_TK, scores_TE, routing.logits_TE, routing.aux_losses)


@torch.no_grad()
def redundancy_probe(
    model: nn.Module, batch: Any, loss_fn: LossFn, max_r: int = 1, layers: Sequence[str] | None = None
) -> dict[str, list[float]]:
    """Loss on ``batch`` with each token's top-r experts disabled in one MoE layer at a time, r = 0..max_r.

    ``loss_fn(model, batch)`` returns a scalar loss. The model runs in eval mode under ``no_grad`` (stateful
    routers observe nothing); the masking is a forward hook on the layer's router (:func:`mask_top_experts`)
    that is removed after each evaluation, and the training mode is restored, also when ``loss_fn`` raises.
    ``[0]`` of each list is the plain model's loss. A loss that grows fast with r means the layer's top experts
    are hard to replace (little redundancy); a flat curve means the next experts know the same things.

    Args:
        model: a module containing lightning_moe ``MoELayer`` s.
        batch: what ``loss_fn`` takes.
        loss_fn: ``(model, batch) -> scalar loss``.
        max_r: largest number of disabled experts per token (<= K and <= E - K of every probed layer).
        layers: module paths of the layers to probe (as in ``model.named_modules()``); default all.

    Returns:
        ``{layer: [loss at r=0, r=1, ..., r=max_r]}``.
    """
    found = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not found:
        raise ValueError(f"redundancy_probe found no lightning_moe MoELayer in {type(model).__name__}.")
    chosen = list(layers) if layers is not None else list(found)
    unknown = [n for n in chosen if n not in found]
    if unknown:
        raise ValueError(f"layers={chosen!r}: no MoELayer named {unknown!r}; the model's MoE layers are "
                         f"{sorted(found)!r}.")
    if isinstance(max_r, bool) or not isinstance(max_r, int) or max_r < 0:
        raise ValueError(f"max_r must be an integer >= 0, got {max_r!r}.")
    for name in chosen:
        router = found[name].router
        largest = min(router.top_k, router.num_experts - router.top_k)
        if max_r > largest:
            raise ValueError(f"max_r={max_r} is too large for layer {name!r} (K={router.top_k}, "
                             f"E={router.num_experts}); use max_r <= {largest}.")
    was_training = model.training
    model.eval()
    try:
        plain = float(loss_fn(model, batch))
        curves: dict[str, list[float]] = {}
        for name in chosen:
            curves[name] = [plain]
            for r in range(1, max_r + 1):
                hook = lambda m, args, routing, r=r: mask_top_experts(routing, r)  # noqa: E731 - bind r now
                handle = found[name].router.register_forward_hook(hook)
                try:
                    curves[name].append(float(loss_fn(model, batch)))
                finally:
                    handle.remove()
        return curves
    finally:
        model.train(was_training)


def language_model_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy (fp32, labels of -100 ignored) of ``model(batch["tokens"])`` against
    ``batch["labels"]``: a ``loss_fn`` for :func:`redundancy_probe` on any of our language models."""
    logits_BSV = model(batch["tokens"])
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


def main(argv: list[str] | None = None) -> int:
    """``lightning-moe probe``: the redundancy probe of a checkpoint on the first validation batches of its recipe;
    prints a markdown table of the mean loss per layer and r."""
    p = argparse.ArgumentParser(prog="lightning-moe probe", description=main.__doc__)
    p.add_argument("--config", required=True, help="the recipe the checkpoint was trained with (model and data)")
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by the Trainer for that recipe")
    p.add_argument("--max_r", type=int, default=1, help="largest number of disabled experts per token")
    p.add_argument("--batches", type=int, default=4, help="validation batches to average over")
    a = p.parse_args(argv)
    if a.batches < 1:
        p.error(f"--batches must be >= 1, got {a.batches}.")
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_moe.cli import MoECLI  # here: `lightning-moe fit` never pays for the probe, nor the reverse

    cli = MoECLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", a.config], save_config_callback=None, parser_kwargs={"default_env": False})
    module, data = cli.model, cli.datamodule
    module.load_state_dict(torch.load(a.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    data.setup("validate")
    sums: dict[str, list[float]] = {}
    n = 0
    for batch in data.val_dataloader():
        for layer, curve in redundancy_probe(module, batch, language_model_loss, a.max_r).items():
            sums[layer] = [s + c for s, c in zip(sums.get(layer, [0.0] * len(curve)), curve)]
        n += 1
        if n == a.batches:
            break
    header = "| layer | " + " | ".join(f"r={r}" for r in range(a.max_r + 1)) + " |"
    lines = [f"Redundancy probe: mean validation loss over {n} batches with each token's top-r experts disabled",
             "", header, "|" + "---|" * (a.max_r + 2)]
    lines += [f"| `{layer}` | " + " | ".join(f"{v / n:.4f}" for v in curve) + " |" for layer, curve in sums.items()]
    print("\n".join(lines))
    return 0
