"""Monitors are guests in a user's own Lightning project: batches with nothing to count are skipped and counted
with one warning, never an exception inside ``fit``."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_moe import MoELayer
from lightning_moe.callbacks import LoadBalanceMonitor, RouterGeometryMonitor, SpecializationMonitor, TransitionMonitor

B, S, V, D = 2, 4, 8, 8


class UserModule(pl.LightningModule):
    """A user's own module (not ours): an embedding, one MoE layer, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.moe, self.head = nn.Embedding(V, D), MoELayer(D, 16, 4, 2), nn.Linear(D, V)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.moe(self.embed(batch["tokens"])))
        return nn.functional.cross_entropy(logits.reshape(-1, V), batch["tokens"].reshape(-1))

    def validation_step(self, batch, batch_idx):
        self.head(self.moe(self.embed(batch["tokens"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batch(kind: str) -> dict:
    tokens = torch.arange(B * S).reshape(B, S) % V
    mask = torch.zeros(B, S, dtype=torch.long) if kind == "padded" else torch.ones(B, S, dtype=torch.long)
    labels = torch.full((B, S), -1) if kind == "unlabelled" else torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    return {"tokens": tokens, "attention_mask": mask, "domain_ids": labels}


def monitors() -> list[pl.Callback]:
    return [
        LoadBalanceMonitor(every_n_steps=1, plots=False),
        SpecializationMonitor(num_labels=2, token_key=None, every_n_steps=1, plots=False),
        RouterGeometryMonitor(coupling_tokens=4, every_n_steps=1, plots=False),
        TransitionMonitor(num_labels=2, window=1, every_n_steps=1, plots=False),
    ]


def fit(train_kinds, val_kinds, root):
    torch.manual_seed(0)
    callbacks = monitors()
    trainer = pl.Trainer(max_steps=len(train_kinds), log_every_n_steps=1, callbacks=callbacks, default_root_dir=root,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UserModule(), DataLoader([batch(k) for k in train_kinds], batch_size=None),
                    DataLoader([batch(k) for k in val_kinds], batch_size=None))
    skips = [str(w.message) for w in caught if "skipped a" in str(w.message)]
    return callbacks, skips


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return fit(["padded", "unlabelled", "ok", "padded"], ["ok"], tmp_path_factory.mktemp("mixed"))


def test_a_fully_padded_batch_is_skipped_and_counted_by_every_monitor(mixed):
    callbacks, _ = mixed
    assert [cb.skipped_batches["train"] for cb in callbacks][0] == 2  # LoadBalance: the two padded batches


def test_an_unlabelled_batch_is_also_skipped_by_the_label_monitors(mixed):
    callbacks, _ = mixed
    assert {type(cb).__name__: cb.skipped_batches["train"] for cb in callbacks} == {
        "LoadBalanceMonitor": 2, "SpecializationMonitor": 3, "RouterGeometryMonitor": 2, "TransitionMonitor": 3}


def test_each_monitor_warns_once_naming_itself_and_what_it_skipped(mixed):
    _, skips = mixed
    assert sorted(s.split(" ")[0] for s in skips) == sorted(
        ["LoadBalanceMonitor", "SpecializationMonitor", "RouterGeometryMonitor", "TransitionMonitor"])
    assert any("masked out by batch['attention_mask']" in s for s in skips)


def test_the_countable_batch_is_still_logged(mixed):
    callbacks, _ = mixed
    assert callbacks[0].logged["val/load/moe/dead_experts"] >= 0
    assert "train/spec/moe/mi" in callbacks[1].logged


def test_a_validation_set_with_nothing_to_count_logs_nothing(tmp_path):
    callbacks, _ = fit(["ok"], ["padded", "padded"], tmp_path)
    assert not any(k.startswith("val/") for cb in callbacks for k in cb.logged)


def test_the_missing_vocab_size_error_names_token_key_and_vocab_size(tmp_path):
    monitor = SpecializationMonitor(num_labels=2, plots=False)
    trainer = pl.Trainer(max_steps=1, callbacks=[monitor], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu")
    with pytest.raises(ValueError, match=r"token_key='tokens'.*vocab_size=None.*token_key=None"):
        trainer.fit(UserModule(), DataLoader([batch("ok")], batch_size=None))


def stateful_fit(tmp_path, extra_callbacks):
    from lightning_moe import SigmoidTopK

    module = UserModule()
    module.moe = MoELayer(D, 16, 4, 2, router=SigmoidTopK())
    trainer = pl.Trainer(max_steps=11, callbacks=[LoadBalanceMonitor(plots=False), *extra_callbacks],
                         default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader([batch("ok")] * 11, batch_size=None))
    return [str(w.message) for w in caught if "never applied" in str(w.message)]


def test_a_stateful_router_whose_statistics_are_never_applied_is_warned_about(tmp_path):
    (message,) = stateful_fit(tmp_path, [])
    assert "['moe.router']" in message and "RouterStateUpdate" in message


def test_no_stale_state_warning_when_router_states_are_updated(tmp_path):
    from lightning_moe.callbacks import RouterStateUpdate

    assert stateful_fit(tmp_path, [RouterStateUpdate()]) == []


def _fit_epochs(root, ckpt_path=None):
    """Three epochs of [padded, ok] batches with a checkpoint after each; returns the monitors."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    callbacks = monitors()
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=3, log_every_n_steps=1, callbacks=[*callbacks, saver], default_root_dir=root,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(UserModule(), DataLoader([batch("padded"), batch("ok")], batch_size=None),
                    DataLoader([batch("ok")], batch_size=None), ckpt_path=ckpt_path)
    return callbacks


def test_the_users_run_resumes_with_the_monitors_state_as_if_never_stopped(tmp_path):
    full = _fit_epochs(tmp_path / "full")
    (after_two,) = (tmp_path / "full" / "ckpt").glob("epoch=1-*.ckpt")
    resumed = _fit_epochs(tmp_path / "resumed", ckpt_path=after_two)
    for a, b in zip(full, resumed):
        assert b.skipped_batches == a.skipped_batches == {"train": 3, "val": 0}
        assert b.logged.keys() == a.logged.keys()
        for key, value in a.logged.items():
            assert b.logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
