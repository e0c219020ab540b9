"""MegaBlocks taps through the documented router seam ``scores, weights, indices = moe.router(x)``, tested on a
fake layer (MegaBlocks cannot be imported without CUDA)."""

import sys
import types

import pytest
import torch
from torch import nn

from lightning_moe.adapters import MegaBlocksTap, find_taps, record_routing


class FakeLearnedRouter(nn.Module):
    """MegaBlocks' LearnedRouter: softmax scores over [S*B, E], top-k, indices squeezed when k == 1."""

    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden, experts, bias=False)
        self.top_k = top_k

    def forward(self, x):
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        return scores, weights, indices.squeeze(-1) if self.top_k == 1 else indices


class FakeMoE(nn.Module):
    """A dMoE: ``router`` plus grouped experts with ``mlp.w1`` laid out as [E*F, H]."""

    def __init__(self, hidden=8, experts=4, ffn=6, top_k=2) -> None:
        super().__init__()
        self.args = types.SimpleNamespace(moe_num_experts=experts, moe_top_k=top_k)
        self.router = FakeLearnedRouter(hidden, experts, top_k)
        self.experts = nn.Module()
        self.experts.mlp = nn.Module()
        self.experts.mlp.w1 = nn.Parameter(torch.randn(experts * ffn, hidden))

    def forward(self, x):
        self.router(x)
        return x


@pytest.fixture
def megablocks_loaded(monkeypatch):
    """Pretend the user imported MegaBlocks: discovery only looks at modules already in ``sys.modules``."""
    module = types.ModuleType("megablocks.layers.moe")
    module.MoE = FakeMoE
    monkeypatch.setitem(sys.modules, "megablocks.layers.moe", module)


def test_not_discovered_unless_megablocks_is_imported():
    assert find_taps(nn.Sequential(FakeMoE())) == []


def test_discovered_when_megablocks_is_imported(megablocks_loaded):
    (tap,) = find_taps(nn.Sequential(FakeMoE()))
    assert isinstance(tap, MegaBlocksTap) and tap.name == "0" and tap.num_experts == 4


def test_sequence_first_tokens_are_reordered_batch_major():
    torch.manual_seed(0)
    moe = FakeMoE()
    x_SBH = torch.randn(3, 2, 8)  # Megatron layout [seq, batch, hidden]
    events = []
    tap = MegaBlocksTap("moe", moe).attach(events.append, capture_inputs=True)  # the explicit API
    moe(x_SBH)
    tap.remove()
    x_BSH = x_SBH.transpose(0, 1)
    scores = moe.router.layer(x_BSH.reshape(-1, 8)).softmax(-1)
    (event,) = events
    torch.testing.assert_close(event.scores_TE, scores)
    assert torch.equal(event.experts_TK, torch.topk(scores, 2).indices)
    torch.testing.assert_close(event.x_TD, x_BSH.reshape(-1, 8))


def test_top1_indices_get_their_slot_dimension_back(megablocks_loaded):
    moe = FakeMoE(top_k=1)
    with record_routing(moe) as events:
        moe(torch.randn(5, 8))
    assert events[0].experts_TK.shape == (5, 1) and events[0].weights_TK.shape == (5, 1)


def test_grouped_expert_weights_are_viewed_per_expert():
    moe = FakeMoE()
    tap = MegaBlocksTap("moe", moe)
    assert torch.equal(tap.expert_weight_EFD("gate")[1], moe.experts.mlp.w1[6:12])
    assert tap.router_weight_ED() is moe.router.layer.weight


def test_a_module_without_the_seam_is_rejected():
    with pytest.raises(TypeError, match="needs a module with a `router` submodule"):
        MegaBlocksTap("x", nn.Linear(2, 2))
