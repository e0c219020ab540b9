"""ExpertChoice: exact per-expert capacity, output against a per-expert reference, causal refusal."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoELayer
from lightning_moe.gating import ExpertChoice
from lightning_moe.models import MoETransformer


def bound(router, d=8, e=4, k=2):
    router.bind(d, e, k)
    return router


def test_every_expert_gets_exactly_k_tokens_of_every_sequence():
    router = bound(ExpertChoice(capacity_factor=2.0))  # k = 8 * 2 / 4 = 4 per sequence
    r = router(torch.randn(3, 8, 8))
    assert router.tokens_per_expert(8) == 4
    assert (r.mask_TK.view(3, 8, 4).sum(dim=1) == 4).all()
    assert ((r.weights_TK > 0) == r.mask_TK).all()
    assert r.expert_counts(4).tolist() == [12, 12, 12, 12]


def test_position_grouping_picks_k_tokens_among_the_batch_at_each_position():
    router = bound(ExpertChoice(capacity_factor=2.0, group="position"))  # k = 4 * 2 / 4 = 2 per position
    r = router(torch.randn(4, 5, 8))
    assert (r.mask_TK.view(4, 5, 4).sum(dim=0) == 2).all()


def test_chosen_weights_are_the_top_scores_of_each_expert():
    router = bound(ExpertChoice(capacity_factor=1.0))  # k = 6 * 1 / 4 -> 2
    r = router(torch.randn(1, 6, 8))
    for e in range(4):
        top = torch.topk(r.scores_TE[:, e], 2)
        assert set(torch.nonzero(r.mask_TK[:, e]).flatten().tolist()) == set(top.indices.tolist())
        torch.testing.assert_close(r.weights_TK[top.indices, e], top.values)


def per_expert_reference(layer, x_BSD, scores_BSE, k):
    """Zhou et al.: per sequence, G, I = TopK(S^T, k); X_out[l] = sum_{i,j} P[i,j,l] G[i,j] FFN_i(X[I[i,j]])."""
    w1, v1, w2 = (layer.experts.mlp.per_expert(n) for n in ("w1", "v1", "w2"))
    out = torch.zeros_like(x_BSD)
    for b in range(x_BSD.shape[0]):
        for i in range(scores_BSE.shape[-1]):
            G, I = torch.topk(scores_BSE[b, :, i], k)
            x_in = x_BSD[b, I]
            y = (F.silu(x_in @ w1[i].T) * (x_in @ v1[i].T)) @ w2[i]
            out[b].index_add_(0, I, G.unsqueeze(-1) * y)
    return out


def test_layer_output_equals_the_per_expert_reference():
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=ExpertChoice(capacity_factor=2.0))
    x = torch.randn(2, 6, 8)
    y = layer(x)
    scores = torch.softmax(layer.router.layer(x).float(), dim=-1)
    torch.testing.assert_close(y, per_expert_reference(layer, x, scores, k=3), rtol=1e-5, atol=1e-6)


def test_unchosen_slots_pass_no_gradient():
    router = bound(ExpertChoice(capacity_factor=1.0))
    x = torch.randn(1, 8, 8, requires_grad=True)
    r = router(x)
    (unchosen,) = torch.autograd.grad(r.weights_TK[~r.mask_TK].sum(), x, retain_graph=True, materialize_grads=True)
    (chosen,) = torch.autograd.grad(r.weights_TK[r.mask_TK].sum(), x)
    assert (unchosen == 0).all() and chosen.abs().sum() > 0


@pytest.mark.parametrize("n,c,e,k", [(8, 2.0, 4, 4), (3, 1.0, 8, 1), (4, 8.0, 2, 4), (10, 1.0, 4, 2)])
def test_tokens_per_expert_rounds_and_stays_within_the_group(n, c, e, k):
    assert bound(ExpertChoice(capacity_factor=c), e=e).tokens_per_expert(n) == k


TINY = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=16)


def test_sequence_grouping_is_refused_in_a_causal_model():
    with pytest.raises(ValueError, match=r"cannot run in a causal model\. Use group='position'"):
        MoETransformer(**TINY, router=ExpertChoice(group="sequence"))


def test_causal_model_accepts_position_grouping_or_an_explicit_opt_in():
    for router in (ExpertChoice(group="position"), ExpertChoice(group="sequence", allow_non_causal=True)):
        MoETransformer(**TINY, router=router)(torch.randint(0, 32, (2, 8)))


def test_refusal_also_applies_when_causal_is_set_after_binding():
    router = bound(ExpertChoice())
    router.causal = True
    with pytest.raises(ValueError, match="allow_non_causal=True"):
        router(torch.randn(1, 4, 8))


def test_position_grouping_never_looks_ahead():
    model = MoETransformer(**TINY, router=ExpertChoice(group="position")).eval()
    tokens = torch.randint(0, 32, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 32
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be > 0, got 0.0"),
        (dict(group="batch"), ValueError, "Unknown group 'batch'; choose one of 'sequence', 'position'"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExpertChoice(**kwargs)
