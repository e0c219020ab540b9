"""The native backend on a CUDA GPU: numbers against the CPU reference, and a training forward with no host sync.

Skipped without CUDA (the reason shows with ``pytest -rs``); ``benchmarks/gpu_check.sh run`` runs these on a GPU.
"""

import pytest
import torch

from lightning_moe.experts import Experts, reference_experts
from lightning_moe.experts.native import _grouped_mm_ok
from lightning_moe.layers import MoELayer, NonFiniteRoutingError, moe_layers, raise_deferred_checks
from tests.helpers import fixed_routing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def _lm_class():
    # Imported here: a GPU machine without Lightning still runs the layer-level tests of this file.
    pytest.importorskip("lightning")
    from lightning_moe.modules import MoELanguageModel

    return MoELanguageModel


TINY = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, d_ff=128, num_experts=8, top_k=2, max_seq_len=64)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-loop", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_cuda_native_matches_cpu_reference(dtype, activation):
    T, D, F_, E, K = 64, 64, 128, 8, 2
    torch.manual_seed(0)
    cpu = Experts(D, F_, E, activation)
    gpu = Experts(D, F_, E, activation).cuda().to(dtype)
    gpu.load_state_dict(cpu.state_dict())
    routing = fixed_routing(T, E, K, allowed=list(range(0, E, 2)))  # odd experts get no token
    x = torch.randn(T, D)
    want = reference_experts(cpu, x, routing)
    r_gpu = type(routing)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(routing).items()})
    r_gpu.weights_TK = r_gpu.weights_TK.to(dtype)
    got = gpu(x.cuda().to(dtype), r_gpu).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


@cuda
def test_cuda_grouped_mm_path_is_taken_on_hopper():
    x = torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16)
    expected = torch.cuda.get_device_capability() >= (9, 0) and hasattr(torch.nn.functional, "grouped_mm")
    assert _grouped_mm_ok(x, 128) is expected


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_training_step_has_no_host_sync(dtype):
    """With the default checks (deferred on a GPU), forward + backward of a training step never waits for the
    GPU; sync debug mode "error" raises at the first read. fp32 below Hopper takes the per-expert loop, which reads
    the counts (one sync per layer, documented), so it is only asserted where grouped_mm runs."""
    MoELanguageModel = _lm_class()
    lm = MoELanguageModel(**TINY).cuda().to(dtype)
    tokens = torch.randint(0, TINY["vocab_size"], (4, 33), device="cuda")
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
    if not _grouped_mm_ok(torch.zeros(1, 64, device="cuda", dtype=dtype), TINY["d_ff"]):
        pytest.skip(f"{dtype} here runs the per-expert loop, which reads counts on the host")
    lm.training_step(batch, 0)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lm.training_step(batch, 0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    raise_deferred_checks(lm, step=0)  # the one read per step: nothing failed


@cuda
def test_cuda_deferred_checks_name_layer_and_step():
    MoELanguageModel = _lm_class()
    lm = MoELanguageModel(**TINY).cuda()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), device="cuda")
    batch = {"tokens": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone()}
    batch["tokens"][0, 0] = 1000  # clamped for the lookup, so no device-side assert
    lm.training_step(batch, 0)
    with pytest.raises(ValueError, match=r"global step 3, token ids must lie"):
        raise_deferred_checks(lm, step=3)
    batch["tokens"][0, 0] = 0
    with torch.no_grad():
        moe_layers(lm.model)[0].router.layer.weight.fill_(float("nan"))
    lm.training_step(batch, 0)
    with pytest.raises(NonFiniteRoutingError, match=r"global step 4, blocks.0.ffn: non-finite"):
        raise_deferred_checks(lm, step=4)


@cuda
def test_cuda_check_finite_true_raises_in_the_forward():
    layer = MoELayer(64, 128, 8, 2, check_finite=True).cuda()
    with torch.no_grad():
        layer.router.layer.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRoutingError):
        layer(torch.randn(4, 64, device="cuda"))
