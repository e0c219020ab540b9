"""Tap for Hugging Face ``transformers`` sparse MoE blocks (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...).

Legend: T tokens, K slots, E experts, F expert width, D hidden size.

The seam (transformers >= 5): a sparse MoE block owns ``experts``, one module holding every expert's weights
stacked (``gate_up_proj`` ``[E, 2F, D]``, or ``up_proj`` without a GLU; layout flags ``has_gate``,
``is_transposed``, ``is_concatenated`` set by ``transformers.integrations.moe.use_experts_implementation``), and
calls it as ``experts(hidden_TD, top_k_index_TK, top_k_weights_TK)`` with the routing it will actually apply; a
router child (``gate`` or ``router``) returns the router logits, alone or first in a tuple. A forward pre-hook on
``experts`` therefore sees exactly what the block routes, whatever selection rule (softmax top-k, group-limited,
bias-corrected) the model family uses. Nothing here imports ``transformers``.

DBRX's experts keep the MegaBlocks layout (``mlp.w1/v1/w2`` 2-D ``[E*F, D]``) behind the same call, and are read
the same way.

Skip / zero-computation experts: some routers score C > E classes, the extra ones computing nothing (ZAYA's skip
class) or the identity (LongCat-Flash's zero experts, ids >= E). Those slots are not expert work: they are
reported in ``RoutingEvent.skipped_TK`` and masked out of ``mask_TK``, and ``scores_TE`` keeps the E real columns.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.adapters.base import Projection, Sink, Tap, find_rows_ED
from lightning_moe.adapters.events import RoutingEvent
from lightning_moe.utils import check_choice

ScoreFunction = Literal["auto", "softmax", "sigmoid"]

# The one table of transformers MoE families this adapter does not read yet, with the reason; the README shows it.
# A family missing from here is expected to be read correctly (taps discovered, counts equal to its router's).
UNREADABLE_FAMILIES: dict[str, str] = {
    "doge": "cross-domain MoE by product-key retrieval over embedding experts, no top-k block seam",
    "vitpose_backbone": "experts are picked by the `dataset_index` the caller passes (one part-feature head per "
                        "dataset), no router; no base model in the auto mapping",
    "nemotron3_5_transcribe": "not checked: its speech-LM config (`nemo_speechlm`) does not take the tiny sizes "
                              "(its audio config's `hidden_size` is a read-only property); its language model is "
                              "NemotronH's, which is read",
}
STACKED_WEIGHTS = ("gate_up_proj", "up_proj")
ROUTER_ATTRIBUTES = ("gate", "router")


def _real_experts(experts: nn.Module) -> int | None:
    """E, the experts that compute: ``num_experts``, or LongCat-Flash's ``num_routed_experts`` (its
    ``total_experts`` adds the zero-computation ones)."""
    return next((n for a in ("num_experts", "num_routed_experts") if isinstance(n := getattr(experts, a, None), int)),
                None)


def _rows_EFD(experts: nn.Module, projection: Projection) -> Tensor | None:
    """DBRX's MegaBlocks-style layout: ``experts.mlp.w1`` (gate) and ``v1`` (up) as 2-D ``[E*F, D]``, viewed
    ``[E, F, D]``; None for any other layout."""
    w = getattr(getattr(experts, "mlp", None), "w1" if projection == "gate" else "v1", None)
    E = _real_experts(experts)
    if not isinstance(w, Tensor) or w.dim() != 2 or not E or w.shape[0] % E:
        return None
    return w.view(E, w.shape[0] // E, w.shape[1])


class HuggingFaceMoeTap(Tap):
    """Routing events from one transformers sparse MoE block.

    Args:
        name: layer name carried by the events.
        module: the sparse MoE block (``MixtralSparseMoeBlock``, ``OlmoeSparseMoeBlock``, ...).
        score_function: how router logits become ``scores_TE``. ``auto``: sigmoid for routers that carry a
            score-correction bias (DeepSeek-V3-style loss-free balancing) or whose config says
            ``scoring_func="sigmoid"``, softmax otherwise.
    """

    def __init__(self, name: str, module: nn.Module, score_function: ScoreFunction = "auto") -> None:
        if not self.matches(module):
            raise TypeError(
                f"HuggingFaceMoeTap needs a transformers sparse MoE block whose `experts` stacks the expert weights "
                f"(transformers >= 5), got {type(module).__name__}."
            )
        check_choice("score_function", score_function, ("auto", "softmax", "sigmoid"))
        super().__init__(name, module)
        self.experts: nn.Module = module.experts
        self.router: nn.Module | None = next(
            (m for a in ROUTER_ATTRIBUTES if isinstance(m := getattr(module, a, None), nn.Module)), None
        )
        if score_function == "auto":
            config = getattr(self.experts, "config", None)
            bias_corrected = hasattr(self.router, "e_score_correction_bias")
            dense = len(inspect.signature(self.experts.forward).parameters) == 1  # Llama4: sigmoid of the logits
            sigmoid = bias_corrected or dense or getattr(config, "scoring_func", "") == "sigmoid"
            score_function = "sigmoid" if sigmoid else "softmax"
        self.score_function = score_function
        # Bound once: the experts' forward takes (hidden, index, weights) positionally or by keyword.
        self._signature = inspect.signature(self.experts.forward)
        # Experts called with the hidden states alone (Llama4) take their routing from a router that returns
        # dense per-expert scores next to the logits.
        self._dense_router = len(self._signature.parameters) == 1

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or _real_experts(experts) is None:
            return False
        if any(isinstance(w := getattr(experts, a, None), Tensor) and w.dim() == 3 for a in STACKED_WEIGHTS):
            return True
        return _rows_EFD(experts, "gate") is not None

    @property
    def num_experts(self) -> int:
        return int(_real_experts(self.experts))

    def _scores(self, logits_TC: Tensor) -> Tensor:
        """``scores_TE`` over the E real experts; the normalisation runs over all C router classes first, as the
        router's own does (a skip class takes its share of the softmax)."""
        logits_TC = logits_TC.detach().reshape(-1, logits_TC.shape[-1]).float()
        scores_TC = torch.sigmoid(logits_TC) if self.score_function == "sigmoid" else torch.softmax(logits_TC, -1)
        return scores_TC[:, : self.num_experts]

    def _skipped_TK(self, index_TK: Tensor, weights_TK: Tensor, classes: int | None) -> Tensor | None:
        """Slots sent to a class that is not one of the E experts, or None when the router has no such class
        (shapes only: no host synchronisation). Ids >= E are LongCat-Flash's zero experts; ZAYA's router rewrites
        its skip slots as expert 0 with weight exactly 0 before the experts see them, and a softmax weight of a
        real selection is never exactly 0, so with extra classes a zero weight marks a skip slot."""
        E = self.num_experts
        if classes is None or classes <= E:
            return None
        return (index_TK >= E) | (weights_TK == 0)

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        pending: dict[str, Tensor] = {}

        def on_block(block: nn.Module, args: tuple) -> None:
            # A block call without a router output (an unknown router) must not reuse the previous call's logits.
            pending.clear()

        def on_router(router: nn.Module, args: tuple, output) -> None:
            if isinstance(output, (tuple, list)) and len(output) == 2 and self._dense_router:
                pending["dense_scores"], pending["logits"] = output  # Llama4: (scores_TE, logits_TE)
                return
            pending["logits"] = output[0] if isinstance(output, (tuple, list)) else output

        def on_experts(experts: nn.Module, args: tuple, kwargs: dict) -> None:
            logits = pending.pop("logits", None)
            if len(args) >= 3:
                hidden, index, weights = args[:3]
            elif len(args) + len(kwargs) >= 3:
                hidden, index, weights = list(self._signature.bind(*args, **kwargs).arguments.values())[:3]
            else:
                # Llama4's convention: ``experts(routed_in)`` on pre-weighted token copies, the routing having come
                # from the router as (dense scores [T, E] with the selected experts' weights, logits).
                dense_TE = pending.pop("dense_scores", None)
                if dense_TE is None or logits is None:
                    raise ValueError("the experts were called without routing and the router gave no dense scores")
                k = int(getattr(self.router, "top_k", 0) or getattr(self.module, "top_k", 0))
                if k < 1:
                    raise ValueError("the block's top_k is unknown")
                logits_TE = logits.reshape(-1, logits.shape[-1])
                index = logits_TE.topk(k, dim=-1).indices  # the same selection as the router's own topk
                weights = dense_TE.reshape(logits_TE.shape).gather(1, index)
                hidden = args[0] if args else next(iter(kwargs.values()))
                hidden = hidden[: logits_TE.shape[0]]  # the first of K copies is the block's input order
            scores = self._scores(logits) if logits is not None else None
            x_TD = hidden.detach().reshape(-1, hidden.shape[-1]) if capture_inputs else None
            index_TK, weights_TK = index.reshape(-1, index.shape[-1]).long(), weights.reshape(-1, weights.shape[-1])
            classes = logits.shape[-1] if logits is not None else getattr(self.experts, "total_experts", None)
            skipped_TK = self._skipped_TK(index_TK, weights_TK, classes)
            if skipped_TK is None:
                sink(RoutingEvent(self.name, index_TK, weights_TK, scores, x_TD=x_TD))
                return
            # Placeholder id 0 keeps every id in range for the counting metrics; mask_TK leaves the slot out.
            sink(RoutingEvent(self.name, index_TK.masked_fill(skipped_TK, 0), weights_TK, scores,
                              mask_TK=~skipped_TK, x_TD=x_TD, skipped_TK=skipped_TK))

        handles = [
            self.module.register_forward_pre_hook(self._guarded(on_block)),
            self.experts.register_forward_pre_hook(self._guarded(on_experts), with_kwargs=True),
        ]
        if self.router is not None:
            handles.append(self.router.register_forward_hook(self._guarded(on_router)))
        return handles

    def router_weight_ED(self) -> Tensor | None:
        hidden_size = getattr(getattr(self.experts, "config", None), "hidden_size", None) or getattr(
            self.experts, "hidden_size", None)
        if self.router is None or hidden_size is None:
            return None
        return find_rows_ED(self.router, self.num_experts, hidden_size)

    def expert_weight_EFD(self, projection: Projection) -> Tensor | None:
        e = self.experts
        if (w_EFD := _rows_EFD(e, projection)) is not None:
            return w_EFD
        transposed = getattr(e, "is_transposed", False)  # [E, D, 2F] instead of [E, 2F, D]
        w = getattr(e, "gate_up_proj", None) if getattr(e, "has_gate", True) else None
        if w is None:
            # No GLU: the single input projection serves as both "gate" and "up".
            w = getattr(e, "up_proj", None)
            return None if w is None else (w.transpose(1, 2) if transposed else w)
        w_E2FD = w.transpose(1, 2) if transposed else w
        if getattr(e, "is_concatenated", True):  # [gate; up] halves, as ``gate_up_out.chunk(2, dim=-1)`` splits
            half = w_E2FD.shape[1] // 2
            return w_E2FD[:, :half] if projection == "gate" else w_E2FD[:, half:]
        return w_E2FD[:, 0::2] if projection == "gate" else w_E2FD[:, 1::2]  # interleaved gate0, up0, gate1, ...


class HuggingFaceCapacityTap(Tap):
    """Routing events from a transformers capacity-router block (Switch Transformers top-1, NLLB-MoE top-2).

    Their routers choose the top-k experts of the logits, then drop the choices past an expert's capacity, and
    return ``(dispatch, probs, logits)``: Switch a one-hot dispatch ``[.., E]`` of the kept choice with the top
    probability ``[.., 1]``; NLLB its top-1 mask with the combine weights ``[.., E]`` (zero where not kept). The
    event's ``experts_TK`` is the choice, ``mask_TK`` the kept slots and ``dropped_TK`` the rest (NLLB's
    ``second_expert_policy="random"`` drops count there too). Experts are a per-expert ModuleDict, so no
    ``expert_weight_EFD``.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not self.matches(module):
            raise TypeError(
                f"HuggingFaceCapacityTap needs a block whose `router` has `expert_capacity` and `num_experts` "
                f"(Switch Transformers, NLLB-MoE), got {type(module).__name__}."
            )
        super().__init__(name, module)
        self.router: nn.Module = module.router
        # NLLB's router is the top-2 one (it alone has a second-expert policy); Switch's is top-1.
        self.top_k = 2 if hasattr(self.router, "second_expert_policy") else 1

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        router = getattr(module, "router", None)
        return (isinstance(router, nn.Module) and hasattr(router, "expert_capacity")
                and isinstance(getattr(router, "num_experts", None), int) and isinstance(module, nn.Module)
                and isinstance(getattr(module, "experts", None), nn.Module))

    @property
    def num_experts(self) -> int:
        return int(self.router.num_experts)

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        E = self.num_experts

        def on_router(router: nn.Module, args: tuple, output) -> None:
            dispatch, probs, logits = output
            logits_TE = logits.detach().reshape(-1, E).float()
            chosen_TK = logits_TE.topk(self.top_k, dim=-1).indices  # argmax first, as both routers choose
            if probs.shape[-1] == E:  # NLLB: combine weights, zero for a dropped choice
                weights_TK = probs.reshape(-1, E).gather(1, chosen_TK)
                kept_TK = weights_TK > 0
            else:  # Switch: the kept choice's one-hot, next to its probability
                kept_TK = dispatch.reshape(-1, E).gather(1, chosen_TK) > 0
                weights_TK = probs.reshape(-1, 1)
            hidden = args[0] if args else None
            x_TD = hidden.detach().reshape(-1, hidden.shape[-1]) if capture_inputs and hidden is not None else None
            sink(RoutingEvent(self.name, chosen_TK, weights_TK, torch.softmax(logits_TE, dim=-1), mask_TK=kept_TK,
                              x_TD=x_TD, dropped_TK=~kept_TK))

        return [self.router.register_forward_hook(self._guarded(on_router))]

    def router_weight_ED(self) -> Tensor | None:
        classifier = getattr(self.router, "classifier", None)
        return classifier.weight if isinstance(classifier, nn.Linear) else None


class HuggingFaceGatingTap(Tap):
    """Routing events from JetMoE's MoE (MLP experts) and MoA (attention experts) blocks.

    Their router (``JetMoeTopKGating``) returns the tokens already sorted by expert, ``(index_sorted, batch_index,
    batch_gates, expert_size, logits)``, so the per-token choice is read back from the logits it returns last with
    the router's own operations: ``logits.topk(top_k)`` and a softmax over the K chosen logits.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not self.matches(module):
            raise TypeError(
                f"HuggingFaceGatingTap needs a block with `input_linear` experts and a `router` that has `top_k`, "
                f"`num_experts` and a linear `layer` (JetMoE's MoE/MoA), got {type(module).__name__}."
            )
        super().__init__(name, module)
        self.router: nn.Module = module.router

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        router = getattr(module, "router", None)
        return (isinstance(getattr(module, "input_linear", None), nn.Module) and isinstance(router, nn.Module)
                and isinstance(getattr(router, "top_k", None), int)
                and isinstance(getattr(router, "num_experts", None), int)
                and isinstance(getattr(router, "layer", None), nn.Linear))

    @property
    def num_experts(self) -> int:
        return int(self.router.num_experts)

    def _register(self, sink: Sink, capture_inputs: bool) -> list[RemovableHandle]:
        def on_router(router: nn.Module, args: tuple, output) -> None:
            logits_TE = output[-1].detach().reshape(-1, self.num_experts).float()
            top_logits_TK, experts_TK = logits_TE.topk(router.top_k, dim=1)
            x_TD = args[0].detach().reshape(-1, args[0].shape[-1]) if capture_inputs else None
            sink(RoutingEvent(self.name, experts_TK, torch.softmax(top_logits_TK, dim=1),
                              torch.softmax(logits_TE, dim=-1), x_TD=x_TD))

        return [self.router.register_forward_hook(self._guarded(on_router))]

    def router_weight_ED(self) -> Tensor | None:
        return self.router.layer.weight

    def expert_weight_EFD(self, projection: Projection) -> Tensor | None:
        # The MLP experts' input_linear is [E, 2F, D], gate rows first (``chunk(2, dim=-1)`` in JetMoeMoE);
        # the attention experts' is a query projection, which has no gate.
        w = getattr(self.module.input_linear, "weight", None)
        if not hasattr(self.module, "activation") or not isinstance(w, Tensor) or w.dim() != 3:
            return None
        half = w.shape[1] // 2
        return w[:, :half] if projection == "gate" else w[:, half:]
