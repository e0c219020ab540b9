"""SigmoidTopK: auxiliary-loss-free bias balancing and the DeepSeek-V3 sequence-wise balance loss."""

import pytest
import torch

from lightning_moe.gating import Routing, SigmoidTopK, sequence_balance_loss


def bound(router, d=2, e=4, k=2):
    router.bind(d, e, k)
    return router


def routing(experts):
    experts_TK = torch.tensor(experts)
    T, K = experts_TK.shape
    return Routing(experts_TK, torch.ones(T, K), torch.zeros(T, 4))


def test_sign_rule_update_equals_the_formula_on_a_fixed_routing():
    router = bound(SigmoidTopK(bias_update_rate=0.01))
    router.observe(torch.zeros(4, 2), routing([[0, 1], [0, 1], [0, 2], [0, 3]]))  # counts (4, 2, 1, 1), mean 2
    router.update_state()
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.tensor([-1.0, 0.0, 1.0, 1.0]))


def test_one_update_from_the_counts_of_all_micro_batches():
    router = bound(SigmoidTopK(bias_update_rate=0.01))
    router.observe(torch.zeros(2, 2), routing([[0, 1], [0, 1]]))  # alone: (2, 2, 0, 0)
    router.observe(torch.zeros(2, 2), routing([[1, 2], [1, 2]]))  # summed: (2, 4, 2, 0), mean 2
    router.update_state()
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.tensor([0.0, -1.0, 0.0, 1.0]))


def test_second_update_without_new_observations_changes_nothing():
    router = bound(SigmoidTopK(bias_update_rate=0.01))
    router.observe(torch.zeros(2, 2), routing([[0, 1], [0, 2]]))
    router.update_state()
    first = router.expert_bias.clone()
    router.update_state()
    torch.testing.assert_close(router.expert_bias, first)
    assert router.pending_counts_E.sum() == 0


def _router_with_scores():
    # x = (1, 0) -> logits = first column of W -> sigmoid scores (0.73, 0.62, 0.5, 0.27)
    router = bound(SigmoidTopK(bias_update_rate=0.01))
    with torch.no_grad():
        router.layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0], [-1.0, 0.0]]))
    return router, torch.tensor([[[1.0, 0.0]]])


def test_bias_selects_but_does_not_weight():
    router, x = _router_with_scores()
    router.expert_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 1.0]))  # push expert 1 out, expert 3 in
    r = router(x)
    assert r.experts_TK.tolist() == [[3, 0]]
    s = torch.sigmoid(torch.tensor([1.0, 0.5, 0.0, -1.0]))
    torch.testing.assert_close(r.weights_TK, torch.stack([s[3], s[0]]).unsqueeze(0) / (s[3] + s[0]))
    torch.testing.assert_close(r.scores_TE, s.unsqueeze(0))


def test_route_scale_multiplies_the_renormalised_weights():
    router, x = _router_with_scores()
    router.route_scale = 2.5
    torch.testing.assert_close(router(x).weights_TK.sum(), torch.tensor(2.5))


def test_unnormalised_weights_are_the_sigmoid_scores():
    router, x = _router_with_scores()
    router.normalize_weights = False
    r = router(x)
    torch.testing.assert_close(r.weights_TK, r.scores_TE.gather(1, r.experts_TK))


def test_bias_gets_no_gradient_and_forward_does_not_change_it():
    router = bound(SigmoidTopK(sequence_balance_weight=1e-4), d=8, e=4, k=2)
    x = torch.randn(2, 5, 8)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    r = router(x)
    (r.weights_TK.sum() + sum(r.aux_losses.values())).backward()
    assert not router.expert_bias.requires_grad and router.layer.weight.grad is not None
    for k, v in router.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_sequence_balance_loss_closed_form():
    # One sequence, S=2, E=2, K=1, both tokens to expert 0: f = E/(K*S) * (2, 0) = (2, 0);
    # s' = s / sum(s) = (0.5, 0.5), (0.25, 0.75) -> P = (0.375, 0.625) -> loss = 2 * 0.375.
    scores = torch.tensor([[[1.0, 1.0], [0.25, 0.75]]])
    experts = torch.tensor([[[0], [0]]])
    assert sequence_balance_loss(scores, experts).item() == pytest.approx(0.75)


def test_sequence_balance_loss_is_one_under_uniform_routing():
    scores = torch.full((3, 4, 4), 0.3)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]).expand(3, 4, 2)
    assert sequence_balance_loss(scores, experts).item() == pytest.approx(1.0)


def deepseek_reference(scores_BSE, experts_BSK, alpha):
    """DeepSeek-V3 eq. for L_Bal, one sequence at a time, averaged over the batch."""
    B, S, E = scores_BSE.shape
    K = experts_BSK.shape[-1]
    total = 0.0
    for b in range(B):
        f = [E / (K * S) * sum(int(i in experts_BSK[b, t].tolist()) for t in range(S)) for i in range(E)]
        P = [sum(float(scores_BSE[b, t, i] / scores_BSE[b, t].sum()) for t in range(S)) / S for i in range(E)]
        total += alpha * sum(fi * pi for fi, pi in zip(f, P))
    return total / B


def test_router_sequence_loss_uses_the_bias_shifted_selection():
    router = bound(SigmoidTopK(sequence_balance_weight=1e-4), d=8, e=4, k=2)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 in every token's selection
    x = torch.randn(3, 5, 8)
    r = router(x)
    assert (r.experts_TK == 3).any(dim=1).all()
    want = deepseek_reference(r.scores_TE.detach().view(3, 5, 4), r.experts_TK.view(3, 5, 2), 1e-4)
    assert r.aux_losses["sequence_balance"].item() == pytest.approx(want, rel=1e-5)


def test_no_aux_loss_by_default():
    assert bound(SigmoidTopK(), d=8)(torch.randn(1, 3, 8)).aux_losses == {}


@pytest.mark.parametrize("field", ["bias_update_rate", "sequence_balance_weight", "route_scale"])
def test_negative_arguments_are_rejected_with_the_field_name(field):
    with pytest.raises(ValueError, match=field):
        SigmoidTopK(**{field: -1.0})


def test_top1_keeps_the_raw_score_so_the_gate_still_learns():
    router = bound(SigmoidTopK(), d=8, e=4, k=1)
    r = router(torch.randn(1, 3, 8))
    torch.testing.assert_close(r.weights_TK, r.scores_TE.gather(1, r.experts_TK))
    r.weights_TK.sum().backward()
    assert router.layer.weight.grad.abs().sum() > 0
