"""The training forward reads no value back to the host where that stalls a GPU stream (issue #18).

``torch.cuda.set_sync_debug_mode`` needs CUDA, so on CPU the GPU code paths are selected by emptying
``lightning_moe.utils.HOST_SYNC_FREE_DEVICES`` (CPU then counts as a device where host reads are not free) and
every Python-level way of reading a tensor's value is made to fail: ``.item()``, ``.tolist()``, ``bool()``,
``int()``, ``float()``, ``bincount`` / ``nonzero`` / ``unique`` (output sized by the data) and boolean-mask indexing.
``tests/test_experts_cuda.py`` checks the same on a real GPU with ``set_sync_debug_mode("error")``.
"""

import lightning.pytorch as pl
import pytest
import torch

import lightning_moe.utils as utils
from lightning_moe.gating import ExpertChoice, KMeansRouter, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import MoELayer, NonFiniteRoutingError, moe_layers, raise_deferred_checks
from lightning_moe.metrics import ExpertLoad, LabelSpecialization, TokenSpecialization
from lightning_moe.modules import MoELanguageModel
from lightning_moe.utils import DeferredChecks, check_now, count_ids
from tests.helpers import PoisonAtStep2, TinyLMData

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=32)


class HostSync(AssertionError):
    pass


@pytest.fixture
def gpu_like(monkeypatch):
    """CPU tensors take the GPU code paths (checks deferred, no host reads)."""
    monkeypatch.setattr(utils, "HOST_SYNC_FREE_DEVICES", ())


@pytest.fixture
def no_host_reads(monkeypatch, gpu_like):
    """``arm()``: from then on every Python-level host read of a tensor's value raises HostSync, as sync debug mode
    "error" would (armed after the batch and the model are built, which may read values)."""

    def fail(name):
        def read(*args, **kwargs):
            raise HostSync(f"host sync: {name}")
        return read

    getitem = torch.Tensor.__getitem__

    def no_mask_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise HostSync("host sync: boolean-mask indexing")
        return getitem(self, index)

    def arm():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique"):
            monkeypatch.setattr(torch.Tensor, name, fail(f"Tensor.{name}"))
        for name in ("bincount", "nonzero", "unique", "masked_select"):
            monkeypatch.setattr(torch, name, fail(f"torch.{name}"))
        monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask_getitem)

    return arm


def test_check_now_is_free_on_cpu_and_a_switch_elsewhere(monkeypatch):
    t = torch.zeros(2)
    assert check_now(None, t) and check_now(True, t) and not check_now(False, t)
    monkeypatch.setattr(utils, "HOST_SYNC_FREE_DEVICES", ())
    assert not check_now(None, t) and check_now(True, t) and not check_now(False, t)


def test_count_ids_without_bincount_gives_bincount(gpu_like):
    ids = torch.tensor([3, 0, 3, 1, 3])
    assert torch.equal(count_ids(ids, 5), torch.bincount(ids, minlength=5))
    assert count_ids(ids, 5).dtype == torch.int64


@pytest.mark.parametrize("router", [SoftmaxTopK, SigmoidTopK, lambda: ExpertChoice(group="position"), KMeansRouter,
                                    lambda: TransitionRouter(beta=True, precision=True, anticipation=True)],
                         ids=["softmax", "sigmoid", "expert_choice", "kmeans", "transition"])
def test_training_step_reads_nothing_back_to_the_host(no_host_reads, router):
    lm = MoELanguageModel(**TINY, router=router(), warmup_steps=1)
    batch = next(iter(TinyLMData().train_dataloader()))
    no_host_reads()
    loss = lm.training_step(batch, 0)  # outside a Trainer, self.log only warns
    loss.backward()
    assert all(layer.deferred_checks.flags for layer in moe_layers(lm.model))  # checked, on the device


def test_monitor_metric_updates_read_nothing_back(no_host_reads):
    experts_TK = torch.tensor([[0, 1], [2, 9], [1, 1]])  # 9: out of range, not counted (unchecked off CPU)
    labels_T, tokens_T, mass_TE = torch.tensor([0, 1, 5]), torch.tensor([1, 2, 30]), torch.full((3, 4), 0.25)
    load, spec, tok = ExpertLoad(4), LabelSpecialization(2, 4), TokenSpecialization(8, 4)
    no_host_reads()
    load.update(experts_TK)
    spec.update(labels_T, experts_TK, experts_TK[:, 0], mass_TE)
    tok.update(tokens_T, experts_TK[:, 0])
    with pytest.raises(HostSync):  # the patch is armed
        load.counts_E.tolist()


def test_out_of_range_ids_are_dropped_not_counted_off_cpu(gpu_like):
    load = ExpertLoad(4)
    load.update(torch.tensor([[0, 1], [2, 9]]))
    assert load.counts_E.tolist() == [1.0, 1.0, 1.0, 0.0]


def _lm_and_batch():
    lm = MoELanguageModel(**TINY)
    return lm, next(iter(TinyLMData().train_dataloader()))


def test_deferred_token_check_raises_at_the_step_naming_it(gpu_like):
    lm, batch = _lm_and_batch()
    batch["tokens"][0, 3] = 99
    lm.training_step(batch, 0)  # no raise in the forward: the bad id is clamped for the lookup and flagged
    with pytest.raises(ValueError, match=r"global step 7, token ids must lie in \[0, vocab_size=32\)"):
        raise_deferred_checks(lm, step=7)
    raise_deferred_checks(lm, step=8)  # flags were cleared: the next step is clean


def test_deferred_label_checks_raise_at_the_step(gpu_like):
    lm, batch = _lm_and_batch()
    batch["labels"][1, 2] = 40
    lm.training_step(batch, 0)
    with pytest.raises(ValueError, match=r"global step 3, label ids must lie in \[0, vocab_size=32\)"):
        raise_deferred_checks(lm, step=3)
    batch["labels"].fill_(-100)
    lm.training_step(batch, 0)
    with pytest.raises(ValueError, match=r"no scored label"):
        raise_deferred_checks(lm, step=4)


def test_deferred_routing_check_names_layer_and_step(gpu_like):
    lm, batch = _lm_and_batch()
    with torch.no_grad():
        moe_layers(lm.model)[1].router.layer.weight.fill_(float("nan"))
    lm.training_step(batch, 0)
    with pytest.raises(NonFiniteRoutingError, match=r"global step 5, blocks.1.ffn: non-finite router scores"):
        raise_deferred_checks(lm, step=5)


def test_check_finite_true_checks_at_once_off_cpu(gpu_like):
    layer = MoELayer(8, 16, 4, 2, check_finite=True)
    with torch.no_grad():
        layer.router.layer.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRoutingError, match="MoELayer: non-finite"):
        layer(torch.randn(3, 8))
    off = MoELayer(8, 16, 4, 2, check_finite=False)
    off(torch.randn(3, 8))
    assert not off.deferred_checks.flags


def test_flags_of_many_batches_stay_one_tensor_each(gpu_like):
    checks = DeferredChecks()
    for bad in (False, True, False):
        checks.add(ValueError, "x", torch.tensor(bad))
    (error, flag), = checks.flags.values()
    assert error is ValueError and bool(flag)


def test_fit_stops_before_the_bad_batch_is_applied(gpu_like, tmp_path):
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[PoisonAtStep2()])
    with pytest.raises(NonFiniteRoutingError, match=r"global step 2, blocks.1.ffn: non-finite router scores"):
        trainer.fit(MoELanguageModel(**TINY), datamodule=TinyLMData())
    assert trainer.global_step == 2  # the optimizer step of the poisoned batch did not run
