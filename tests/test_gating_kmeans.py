"""KMeansRouter: EMA centroids, cosine scores with a sign-rule bias, no trainable parameters."""

import pytest
import torch

from lightning_moe import MoELayer
from lightning_moe.gating import KMeansRouter, Routing


def bound(router, d=2, e=3, k=1):
    router.bind(d, e, k)
    return router


def fixed(experts):
    experts_TK = torch.tensor(experts)
    return Routing(experts_TK, torch.ones(experts_TK.shape), torch.zeros(experts_TK.shape[0], 3))


def test_router_has_no_trainable_parameters():
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=KMeansRouter())
    assert list(layer.router.parameters()) == []
    assert {n for n, _ in layer.router.named_buffers()} >= {"centroids_ED", "expert_bias"}


def test_centroids_start_as_unit_vectors():
    router = bound(KMeansRouter(), d=8, e=4)
    torch.testing.assert_close(router.centroids_ED.norm(dim=-1), torch.ones(4))


def test_centroid_ema_equals_the_formula_on_fixed_inputs():
    router = bound(KMeansRouter(ema_decay=0.5, bias_update_rate=0.0))
    c0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    router.centroids_ED.copy_(c0)
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
    router.observe(x[:2], fixed([[0], [1]]))  # micro-batch 1
    router.observe(x[2:], fixed([[0]]))  # micro-batch 2: expert 0 has mean (2, 1); expert 2 gets nothing
    router.update_state()
    want = torch.stack([0.5 * c0[0] + 0.5 * torch.tensor([2.0, 1.0]), 0.5 * c0[1] + 0.5 * x[1], c0[2]])
    torch.testing.assert_close(router.centroids_ED, want)


def test_each_token_counts_once_per_selected_expert():
    router = bound(KMeansRouter(ema_decay=0.0, bias_update_rate=0.0), k=2)  # alpha=0: centroid = batch mean
    router.observe(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), fixed([[0, 1], [0, 2]]))
    router.update_state()
    torch.testing.assert_close(router.centroids_ED[:, :], torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))


def test_bias_moves_by_gamma_times_sign_of_target_share_minus_share():
    router = bound(KMeansRouter(bias_update_rate=0.01))
    router.observe(torch.ones(4, 2), fixed([[0], [0], [0], [1]]))  # f = (3/4, 1/4, 0), K/E = 1/3
    router.update_state()
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.tensor([-1.0, 1.0, 1.0]))


def test_scores_are_cosines_and_the_bias_only_selects():
    router = bound(KMeansRouter(), e=3, k=1)
    router.centroids_ED.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]]))
    router.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    x = torch.tensor([[[2.0, 0.0]]])
    r = router(x)
    torch.testing.assert_close(r.scores_TE, torch.tensor([[1.0, 2**-0.5, 0.0]]))
    assert r.experts_TK.tolist() == [[1]]  # 0.707 + 0.5 beats 1.0
    torch.testing.assert_close(r.weights_TK, torch.tensor([[2**-0.5]]))


def test_sigmoid_mixing_renormalises_sigmoid_of_dot_products():
    router = bound(KMeansRouter(mixing="sigmoid"), e=3, k=2)
    c = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    router.centroids_ED.copy_(c)
    x = torch.tensor([[[2.0, 0.5]]])
    r = router(x)
    s = torch.sigmoid(x[0] @ c.T)[0]
    assert r.experts_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights_TK, (s[:2] / s[:2].sum()).unsqueeze(0))


def test_negative_weight_fraction_counts_selected_negative_cosines():
    router = bound(KMeansRouter(), e=2, k=2)  # both experts selected for every token
    router.centroids_ED.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    router(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))  # cosines (1, -1) and (0, 0): one negative weight of four
    assert router.negative_weight_fraction.item() == pytest.approx(0.25)
    router.mixing = "sigmoid"
    router(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    assert router.negative_weight_fraction.item() == 0.0


def test_forward_and_backward_leave_the_state_alone():
    layer = MoELayer(8, 16, num_experts=4, top_k=2, router=KMeansRouter())
    before = {k: v.clone() for k, v in layer.router.state_dict().items()}
    x = torch.randn(2, 5, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.abs().sum() > 0  # identity weights are cosines of x: the layer input still gets a gradient
    for k, v in layer.router.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(ema_decay=1.0), r"ema_decay must lie in \[0, 1\), got 1.0"),
     (dict(mixing="softmax"), "Unknown mixing 'softmax'; choose one of 'scores', 'sigmoid'"),
     (dict(bias_update_rate=-1e-3), "bias_update_rate must be >= 0")],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KMeansRouter(**kwargs)
