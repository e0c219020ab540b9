"""Offline routing probes: how much a model relies on each token's top experts (DeepSeekMoE's redundancy test,
arXiv 2401.06066 §4.5: disable the top routed experts and route to the next ones).

Legend: T tokens, K selected slots per token, E experts, R disabled experts per token (r in the text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.gating.base import Routing
from lightning_moe.layers import MoELayer

__all__ = ["mask_top_experts", "redundancy_probe"]

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
        raise ValueError(f"layers={chosen!r}: no MoELayer named {unknown!r}; the model's MoE layers are {sorted(found)!r}.")
    if isinstance(max_r, bool) or not isinstance(max_r, int) or max_r < 0:
        raise ValueError(f"max_r must be an integer >= 0, got {max_r!r}.")
    for name in chosen:
        router = found[name].router
        if max_r > min(router.top_k, router.num_experts - router.top_k):
            raise ValueError(f"max_r={max_r} is too large for layer {name!r} (K={router.top_k}, "
                             f"E={router.num_experts}); use max_r <= {min(router.top_k, router.num_experts - router.top_k)}.")
    was_training = model.training
    model.eval()
    try:
        plain = float(loss_fn(model, batch))
        curves: dict[str, list[float]] = {}
        for name in chosen:
            curves[name] = [plain]
            for r in range(1, max_r + 1):
                handle = found[name].router.register_forward_hook(lambda m, args, routing, r=r: mask_top_experts(routing, r))
                try:
                    curves[name].append(float(loss_fn(model, batch)))
                finally:
                    handle.remove()
        return curves
    finally:
        model.train(was_training)
