"""Hugging Face transformers sparse MoE blocks: the tap sees exactly the routing the model applies.

Tiny randomly initialised models from configs (2 layers, hidden 16, 4 experts, top-2); nothing is downloaded.
"""

import pytest
import torch

from lightning_moe.adapters import HuggingFaceMoeTap, find_taps, record_routing

transformers = pytest.importorskip("transformers", reason="Hugging Face adapters need the `hf` extra (transformers>=5)")

COMMON = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "num_experts_per_tok": 2, "max_position_embeddings": 32}
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, intermediate_size=32, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=4, intermediate_size=32, **COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=32,
        decoder_sparse_step=1, **COMMON),
}


def _model(name):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Router weights start at zero in some families: randomise them so top-k is not decided by ties.
    with torch.no_grad():
        for tap in find_taps(model):
            tap.router_weight_ED().normal_()
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def routed(request):
    model = _model(request.param)
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with record_routing(model, capture_inputs=True) as events, torch.no_grad():
        out = model(tokens, output_router_logits=True)
    return model, events, out.router_logits


def test_one_tap_per_sparse_moe_block(routed):
    model, events, _ = routed
    taps = find_taps(model)
    assert [t.name for t in taps] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(t, HuggingFaceMoeTap) and t.num_experts == 4 for t in taps)
    assert [e.layer for e in events] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_experts_are_the_topk_of_the_router_logits(routed):
    _, events, router_logits = routed
    for event, logits_TE in zip(events, router_logits):
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        assert torch.equal(event.experts_TK, torch.topk(probs_TE, 2, dim=-1).indices)
        torch.testing.assert_close(event.scores_TE, probs_TE)


def test_weights_are_what_the_block_mixes(routed):
    model, events, router_logits = routed
    for event, logits_TE in zip(events, router_logits):
        top_TK = torch.topk(torch.softmax(logits_TE.float(), -1), 2, dim=-1).values
        if getattr(model.config, "norm_topk_prob", True):  # Mixtral always renormalises
            top_TK = top_TK / top_TK.sum(-1, keepdim=True)
        torch.testing.assert_close(event.weights_TK.float(), top_TK)


def test_inputs_and_expert_weights_line_up(routed):
    model, events, _ = routed
    tap = find_taps(model)[0]
    assert events[0].x_TD.shape == (10, 16)
    gate_up = tap.module.experts.gate_up_proj  # [E, 2F, D], gate rows first
    assert torch.equal(tap.expert_weight_EFD("gate"), gate_up[:, :32])
    assert torch.equal(tap.expert_weight_EFD("up"), gate_up[:, 32:])
    assert tap.router_weight_ED().shape == (4, 16)


def test_taps_leave_no_hook_behind():
    model = _model("mixtral")
    with record_routing(model):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sigmoid_scored_families_get_sigmoid_scores():
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=4, n_shared_experts=1, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    (tap,) = find_taps(model)
    assert tap.score_function == "sigmoid"  # DeepSeek-V3's router carries a score-correction bias
    with record_routing(model) as events, torch.no_grad():
        out = model(torch.randint(0, 64, (2, 5)), output_router_logits=True)
    scores_TE = torch.sigmoid(out.router_logits[0].float())
    torch.testing.assert_close(events[0].scores_TE, scores_TE)
    # The correction bias is zero at initialisation, so selection is the top-k of the scores.
    assert torch.equal(events[0].experts_TK.sort(-1).values, torch.topk(scores_TE, 2).indices.sort(-1).values)


def test_transposed_interleaved_expert_weights_are_read_per_layout():
    # GPT-OSS style: gate_up_proj stored [E, D, 2F] with gate/up columns interleaved.
    block = torch.nn.Module()
    block.experts = torch.nn.Module()
    block.experts.num_experts, block.experts.is_transposed, block.experts.is_concatenated = 2, True, False
    block.experts.gate_up_proj = torch.nn.Parameter(torch.arange(2 * 3 * 4.0).view(2, 3, 4))
    tap = HuggingFaceMoeTap("block", block)
    w_E2FD = block.experts.gate_up_proj.transpose(1, 2)
    assert torch.equal(tap.expert_weight_EFD("gate"), w_E2FD[:, 0::2])
    assert torch.equal(tap.expert_weight_EFD("up"), w_E2FD[:, 1::2])


class _SkipClassBlock(torch.nn.Module):
    """A router scoring E + 1 = 3 classes over 2 experts, handing the experts a fixed routing of 3 tokens."""

    def __init__(self, index_TK, weights_TK) -> None:
        super().__init__()
        self.gate, self.experts = torch.nn.Linear(4, 3), torch.nn.Module()
        self.experts.num_experts = 2
        self.experts.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 6, 4))
        self.experts.forward = lambda hidden, index, weights: hidden
        self.index_TK, self.weights_TK = index_TK, weights_TK

    def forward(self, x_TD):
        self.gate(x_TD)
        return self.experts(x_TD, self.index_TK, self.weights_TK)


def _skip_event(index_TK, weights_TK):
    block = _SkipClassBlock(torch.tensor(index_TK), torch.tensor(weights_TK))
    with record_routing(torch.nn.Sequential(block)) as events:
        block(torch.randn(3, 4))
    return events[0]


def test_ids_beyond_the_experts_are_skipped_slots_not_experts():
    # LongCat-Flash: zero-computation experts keep their ids >= E.
    event = _skip_event([[0], [2], [1]], [[0.5], [0.3], [0.2]])
    assert event.skipped_TK.tolist() == [[False], [True], [False]]
    assert event.mask_TK.tolist() == [[True], [False], [True]]
    assert event.experts_TK.tolist() == [[0], [0], [1]]  # placeholder 0 keeps ids in range for the metrics
    assert event.scores_TE.shape == (3, 2)  # the skip class's column is not an expert's


def test_zero_weight_slots_of_a_router_with_a_skip_class_are_skipped():
    # ZAYA rewrites its skip slots as expert 0 with weight 0 before the experts see them.
    event = _skip_event([[0], [0], [1]], [[0.5], [0.0], [0.2]])
    assert event.skipped_TK.tolist() == [[False], [True], [False]]


def test_megablocks_layout_expert_weights_are_viewed_per_expert():
    # DBRX: experts.mlp.w1 (gate) and v1 (up) stacked 2-D as [E*F, D].
    block = torch.nn.Module()
    block.experts, block.experts.num_experts = torch.nn.Module(), 2
    block.experts.mlp = torch.nn.Module()
    block.experts.mlp.w1 = torch.nn.Parameter(torch.arange(6 * 4.0).view(6, 4))
    block.experts.mlp.v1 = torch.nn.Parameter(-torch.arange(6 * 4.0).view(6, 4))
    tap = HuggingFaceMoeTap("block", block)
    assert torch.equal(tap.expert_weight_EFD("gate"), block.experts.mlp.w1.view(2, 3, 4))
    assert torch.equal(tap.expert_weight_EFD("up"), block.experts.mlp.v1.view(2, 3, 4))
