"""The four routing monitors on a tiny Lightning fit: logged keys, plots, checkpoint state, errors."""

import csv
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_moe.callbacks import LoadBalanceMonitor, RouterGeometryMonitor, SpecializationMonitor, TransitionMonitor
from lightning_moe.modules.language_model import MoELanguageModel
from tests.helpers import TinyLMData

LAYER = "model.blocks.0.ffn"
WINDOW = 2


def monitors(plots: bool = True) -> list[pl.Callback]:
    # every_n_steps=3 with max_steps=4: step 4's routing is still in the training window when the checkpoint is
    # taken, so the round trip carries non-zero metric state.
    return [
        LoadBalanceMonitor(every_n_steps=3, plots=plots),
        SpecializationMonitor(num_labels=2, every_n_steps=3, plots=plots),
        RouterGeometryMonitor(coupling_tokens=16, every_n_steps=3, plots=plots),
        TransitionMonitor(num_labels=2, window=WINDOW, every_n_steps=3, plots=plots),
    ]


def tiny_model() -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=4, top_k=2,
                            max_seq_len=16, warmup_steps=1)


def trainer(root, callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_steps=4, limit_train_batches=4, limit_val_batches=2, log_every_n_steps=2, callbacks=callbacks,
        default_root_dir=root,
        logger=CSVLogger(root), enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, accelerator="cpu",
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fit")
    callbacks = monitors()
    t = trainer(root, callbacks)
    t.fit(tiny_model(), datamodule=TinyLMData())
    ckpt = root / "done.ckpt"
    t.save_checkpoint(ckpt)
    return t, callbacks, ckpt


def expected_keys() -> set[str]:
    load = ["cv", "max_over_mean", "entropy", "dead_experts", "p50", "p90", "p99"]
    spec = [f"{s}{v}" for v in ("", "_top1", "_soft") for s in ("mi", "nmi", "nmi_geometric", "purity_expert",
                                                                   "purity_class")]
    spec += ["token_specialization", "token_specialization_weighted"]
    offsets = [f"@{o:+d}" for o in range(-WINDOW, WINDOW + 1)]
    transition = [f"{s}{o}" for s in ("p_correct", "acc_correct", "k99", "coverage99") for o in offsets]
    keys = {f"train/load/{LAYER}/{k}" for k in load + ["maxvio", "maxvio_batch"]}
    keys |= {f"val/load/{LAYER}/{k}" for k in load + ["maxvio_global"]}
    keys |= {f"{stage}/load/{k}" for stage in ("train", "val") for k in ("worst_layer_maxvio", "worst_layer")}
    keys |= {f"train/geometry/{LAYER}/{k}" for k in ("mean_cosine", "nn_cosine", "effective_rank", "common_energy")}
    for stage in ("train", "val"):
        keys |= {f"{stage}/spec/{LAYER}/{k}" for k in spec}
        keys |= {f"{stage}/transition/{LAYER}/{k}" for k in transition}
        keys.add(f"{stage}/coupling/{LAYER}/spearman")
    return keys


def test_logged_metric_keys(fitted):
    _, callbacks, _ = fitted
    logged = set().union(*(cb.logged for cb in callbacks))
    assert logged == expected_keys()


def test_validation_values_reach_callback_metrics(fitted):
    t, callbacks, _ = fitted
    val = {k for cb in callbacks for k in cb.logged if k.startswith("val/")}
    assert val and val <= set(t.callback_metrics)


def test_metrics_reach_the_trainers_logger(fitted):
    t, _, _ = fitted
    with open(f"{t.logger.log_dir}/metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert expected_keys() <= columns


def test_plots_are_written_next_to_the_logs(fitted):
    t, _, _ = fitted
    plots = {p.name for p in Path(t.logger.log_dir, "plots").glob("*.png")}
    assert plots == {"load_train.png", "spec_train.png", "spec_val.png", "transition_train.png",
                     "transition_val.png", "geometry_train.png", "geometry_val.png"}


def _assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_callback_state_round_trips_through_a_checkpoint(fitted, tmp_path):
    _, callbacks, ckpt = fitted
    saved = [cb.state_dict() for cb in callbacks]
    # Something to carry: step 4's counts in the training window and the load history of step 3.
    assert saved[0]["metrics"][f"train/{LAYER}/load"]["counts_E"].sum() > 0
    assert saved[0]["extra"]["history_steps"] == [3]
    resumed = monitors(plots=False)
    trainer(tmp_path, resumed).fit(tiny_model(), datamodule=TinyLMData(), ckpt_path=ckpt)
    for before, cb in zip(saved, resumed):
        _assert_same(before, cb.state_dict())


def test_missing_label_key_names_the_key_and_the_fix(tmp_path):
    cb = SpecializationMonitor(num_labels=2, label_key="task_ids", plots=False)
    with pytest.raises(ValueError, match=r"the batch has no 'task_ids' \(keys: \['domain_ids', 'labels', 'tokens'\]\)"):
        trainer(tmp_path, [cb]).fit(tiny_model(), datamodule=TinyLMData())


def test_missing_matplotlib_skips_plots_with_one_warning(fitted, monkeypatch):
    t, _, _ = fitted
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    cb = LoadBalanceMonitor()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            cb.on_fit_end(t, None)
    expected = (
        "matplotlib is not installed: LoadBalanceMonitor skips its plots. Install it with "
        "`pip install 'lightning-moe[plots]'` or pass plots=False."
    )
    assert [str(w.message) for w in record if "matplotlib" in str(w.message)] == [expected]


class _StepRecorder(LoadBalanceMonitor):
    """Records the optimizer step of every training batch the base class feeds to ``_observe``."""

    def __init__(self, **kwargs):
        super().__init__(plots=False, **kwargs)
        self.observed_steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _observe(self, stage, event, batch, logging_now) -> None:
        if stage == "train":
            self.observed_steps.append(self._step)


def test_sample_every_feeds_one_step_in_n_and_every_logging_step(tmp_path):
    recorder = _StepRecorder(every_n_steps=4, sample_every=3)
    t = pl.Trainer(max_steps=12, log_every_n_steps=4, callbacks=[recorder], default_root_dir=tmp_path, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   limit_val_batches=0, accelerator="cpu")
    t.fit(tiny_model(), datamodule=TinyLMData(batches=12))
    assert sorted(set(recorder.observed_steps)) == [1, 4, 7, 8, 10, 12]  # 1 + multiples of 3, and logging steps


def test_diagnostics_sample_one_step_in_five_and_load_and_transitions_every_step():
    assert LoadBalanceMonitor().sample_every == 1
    assert SpecializationMonitor(num_labels=2).sample_every == 5
    assert TransitionMonitor(num_labels=2).sample_every == 1  # switches are rare: every batch


def test_sample_every_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="sample_every"):
        LoadBalanceMonitor(sample_every=0)
