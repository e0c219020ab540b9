"""Taps on our own MoELayer, discovery and the explicit tap API."""

import pytest
import torch
from torch import nn

from lightning_moe import MoELayer
from lightning_moe.adapters import MoELayerTap, RoutingEvent, Tap, attach_taps, find_taps, record_routing
from lightning_moe.models.transformer import MoETransformer


def _model():
    torch.manual_seed(0)
    return MoETransformer(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4, top_k=2)


def test_events_carry_the_layers_routing():
    model = _model()
    with record_routing(model, capture_inputs=True) as events:
        model(torch.randint(0, 32, (2, 5)))
    layers = [b.ffn for b in model.blocks]
    assert [e.layer for e in events] == ["blocks.0.ffn", "blocks.1.ffn"]
    for event, layer in zip(events, layers):
        assert event.experts_TK is layer.routing.experts_TK and event.scores_TE is layer.routing.scores_TE
        assert event.x_TD.shape == (10, 16)


def test_layers_filter_and_unknown_names():
    model = _model()
    assert [t.name for t in find_taps(model, layers=["blocks.1.ffn"])] == ["blocks.1.ffn"]
    with pytest.raises(ValueError, match=r"no MoE layer named \['blocks.7.ffn'\]; the model's MoE layers are"):
        find_taps(model, layers=["blocks.7.ffn"])


def test_a_custom_adapter_overrides_discovery():
    class Doubler(nn.Module):  # a foreign MoE: routes every token to experts 0 and 1
        def forward(self, x):
            return 2 * x

    class DoublerTap(Tap):
        @classmethod
        def matches(cls, module):
            return isinstance(module, Doubler)

        @property
        def num_experts(self):
            return 2

        def _register(self, sink, capture_inputs):
            def hook(module, args, out):
                T = args[0].shape[0]
                sink(RoutingEvent(self.name, torch.tensor([[0, 1]]).expand(T, 2), torch.full((T, 2), 0.5)))
            return [self.module.register_forward_hook(hook)]

    model = nn.Sequential(Doubler(), nn.Linear(3, 3))
    events = []
    taps = attach_taps(model, events.append, adapters=[DoublerTap])
    model(torch.zeros(4, 3))
    assert [t.name for t in taps] == ["0"] and events[0].experts_TK.shape == (4, 2)


def test_attaching_twice_is_refused_and_remove_detaches():
    layer = MoELayer(8, 16, 4, 2)
    tap = MoELayerTap("ffn", layer).attach(lambda e: None)
    with pytest.raises(ValueError, match="already attached"):
        tap.attach(lambda e: None)
    tap.remove()
    assert not layer._forward_hooks


def test_router_rows_and_expert_projections():
    layer = MoELayer(8, 16, 4, 2)
    tap = MoELayerTap("ffn", layer)
    assert tap.router_weight_ED() is layer.router.layer.weight
    assert torch.equal(tap.expert_weight_EFD("up"), layer.experts.mlp.per_expert("v1"))


def test_routing_mass_renormalises_scores_and_falls_back_to_weights():
    experts_TK = torch.tensor([[0, 2]])
    with_scores = RoutingEvent("l", experts_TK, torch.tensor([[0.6, 0.2]]), torch.tensor([[0.5, 0.5, 1.0]]))
    assert with_scores.routing_mass_TE(3).tolist() == [[0.25, 0.25, 0.5]]
    no_scores = RoutingEvent("l", experts_TK, torch.tensor([[0.6, 0.2]]))
    assert no_scores.routing_mass_TE(3)[0].tolist() == pytest.approx([0.75, 0.0, 0.25])
    assert no_scores.top1_experts_T().tolist() == [0]


def test_kept_slots_combine_slot_and_token_masks():
    event = RoutingEvent("l", torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2),
                         mask_TK=torch.tensor([[True, False], [False, False], [True, True]]))
    keep_TK = event.kept_TK(torch.tensor([True, True, False]))
    assert keep_TK.tolist() == [[True, False], [False, False], [False, False]]
    assert event.kept_T().tolist() == [True, False, True]


def test_centroid_routers_report_their_centroids_not_their_accumulators():
    from lightning_moe.gating import KMeansRouter

    layer = MoELayer(8, 16, 4, 2, router=KMeansRouter())
    assert MoELayerTap("ffn", layer).router_weight_ED() is layer.router.centroids_ED


def test_a_router_called_by_the_model_is_tapped_once_and_an_moe_layers_router_is_not():
    from lightning_moe.adapters import RouterTap
    from lightning_moe.gating import TransitionRouter

    class RouterOnly(nn.Module):  # a router-only model, like the transition study's toy
        def __init__(self):
            super().__init__()
            self.router = TransitionRouter()
            self.router.bind(16, 4, 4)
            self.moe = MoELayer(16, 32, 4, top_k=2)

        def forward(self, x):
            return self.router(x), self.moe(x)

    model = RouterOnly()
    taps = find_taps(model)
    assert [(type(t).__name__, t.name) for t in taps] == [("RouterTap", "router"), ("MoELayerTap", "moe")]
    with record_routing(model) as events:
        routing, _ = model(torch.randn(2, 3, 16))
    event = events[0]
    assert event.layer == "router" and event.experts_TK is routing.experts_TK and event.scores_TE is routing.scores_TE
    assert taps[0].num_experts == 4 and isinstance(taps[0], RouterTap)
