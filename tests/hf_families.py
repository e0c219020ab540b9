"""Every MoE family of the installed transformers, built tiny from its config, read by our taps and by hand.

Legend: T tokens, K slots, E experts.

Not a test module: ``tests/test_adapters_families.py`` runs ``python tests/hf_families.py FAMILY ...`` in a
subprocess per group of families (building ~80 model families in one process exhausted memory), and this script
prints one JSON line per family: our counts per expert and the model's own (the router's returned indices when it
returns them, otherwise the routing the block passed to its experts), skipped and dropped slots on both sides.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import torch

# A config is an MoE config when it defines one of these (source text of configuration_*.py, then the instance).
EXPERT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Tiny sizes, passed to every (sub-)config constructor so its own __post_init__ derives consistent values
# (layer_types, head_dim); a config ignores keys it does not know or keeps them as inert attributes.
TINY = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_k=2,
    top_k=2, moe_topk=2, n_group=1, topk_group=1, first_k_dense_replace=0, decoder_sparse_step=1,
    shared_expert_intermediate_size=16, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=8, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
    decoder_ffn_dim=32, encoder_sparse_step=1, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
    expert_capacity=64, ffn_hidden_size=32, n_positions=64, max_seq_len=64, sliding_window=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, mamba_n_heads=4, mamba_d_head=8,
)
# What a family needs on top of TINY to build or to route through its MoE path at all (a reason beside each).
FAMILY_OVERRIDES: dict[str, dict] = {
    "beam": dict(mlp_layer_types=["sparse", "sparse"]),  # its MoE layers are listed, not derived
    "step3p7": dict(mlp_layer_types=["sparse", "sparse"]),
    "flint": dict(mlp_only_layers=[]),
    "gemma4": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=64,
                   hidden_size_per_layer_input=8),  # the MoE block is opt-in
    "diffusion_gemma": dict(enable_moe_block=True, top_k_experts=2),
    # (time, height, width) rope sections summing to qk_rope_head_dim // 2
    "hy_v4_vl": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
    # sparse layers listed; DSA attention is NoPE; hybrid of one short-conv and one attention layer, none dense
    "glm5_next": dict(mlp_layer_types=["sparse", "sparse"], qk_rope_head_dim=0),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "glm4v_moe": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                                       "partial_rotary_factor": 0.5}),
    # one expert width per modality (text, vision); rope sections (h, w, t) over head_dim // 2 = 4 frequencies
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[16, 16], text_config=dict(
        moe_intermediate_size=[16, 16],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})),
    # MLA with a single key/value head and 4-wide rope halves, as its attention's shapes require
    "mistral4": dict(num_key_value_heads=1, qk_rope_head_dim=4, qk_nope_head_dim=4),
    "mimo_v2_flash": dict(num_key_value_heads=1, qk_rope_head_dim=4, qk_nope_head_dim=4),
    "deepseek_ocr2": dict(text_config=dict(mlp_layer_types=["sparse", "sparse"])),  # sparse layers are listed
    "dbrx": dict(d_model=16, n_heads=2, n_layers=2, attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=16)),  # its own field names
    "zaya": dict(num_experts_per_tok=1),  # its config validator: "ZAYA currently supports num_experts_per_tok=1"
    "longcat_flash": dict(zero_expert_num=2),  # two identity experts, so zero-computation slots occur
    # capacities small enough that a 10-token forward drops choices
    "switch_transformers": dict(expert_capacity=2),
    "nllb_moe": dict(expert_capacity=2, moe_eval_capacity_token_fraction=0.2),
}
TOKENS_BS = (2, 5)
MAX_PARAMETER = 1 << 23  # elements of the largest parameter of a model that counts as tiny


def moe_families() -> list[str]:
    """transformers.models.<family> folders whose configuration source names an expert count."""
    import transformers.models

    root = Path(transformers.models.__file__).parent
    pattern = re.compile(r"\b(" + "|".join(EXPERT_ATTRIBUTES) + r")\b")
    return sorted(
        d.name for d in root.iterdir()
        if d.is_dir() and any(pattern.search(f.read_text()) for f in d.glob("configuration_*.py"))
    )


def _model_types(family: str) -> list[tuple[str, str, str]]:
    """(model_type, config class name, base model class name) of the family's configs that have a base model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return [
        (t, c, MODEL_MAPPING_NAMES[t]) for t, c in CONFIG_MAPPING_NAMES.items()
        if model_type_to_module_name(t) == family and isinstance(MODEL_MAPPING_NAMES.get(t), str)
    ]


def _is_moe(config) -> bool:
    return any(isinstance(getattr(config, a, None), int) and getattr(config, a) > 1 for a in EXPERT_ATTRIBUTES)


def _sub_kwargs(config_cls, kwargs: dict, overrides: dict) -> dict:
    """Nested configs (text / vision / attention / ffn, and theirs in turn) shrunk by handing each the same sizes;
    an override named after a nested config applies to it alone."""
    names = getattr(config_cls, "sub_configs", {}) or {}
    shared = {k: v for k, v in kwargs.items() if k not in names}
    return {n: {**shared, **_sub_kwargs(sub_cls, shared, {}), **overrides.get(n, {})} for n, sub_cls in names.items()}


def build(family: str):
    """The family's smallest model with an MoE path: the text sub-model of a multimodal family."""
    import importlib

    import transformers

    from lightning_moe.adapters import find_taps

    candidates = _model_types(family)
    if not candidates:
        raise LookupError(f"no base model class for any config of transformers.models.{family}")
    # Prefer a text-only sub-model (fewer parts to shrink), then the family's own type.
    candidates.sort(key=lambda c: (not c[0].endswith("_text"), c[0] != family))
    errors, fallback = [], None
    for model_type, config_name, model_name in candidates:
        try:
            config_cls = getattr(transformers, config_name)
            kwargs = {**TINY, **FAMILY_OVERRIDES.get(family, {})}
            overrides = FAMILY_OVERRIDES.get(family, {})
            config = config_cls(**{**kwargs, **_sub_kwargs(config_cls, kwargs, overrides)})
            if not _is_moe(config) and not any(_is_moe(getattr(config, s)) for s in config.sub_configs or {}):
                errors.append(f"{model_type}: config has no experts")
                continue
            torch.manual_seed(0)
            model_cls = getattr(importlib.import_module(f"transformers.models.{family}"), model_name, None) \
                or getattr(transformers, model_name)
            # Sized on the meta device first: a nested config TINY does not reach would otherwise allocate the
            # full model (one such default took 23 GB) and take the whole group's subprocess down.
            with torch.device("meta"):
                numel, name = max((p.numel(), n) for n, p in model_cls(config).named_parameters())
            if numel > MAX_PARAMETER:
                errors.append(f"{model_type}: not tiny, parameter {name} has {numel} elements")
                continue
            model = model_cls(config).eval()
            if find_taps(model):
                return model, config
            errors.append(f"{model_type}: no tap found in {model_name}")
            fallback = fallback or (model, config)
        except Exception as err:  # noqa: BLE001 - try the next config of the family, report all
            errors.append(f"{model_type}: {type(err).__name__}: {str(err)[:300]}")
    if fallback is not None:  # built, but no tap finds a block: reported as such, not as a build error
        print("; ".join(errors), file=sys.stderr)
        return fallback
    raise RuntimeError("; ".join(errors))


def _inputs(model, config) -> dict:
    import inspect

    g = torch.Generator().manual_seed(1)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 64)
    ids_BS = torch.randint(3, min(vocab, 64), TOKENS_BS, generator=g)
    params = inspect.signature(model.forward).parameters
    inputs = {"input_ids": ids_BS}
    if "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids_BS
    return inputs


def _own_selection_TK(router, out) -> torch.Tensor | None:
    """The selection a router returned, in the router's own terms (ids >= E for extra classes)."""
    if not isinstance(out, tuple):
        return None
    if len(out) >= 3 and isinstance(out[2], torch.Tensor) and not out[2].is_floating_point():
        index_TK = out[2].reshape(-1, out[2].shape[-1])
        biases_C = getattr(router, "balancing_biases", None)
        if biases_C is not None:
            # ZAYA rewrites its skip class as expert 0 (weight 0) before returning: redo its own biased top-k
            # (modeling_zaya.ZayaRouter.forward) so the skip slots keep their class id E.
            probs_TC = torch.softmax(out[0].float(), dim=-1) + biases_C
            index_TK = probs_TC.topk(index_TK.shape[-1], dim=-1).indices
        return index_TK
    if len(out) == 2 and getattr(router, "top_k", None):  # Llama4: (dense scores, logits), top-k of the logits
        logits_TE = out[1].reshape(-1, out[1].shape[-1])
        return logits_TE.topk(router.top_k, dim=-1).indices
    return None


def _dispatched(out) -> tuple[torch.Tensor, int]:
    """A capacity router's kept (token, expert) pairs per expert and its dropped choices, from its outputs:
    Switch's one-hot dispatch (top-1), NLLB's combine weights (top-2, zero where dropped)."""
    dispatch, probs, logits = out
    E = logits.shape[-1]
    kept_TE = (probs.reshape(-1, E) > 0) if probs.shape[-1] == E else (dispatch.reshape(-1, E) > 0)
    k = 2 if probs.shape[-1] == E else 1
    return kept_TE.sum(0), kept_TE.shape[0] * k - int(kept_TE.sum())


def _reference_hooks(model, taps) -> tuple[dict, list]:
    """The model's own selection per tapped block: what its router returned, else what the block gives its
    experts. Recorded with hooks of our own, independent of the taps' reading."""
    seen: dict[str, list] = {t.name: [] for t in taps}
    handles = []
    for tap in taps:
        router = getattr(tap, "router", None)

        def on_router(m, a, out, name=tap.name):
            if hasattr(m, "expert_capacity"):  # capacity router: what it dispatched, not what it chose
                seen[name].append(("dispatch", _dispatched(out)))
                return
            if isinstance(out, tuple) and len(out) == 5 and isinstance(out[3], list):  # JetMoE: expert_size
                seen[name].append(("sizes", torch.tensor(out[3])))
                return
            index_TK = _own_selection_TK(m, out)
            if index_TK is not None:
                seen[name].append(("router", index_TK.detach().clone()))

        def on_experts(m, args, kwargs, name=tap.name):
            values = list(args) + list(kwargs.values())
            if len(values) >= 3 and not values[1].is_floating_point():
                seen[name].append(("experts", values[1].detach().reshape(-1, values[1].shape[-1]).clone()))

        if isinstance(router, torch.nn.Module):
            handles.append(router.register_forward_hook(on_router))
        experts = getattr(tap, "experts", None)
        if isinstance(experts, torch.nn.Module):
            handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    return seen, handles


def probe(family: str) -> dict:
    from lightning_moe.adapters import find_taps, record_routing

    model, config = build(family)
    with torch.no_grad():  # router weights start at zero in some families: random rows avoid tied top-k
        for tap in find_taps(model):
            w_ED = tap.router_weight_ED()
            if w_ED is not None:
                w_ED.normal_()
            # ZAYA initialises its skip class's balancing bias to -1, so at random init it is never chosen: a
            # zero bias lets skip slots occur in a 10-token forward.
            biases_C = getattr(getattr(tap, "router", None), "balancing_biases", None)
            if biases_C is not None:
                biases_C.zero_()
    taps = find_taps(model)
    result = {"family": family, "model": type(model).__name__, "taps": [t.name for t in taps],
              "adapters": sorted({type(t).__name__ for t in taps})}
    if not taps:
        return result
    seen, handles = _reference_hooks(model, taps)
    inputs = _inputs(model, config)
    import warnings

    with warnings.catch_warnings(record=True) as caught, record_routing(model) as events, torch.no_grad():
        warnings.simplefilter("always")
        model(**inputs)
    for h in handles:
        h.remove()
    result["warnings"] = [str(w.message)[:300] for w in caught if "cannot read" in str(w.message)]
    num_experts = {t.name: t.num_experts for t in taps}
    ours: dict[str, list] = {}
    for e in events:
        keep_TK = e.mask_TK if e.mask_TK is not None else torch.ones_like(e.experts_TK, dtype=torch.bool)
        E = num_experts[e.layer]
        counts_E = torch.bincount(e.experts_TK[keep_TK], minlength=E)
        ours.setdefault(e.layer, []).append({
            "counts": counts_E.tolist(), "scores_columns": None if e.scores_TE is None else e.scores_TE.shape[-1],
            "skipped": 0 if e.skipped_TK is None else int(e.skipped_TK.sum()),
            "dropped": 0 if e.dropped_TK is None else int(e.dropped_TK.sum()),
        })
    theirs: dict[str, list] = {}
    for name, records in seen.items():
        # One record per block call; a router-returned selection is the model's own, preferred when present.
        kinds = {k for k, _ in records}
        kind = next(k for k in ("dispatch", "sizes", "router", "experts") if k in kinds or k == "experts")
        for _, index_TK in (r for r in records if r[0] == kind):
            E = num_experts[name]
            if kind == "sizes":  # the router's own tokens-per-expert
                theirs.setdefault(name, []).append({"counts": index_TK.tolist(), "skipped": 0, "dropped": 0,
                                                    "source": kind})
                continue
            if kind == "dispatch":
                counts_E, dropped = index_TK
                theirs.setdefault(name, []).append({"counts": counts_E.tolist(), "skipped": 0, "dropped": dropped,
                                                    "source": kind})
                continue
            real = index_TK[(index_TK >= 0) & (index_TK < E)]
            theirs.setdefault(name, []).append({"counts": torch.bincount(real, minlength=E)[:E].tolist(),
                                                "skipped": int((index_TK >= E).sum()), "dropped": 0,
                                                "source": kind})
    result.update(ours=ours, theirs=theirs, num_experts=num_experts)
    return result


if __name__ == "__main__":
    # Import this checkout's package, not an installed one (the script's own folder is sys.path[0]).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(1)
    import time

    for fam in sys.argv[1:] or moe_families():
        start = time.perf_counter()
        try:
            out = probe(fam)
        except Exception as err:  # noqa: BLE001 - one family's failure must not hide the others'
            out = {"family": fam, "error": f"{type(err).__name__}: {str(err)[:800]}",
                   "trace": traceback.format_exc()[-1500:]}
        out["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(out), flush=True)
