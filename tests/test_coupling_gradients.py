"""The gradient coupling of arXiv 2605.12476 Sec. 3, exactly, on one token through one MoE layer (autograd).

For a token x routed to expert i with logit z_i = r_i·x: ∇_{r_i} L = γ_i·x, and every row u_k of the expert's
up-projection gets ∇_{u_k} L = δ_k·x — the same direction. With top-2 weights renormalised over the selected pair
the unselected router rows get no gradient at all; the Switch loss, whose P_j is a softmax over *all* experts,
pushes an x-directed gradient into every router row.
"""

import torch
import torch.nn.functional as F

from lightning_moe.gating import SoftmaxTopK
from lightning_moe.layers import MoELayer

D, FF, E, K = 8, 6, 4, 2
PARALLEL = 1 - 1e-5  # |cos| threshold of the spec


def one_token_grads(load_balancing_weight: float):
    """Router-row and W_up gradients of L = <y, c> (+ the layer's aux loss) for one random token."""
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, K, router=SoftmaxTopK(load_balancing_weight=load_balancing_weight, z_loss_weight=0.0))
    x = torch.randn(1, 1, D)
    y = layer(x)
    loss = (y * torch.randn_like(y)).sum() + sum(layer.aux_losses.values(), torch.zeros(()))
    loss.backward()
    selected = layer.routing.experts_TK[0].tolist()
    up_EFD = layer.experts.mlp.v1.grad.view(E, FF, D)
    return x.reshape(D), layer.router.layer.weight.grad, up_EFD, selected


def abs_cos(a, b):
    return F.cosine_similarity(a, b.expand_as(a), dim=-1).abs()


def test_selected_router_rows_get_gradients_parallel_to_the_token():
    x, router_grad_ED, _, selected = one_token_grads(0.0)
    assert (abs_cos(router_grad_ED[selected], x) > PARALLEL).all()
    assert (router_grad_ED[selected].norm(dim=1) > 0).all()


def test_every_up_projection_row_of_a_selected_expert_gets_a_gradient_parallel_to_the_token():
    x, _, up_EFD, selected = one_token_grads(0.0)
    rows_ND = up_EFD[selected].reshape(-1, D)
    assert (rows_ND.norm(dim=1) > 0).all()
    assert (abs_cos(rows_ND, x) > PARALLEL).all()


def test_without_a_balance_loss_unselected_rows_and_experts_get_no_gradient():
    _, router_grad_ED, up_EFD, selected = one_token_grads(0.0)
    unselected = [e for e in range(E) if e not in selected]
    # Zero up to rounding: the maths gives exactly 0, but the softmax backward's fp32 kernels leave ~1e-9 on some
    # CPUs (Intel AVX-512) and 0 on others, so compare against the selected rows' scale.
    eps = torch.finfo(torch.float32).eps
    assert router_grad_ED[unselected].abs().max() <= 16 * eps * router_grad_ED[selected].abs().max()
    assert up_EFD[unselected].abs().max() <= 16 * eps * up_EFD[selected].abs().max()


def test_the_switch_loss_pushes_a_token_parallel_gradient_into_every_router_row():
    x, router_grad_ED, _, _ = one_token_grads(0.01)
    assert (router_grad_ED.norm(dim=1) > 0).all()
    assert (abs_cos(router_grad_ED, x) > PARALLEL).all()
