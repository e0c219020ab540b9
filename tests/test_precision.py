"""bf16 on CPU with the native backend, for every kind of router: training steps run, router probabilities and
balance losses are computed in fp32, and router state stays fp32 under ``bf16-true`` (which casts the module)."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.gating import KMeansRouter, Router, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import moe_layers
from lightning_moe.modules import MoELanguageModel
from tests.helpers import TinyLMData

ROUTERS = {"softmax": SoftmaxTopK, "sigmoid": SigmoidTopK, "kmeans": KMeansRouter,
           "transition": lambda: TransitionRouter(precision=True)}
STATEFUL = {"sigmoid": lambda: SigmoidTopK(bias_update_rate=1e-3), "kmeans": KMeansRouter,
            "transition": lambda: TransitionRouter(precision=True)}


def _fit(module, precision, tmp_path, callbacks=()):
    trainer = pl.Trainer(max_steps=3, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=TinyLMData())
    return trainer


def _model(router: Router) -> MoELanguageModel:
    return MoELanguageModel(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, top_k=2,
                            router=router)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_steps_run_with_fp32_router_math(precision, router, tmp_path):
    module = _model(ROUTERS[router]())
    trainer = _fit(module, precision, tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    routing = moe_layers(module.model)[0].routing
    # Router probabilities and every balance loss stay fp32 whatever the module's dtype.
    assert routing.scores_TE.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in routing.aux_losses.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_softmax_and_balance_losses_equal_fp32_references(precision, tmp_path):
    module = _model(SoftmaxTopK(load_balancing_weight=0.01, z_loss_weight=0.001))
    _fit(module, precision, tmp_path)
    routing = moe_layers(module.model)[0].routing
    logits_TE = routing.logits_TE
    assert logits_TE.dtype == torch.bfloat16  # the gate itself ran in bf16 ...
    # ... its softmax in fp32: bit-equal to the fp32 softmax of those logits, not to the bf16 one.
    assert torch.equal(routing.scores_TE, torch.softmax(logits_TE.float(), dim=-1))
    assert not torch.equal(routing.scores_TE, torch.softmax(logits_TE, dim=-1).float())
    # Balance losses against float64 references; bf16 arithmetic would miss by ~1e-3 relative.
    T, E = routing.scores_TE.shape
    K = routing.experts_TK.shape[1]
    f_E = torch.bincount(routing.experts_TK.flatten(), minlength=E).double() / (K * T)
    P_E = routing.scores_TE.double().mean(dim=0)
    lb = 0.01 * E * (f_E * P_E).sum()
    z = 0.001 * torch.logsumexp(logits_TE.double(), dim=-1).square().mean()
    torch.testing.assert_close(routing.aux_losses["load_balancing"].double(), lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(routing.aux_losses["z_loss"].double(), z, rtol=1e-6, atol=0)


@pytest.mark.parametrize("router", sorted(STATEFUL))
def test_casting_a_router_down_keeps_its_state_fp32_and_exact(router):
    r = STATEFUL[router]()
    r.bind(8, 4, 2)
    with torch.no_grad():  # values that bf16 cannot hold
        for buf in r.buffers():
            if buf.is_floating_point():
                buf.add_(1e-3 * torch.arange(buf.numel()).view_as(buf) + 1 / 3)
    before = {k: v.clone() for k, v in r.named_buffers()}
    r.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in r.parameters())  # parameters are cast as asked
    for name, buf in r.named_buffers():
        assert buf.dtype == before[name].dtype, f"{name} became {buf.dtype}"
        assert torch.equal(buf, before[name]), f"{name} changed when the router was cast"


class Fp32Replay(pl.Callback):
    """Before each state update, replays it on an all-fp32 copy of each router; afterwards compares."""

    def __init__(self) -> None:
        self.twins: list[tuple[Router, Router]] = []
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Callbacks run before MoELanguageModel's hook, which applies the update.
        self.twins = []
        for layer in moe_layers(pl_module.model):
            twin = copy.deepcopy(layer.router).float()
            twin.update_state()
            self.twins.append((layer.router, twin))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for router, twin in self.twins:
            for name, buf in router.named_buffers():
                if buf.is_floating_point():
                    assert buf.dtype == torch.float32, f"{name} is {buf.dtype}"
                    assert torch.equal(buf, getattr(twin, name)), f"{name} update differs from fp32"
            self.checked += 1


@pytest.mark.parametrize("router", sorted(STATEFUL))
def test_bf16_true_state_updates_are_fp32_updates(router, tmp_path):
    replay = Fp32Replay()
    module = _model(STATEFUL[router]())
    _fit(module, "bf16-true", tmp_path, [replay])
    assert replay.checked == 3
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
