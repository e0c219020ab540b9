"""Taps are guests: a block a tap cannot read warns once and drops out; Llama4's call convention is read."""

import warnings

import pytest
import torch
from torch import nn

from lightning_moe.adapters import HuggingFaceMoeTap, record_routing


class OddExperts(nn.Module):
    """Looks like a transformers experts module but is called with the hidden states alone."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 2
        self.gate_up_proj = nn.Parameter(torch.ones(2, 4, 3))

    def forward(self, hidden):
        return hidden * 2


class OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.experts = nn.Linear(3, 2), OddExperts()

    def forward(self, x):
        self.gate(x)
        return self.experts(x)


def test_a_tap_that_cannot_read_a_block_warns_once_names_it_and_removes_itself():
    model = nn.Sequential(OddBlock())
    x = torch.ones(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with record_routing(model) as events:
            y1, y2 = model(x), model(x)
    messages = [str(w.message) for w in caught if "cannot read MoE block" in str(w.message)]
    assert len(messages) == 1 and "'0'" in messages[0] and "OddBlock" in messages[0]
    assert events == [] and torch.equal(y1, x * 2) and torch.equal(y2, x * 2)


@pytest.fixture(scope="module")
def llama4():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Llama4TextConfig(
        vocab_size=32, hidden_size=16, intermediate_size=8, intermediate_size_mlp=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        interleave_moe_layer_step=1)
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(cfg).eval()


def test_llama4_routing_is_read_and_matches_its_router(llama4):
    x = torch.randint(0, 32, (2, 5))
    router = llama4.model.layers[0].feed_forward.router
    seen = {}
    handle = router.register_forward_hook(lambda m, a, out: seen.update(scores=out[0], logits=out[1]))
    with record_routing(llama4) as events:
        llama4(x)
    handle.remove()
    (event,) = events
    expected_TK = seen["logits"].topk(2, dim=-1).indices
    assert torch.equal(event.experts_TK, expected_TK)
    assert torch.equal(event.weights_TK, seen["scores"].gather(1, expected_TK))
    assert isinstance(HuggingFaceMoeTap("moe", llama4.model.layers[0].feed_forward), HuggingFaceMoeTap)


def test_the_llama4_forward_is_unchanged_by_the_tap(llama4):
    x = torch.randint(0, 32, (2, 5))
    reference = llama4(x).logits
    with record_routing(llama4):
        tapped = llama4(x).logits
    assert torch.equal(reference, tapped)


def test_every_unreadable_family_is_a_real_transformers_model_and_shown_in_the_readme():
    import importlib
    from pathlib import Path

    from lightning_moe.adapters import UNREADABLE_FAMILIES

    pytest.importorskip("transformers")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for family, reason in UNREADABLE_FAMILIES.items():
        importlib.import_module(f"transformers.models.{family}")
        assert f"| `{family}` | {reason} |" in readme
