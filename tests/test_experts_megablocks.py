"""The MegaBlocks backend: CPU tests through a small fake ``megablocks`` package, GPU parity where it is real.

The fake mirrors the parts of MegaBlocks 0.10.0 the backend touches (``Arguments``, ``dMoE`` with a ``router``
seam and ``experts.mlp.w1/w2/v1``, the global loss lists and their ``clear_*`` functions), so the backend's own
code (seam, parameter binding, list lifecycle, errors) runs for real on CPU.
"""

import dataclasses
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_moe.experts.megablocks as mb_backend
from lightning_moe.experts import Experts, MegaBlocksUnavailableError, reference_experts
from lightning_moe.gating import ExpertChoice, KMeansRouter, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import MoELayer
from tests.helpers import fixed_routing


def _fake_megablocks() -> dict[str, types.ModuleType]:
    pkg, layers = types.ModuleType("megablocks"), types.ModuleType("megablocks.layers")
    arguments, dmoe, moe, router = (types.ModuleType(f"megablocks.layers.{m}") for m in ("arguments", "dmoe", "moe", "router"))

    @dataclasses.dataclass
    class Arguments:
        hidden_size: int
        ffn_hidden_size: int
        moe_num_experts: int
        moe_top_k: int
        mlp_type: str
        mlp_impl: str
        activation_fn: object
        bias: bool
        return_bias: bool
        fp16: bool
        bf16: bool
        device: torch.device
        moe_loss_weight: float
        moe_zloss_weight: float
        moe_jitter_eps: float | None
        moe_normalize_expert_weights: float | None

    class FakeDMoE(nn.Module):
        """Appends to the global lists in training whatever the loss weights, as a careless caller would see."""

        def __init__(self, args: Arguments) -> None:
            super().__init__()
            E, Fw, D = args.moe_num_experts, args.ffn_hidden_size, args.hidden_size
            self.args = args
            self.router = nn.Linear(D, E, bias=False)
            self.experts = nn.Module()
            self.experts.mlp = nn.Module()
            for name in ("w1", "w2") + (("v1",) if args.mlp_type == "glu" else ()):
                setattr(self.experts.mlp, name, nn.Parameter(torch.zeros(E * Fw, D)))
            self.list_sizes_seen: list[tuple[int, int]] = []

        def forward(self, x):
            self.list_sizes_seen.append((len(moe._LOAD_BALANCING_LOSS), len(router._ROUTER_LOGITS)))
            scores, weights, experts = self.router(x)
            assert experts.dtype == torch.int32 and weights.dtype == x.dtype  # what the real kernels require
            a, E = self.args, self.args.moe_num_experts
            mlp = self.experts.mlp
            w1, w2 = mlp.w1.view(E, -1, a.hidden_size), mlp.w2.view(E, -1, a.hidden_size)
            out = torch.zeros_like(x)
            for k in range(experts.shape[1]):
                for e in range(E):
                    rows = experts[:, k] == e
                    h = a.activation_fn(x[rows] @ w1[e].T)
                    if a.mlp_type == "glu":
                        h = h * (x[rows] @ mlp.v1.view(E, -1, a.hidden_size)[e].T)
                    out = out.index_add(0, rows.nonzero().flatten(), (h @ w2[e]) * weights[rows, k, None])
            if self.training:
                moe._LOAD_BALANCING_LOSS.append(scores)
                router._ROUTER_LOGITS.append(scores)
            return out

    arguments.Arguments = Arguments
    dmoe.dMoE = FakeDMoE
    moe._LOAD_BALANCING_LOSS, router._ROUTER_LOGITS = [], []
    moe.clear_load_balancing_loss = moe._LOAD_BALANCING_LOSS.clear
    router.clear_router_zloss = router._ROUTER_LOGITS.clear
    pkg.layers = layers
    return {m.__name__: m for m in (pkg, layers, arguments, dmoe, moe, router)}


@pytest.fixture
def fake_megablocks(monkeypatch):
    modules = _fake_megablocks()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # The fake runs on CPU in fp32; the device/dtype guard has its own tests below.
    monkeypatch.setattr(mb_backend, "check_runnable", lambda x, w: None)
    return modules


def _pair(activation="swiglu", D=8, F_=16, E=4):
    torch.manual_seed(0)
    native = Experts(D, F_, E, activation)
    mega = Experts(D, F_, E, activation, backend="megablocks")
    mega.load_state_dict(native.state_dict())
    return native, mega


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_parameter_names_and_shapes_equal_native(fake_megablocks, activation):
    native, mega = _pair(activation)
    assert {n: p.shape for n, p in mega.named_parameters()} == {n: p.shape for n, p in native.named_parameters()}


def test_layer_checkpoint_loads_strict_across_backends(fake_megablocks):
    torch.manual_seed(0)
    native = MoELayer(8, 16, 4, 2)
    mega = MoELayer(8, 16, 4, 2, backend="megablocks")
    mega.load_state_dict(native.state_dict(), strict=True)
    native.load_state_dict(mega.state_dict(), strict=True)
    for (n, p), (m, q) in zip(native.state_dict().items(), mega.state_dict().items()):
        assert n == m and torch.equal(p, q)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_seam_and_our_weights_reach_megablocks(fake_megablocks, activation):
    native, mega = _pair(activation)
    routing = fixed_routing(6, 4, 2)
    x = torch.randn(6, 8, requires_grad=True)
    out = mega(x, routing)
    torch.testing.assert_close(out, reference_experts(native, x, routing), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert mega.mlp.w1.grad is not None and mega.mlp.w1.grad.abs().sum() > 0  # our parameter, not a copy


def test_router_of_dmoe_is_the_seam_and_holds_no_graph_after_call(fake_megablocks):
    _, mega = _pair()
    mega(torch.randn(3, 8), fixed_routing(3, 4, 2))
    (layer,) = mega._megablocks._layers.values()
    assert isinstance(layer.router, mb_backend.RoutingSeam) and layer.router.routing is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_global_lists_cleared_around_every_call(fake_megablocks, training):
    moe, router = fake_megablocks["megablocks.layers.moe"], fake_megablocks["megablocks.layers.router"]
    moe._LOAD_BALANCING_LOSS.append("stale")  # e.g. left by another MegaBlocks model in the process
    _, mega = _pair()
    mega.train(training)
    for _ in range(3):
        mega(torch.randn(3, 8), fixed_routing(3, 4, 2))
    (layer,) = mega._megablocks._layers.values()
    assert layer.training is training
    assert layer.list_sizes_seen == [(0, 0)] * 3
    assert moe._LOAD_BALANCING_LOSS == [] and router._ROUTER_LOGITS == []


def test_global_lists_stay_empty_under_activation_checkpointing(fake_megablocks):
    moe = fake_megablocks["megablocks.layers.moe"]
    _, mega = _pair()
    routing = fixed_routing(3, 4, 2)
    x = torch.randn(3, 8, requires_grad=True)
    checkpoint(mega, x, routing, use_reentrant=False).sum().backward()
    (layer,) = mega._megablocks._layers.values()
    assert layer.list_sizes_seen == [(0, 0), (0, 0)]  # forward, then the recomputation in backward
    assert moe._LOAD_BALANCING_LOSS == []


def test_one_dmoe_per_top_k(fake_megablocks):
    _, mega = _pair()
    for K in (1, 2, 2):
        mega(torch.randn(3, 8), fixed_routing(3, 4, K))
    assert sorted(k for _, k in mega._megablocks._layers) == [1, 2]


def test_megablocks_arguments_override_broken_defaults(fake_megablocks):
    _, mega = _pair()
    mega(torch.randn(3, 8), fixed_routing(3, 4, 2))
    (layer,) = mega._megablocks._layers.values()
    a = layer.args
    assert (a.mlp_impl, a.fp16, a.bf16, a.bias, a.moe_loss_weight, a.moe_zloss_weight) == (
        "grouped", False, True, False, 0.0, 0.0)
    assert a.device == torch.device("cpu") and a.moe_top_k == 2 and a.mlp_type == "glu"


def test_error_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MegaBlocksUnavailableError, match=r"needs a CUDA GPU.*backend='native'"):
        MoELayer(8, 16, 4, 2, backend="megablocks")


def test_error_without_megablocks_says_how_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megablocks", None)  # makes `import megablocks...` raise ImportError
    with pytest.raises(MegaBlocksUnavailableError, match=r"could not import MegaBlocks.*--no-build-isolation --no-deps"):
        Experts(8, 16, 4, backend="megablocks")


def test_error_is_a_value_error_for_config_handling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError):
        Experts(8, 16, 4, backend="megablocks")


@pytest.mark.parametrize(
    "x_dtype,w_dtype,match",
    [
        (torch.float32, torch.float32, r"needs bf16 .* got input torch.float32 and weights torch.float32.*bf16-true"),
        (torch.bfloat16, torch.float32, r"weights torch.float32.*bf16-mixed keeps fp32 weights"),
        (torch.bfloat16, torch.bfloat16, r"runs on CUDA only, got input on cpu"),
    ],
)
def test_runnable_guard_names_dtype_then_device(x_dtype, w_dtype, match):
    weights = Experts(8, 16, 4).mlp.to(w_dtype)
    with pytest.raises(MegaBlocksUnavailableError, match=match):
        mb_backend.check_runnable(torch.zeros(2, 8, dtype=x_dtype), weights)


# --- GPU parity: runs only where real MegaBlocks imports on a CUDA GPU --------------------------------------------


def _real_megablocks_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("megablocks") is None:
        return "needs MegaBlocks installed (README: 'MegaBlocks on GPU')"
    try:
        mb_backend.load_megablocks()
    except MegaBlocksUnavailableError as err:
        return str(err)
    return None


gpu = pytest.mark.skipif(_real_megablocks_reason() is not None, reason=str(_real_megablocks_reason()))
BF16 = {"atol": 3e-2, "rtol": 3e-2}
ROUTERS = {
    "softmax_topk": lambda: SoftmaxTopK(load_balancing_weight=0.01, z_loss_weight=1e-3),
    "sigmoid_topk": SigmoidTopK,
    "expert_choice": ExpertChoice,
    "kmeans": KMeansRouter,
    "transition": TransitionRouter,
}


def _gpu_pair(router: str, D=256, F_=512, E=8, K=2):
    torch.manual_seed(0)
    native = MoELayer(D, F_, E, K, router=ROUTERS[router]()).cuda().to(torch.bfloat16)
    torch.manual_seed(0)
    mega = MoELayer(D, F_, E, K, router=ROUTERS[router](), backend="megablocks").cuda().to(torch.bfloat16)
    mega.load_state_dict(native.state_dict(), strict=True)
    return native, mega


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), **BF16)


@gpu
@pytest.mark.parametrize("router", list(ROUTERS))
def test_gpu_forward_grads_and_aux_losses_equal_native(router):
    native, mega = _gpu_pair(router)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    outs = {}
    for name, layer in (("native", native), ("megablocks", mega)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * g).sum().add(layer.aux_loss).backward()
        outs[name] = (y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}, layer.aux_losses)
    (y0, gx0, gp0, aux0), (y1, gx1, gp1, aux1) = outs["native"], outs["megablocks"]
    _close(y1, y0)
    _close(gx1, gx0)
    assert gp1.keys() == gp0.keys()
    for n in gp0:
        if gp0[n] is None:
            assert gp1[n] is None, n
        else:
            _close(gp1[n], gp0[n])  # includes router.layer.weight: the router's gradient through MegaBlocks
    assert aux1.keys() == aux0.keys()
    for k in aux0:
        _close(aux1[k], aux0[k])


@gpu
def test_gpu_one_optimizer_step_equals_native():
    native, mega = _gpu_pair("softmax_topk")
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    for layer in (native, mega):
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        (layer(x).float().square().mean() + layer.aux_loss).backward()
        opt.step()
    for (n, p), (_, q) in zip(native.named_parameters(), mega.named_parameters()):
        torch.testing.assert_close(q.float(), p.float(), **BF16, msg=n)
    _close(mega(x), native(x))


@gpu
def test_gpu_bf16_mixed_weights_raise_clear_error():
    layer = MoELayer(256, 512, 8, 2, backend="megablocks").cuda()  # fp32 weights, as under bf16-mixed
    with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(MegaBlocksUnavailableError, match="bf16-true"):
        layer(torch.randn(2, 8, 256, device="cuda"))

