"""Hostile inputs across the public surface: each must fail at once with the right exception type and a message
that names the offending field or value (and, where there is one, the fix) — never an assert, a bare torch
error deep inside, a NaN loss or a hang."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.callbacks import (
    LoadBalanceMonitor,
    RouterGeometryMonitor,
    SpecializationMonitor,
    TransitionMonitor,
)
from lightning_moe.data.byte_corpus import ByteCorpusDataModule
from lightning_moe.data.text import TextDataModule
from lightning_moe.gating import ExpertChoice, KMeansRouter, Router, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import MoELayer, NonFiniteRoutingError
from lightning_moe.models import MoETransformer
from lightning_moe.modules import MoELanguageModel
from lightning_moe.params import MoEShape
from tests.helpers import TINY, TinyLMData

SHAPE = {"d_model": 16, "n_layers": 2, "num_experts": 4, "top_k": 2, "d_expert": 8}


def layer(**kw) -> MoELayer:
    return MoELayer(**({"d_model": 8, "d_ff": 8, "num_experts": 4, "top_k": 2} | kw))


def model(**kw) -> MoETransformer:
    return MoETransformer(**(TINY | kw))


def lm(**kw) -> MoELanguageModel:
    return MoELanguageModel(**(TINY | kw))


def train_step(**batch) -> torch.Tensor:
    module = lm()
    module.log_dict = module.log = lambda *a, **k: None  # outside a Trainer
    return module.training_step(batch, 0)


def ids(*shape, value=0) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.long)


def bind_twice():
    router = SoftmaxTopK()
    layer(router=router)
    layer(router=router)


class NoDomainData(TinyLMData):
    """TinyLMData without the per-token ``domain_ids`` a specialization monitor reads."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            [{k: v for k, v in item.items() if k != "domain_ids"} for item in self.items], self.batch_size
        )


def fit_without_domain_ids(tmp_path):
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[SpecializationMonitor(num_labels=2, plots=False)],
    )
    trainer.fit(lm(), datamodule=NoDomainData())


def load_file(contents: bytes):
    def load(tmp_path):
        path = tmp_path / "model.ckpt"
        path.write_bytes(contents)
        MoELanguageModel.load_from_checkpoint(path)

    return load


class _ShiftedIds(SoftmaxTopK):
    """A custom router that breaks the contract: expert ids past the layer's experts."""

    def forward(self, x_BSD):
        routing = super().forward(x_BSD)
        routing.experts_TK = routing.experts_TK + 10
        return routing


class _FlatScores(SoftmaxTopK):
    """A custom router that breaks the contract: one score per token instead of one per expert."""

    def forward(self, x_BSD):
        routing = super().forward(x_BSD)
        routing.scores_TE = routing.scores_TE.sum(-1)
        return routing


class FloatLabelData(TinyLMData):
    """TinyLMData whose domain labels are floats (0.9 would be truncated to label 0)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([item | {"domain_ids": item["domain_ids"] * 0.9} for item in self.items], self.batch_size)


def _float_labels(tmp_path):
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[SpecializationMonitor(num_labels=2, token_key=None, plots=False)],
    )
    trainer.fit(lm(), datamodule=FloatLabelData())


def _saved_checkpoint(tmp_path, damage):
    """A real checkpoint of the tiny LM, saved by a Trainer, with ``damage`` applied to its bytes."""
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(lm(), datamodule=TinyLMData())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    path.write_bytes(damage(path.read_bytes()))
    return path


def damaged_checkpoint(damage):
    return lambda tmp_path: MoELanguageModel.load_from_checkpoint(_saved_checkpoint(tmp_path, damage))


def text_file(contents: bytes):
    def load(tmp_path):
        path = tmp_path / "data.txt"
        path.write_bytes(contents)
        TextDataModule(data_files=str(path)).setup("fit")

    return load


# (id, callable, exception type, regex the message must contain). Callables taking ``tmp_path`` get one.
CASES = [
    # --- MoELayer configuration
    ("layer_top_k_above_E", lambda: layer(top_k=5), ValueError, r"top_k=5 exceeds num_experts=4"),
    ("layer_zero_experts", lambda: layer(num_experts=0), ValueError, r"num_experts must be > 0, got 0"),
    ("layer_float_width", lambda: layer(d_model=8.0), TypeError, r"d_model must be an integer, got float 8\.0"),
    (
        "layer_router_string",
        lambda: layer(router="softmax"),
        TypeError,
        r"router must be a lightning_moe Router, got str",
    ),
    ("layer_activation", lambda: layer(activation="relu"), ValueError, r"activation 'relu'.*'swiglu', 'gelu'"),
    ("layer_backend", lambda: layer(backend="cuda"), ValueError, r"backend 'cuda'.*'native', 'megablocks'"),
    ("layer_shared_negative", lambda: layer(shared_d_ff=-1), ValueError, r"shared_d_ff must be >= 0, got -1"),
    ("router_bound_twice", bind_twice, ValueError, r"already bound.*own router instance"),
    # --- router constructors
    ("softmax_jitter", lambda: SoftmaxTopK(jitter=-0.1), ValueError, r"jitter must be >= 0, got -0\.1"),
    (
        "softmax_weight_string",
        lambda: SoftmaxTopK(load_balancing_weight="0.01"),
        TypeError,
        r"load_balancing_weight must be a number, got str '0\.01'",
    ),
    ("sigmoid_rate", lambda: SigmoidTopK(bias_update_rate=-1), ValueError, r"bias_update_rate must be >= 0, got -1"),
    ("sigmoid_route_scale", lambda: SigmoidTopK(route_scale=0), ValueError, r"route_scale must be > 0, got 0"),
    ("kmeans_decay", lambda: KMeansRouter(ema_decay=1.0), ValueError, r"ema_decay must lie in \[0, 1\), got 1\.0"),
    ("kmeans_mixing", lambda: KMeansRouter(mixing="softmax"), ValueError, r"mixing 'softmax'.*'scores', 'sigmoid'"),
    (
        "transition_init_beta",
        lambda: TransitionRouter(init_beta=1.5),
        ValueError,
        r"init_beta must lie in \(0, 1\), got 1\.5",
    ),
    (
        "transition_carry_without_beta",
        lambda: TransitionRouter(beta=False, carry_state=True),
        ValueError,
        r"carry_state=True needs beta=True",
    ),
    (
        "transition_memory_form",
        lambda: TransitionRouter(memory_form="gru"),
        ValueError,
        r"memory_form 'gru'.*'leaky', 'ema'",
    ),
    ("transition_chunk_size", lambda: TransitionRouter(chunk_size=0), ValueError, r"chunk_size must be > 0, got 0"),
    (
        "transition_precision_decay",
        lambda: TransitionRouter(precision=True, precision_decay=0),
        ValueError,
        r"precision_decay must lie in \(0, 1\), got 0",
    ),
    (
        "transition_precision_eps",
        lambda: TransitionRouter(precision=True, precision_eps=-1),
        ValueError,
        r"precision_eps must be > 0, got -1",
    ),
    (
        "transition_predictor_mult",
        lambda: TransitionRouter(predictor_mult=0),
        ValueError,
        r"predictor_mult must be > 0, got 0",
    ),
    (
        "expert_choice_capacity",
        lambda: ExpertChoice(capacity_factor=0),
        ValueError,
        r"capacity_factor must be > 0, got 0",
    ),
    (
        "expert_choice_in_causal_model",
        lambda: model(router=ExpertChoice()),
        ValueError,
        r"ExpertChoice\(group='sequence'\)",
    ),
    # --- Router.from_config
    (
        "router_unknown_class_path",
        lambda: Router.from_config({"class_path": "lightning_moe.gating.Nope"}),
        ValueError,
        r"unknown router class_path 'lightning_moe\.gating\.Nope'.*SoftmaxTopK",
    ),
    (
        "router_class_path_without_module",
        lambda: Router.from_config({"class_path": "SoftmaxTopK"}),
        ValueError,
        r"unknown router class_path 'SoftmaxTopK'",
    ),
    (
        "router_class_path_not_a_router",
        lambda: Router.from_config({"class_path": "torch.nn.Linear"}),
        TypeError,
        r"'torch\.nn\.Linear' is not a lightning_moe Router",
    ),
    (
        "router_config_string",
        lambda: Router.from_config("lightning_moe.gating.SoftmaxTopK"),
        TypeError,
        r"mapping with 'class_path'",
    ),
    (
        "router_unknown_init_arg",
        lambda: Router.from_config({"class_path": "lightning_moe.gating.SoftmaxTopK", "init_args": {"gamma": 1}}),
        TypeError,
        r"unknown init_args \['gamma'\].*SoftmaxTopK.*valid: normalize_weights",
    ),
    (
        "model_router_dict_unknown",
        lambda: lm(router={"class_path": "x.Y"}),
        ValueError,
        r"unknown router class_path 'x\.Y'",
    ),
    # --- MoETransformer and MoELanguageModel configuration
    ("model_odd_head_width", lambda: model(n_heads=3), ValueError, r"n_heads=3"),
    ("model_moe_every", lambda: model(moe_every=0), ValueError, r"moe_every must be > 0, got 0"),
    ("model_max_seq_len", lambda: model(max_seq_len=0), ValueError, r"max_seq_len must be > 0, got 0"),
    ("model_vocab_size", lambda: model(vocab_size=0), ValueError, r"vocab_size must be > 0, got 0"),
    ("lm_lr_zero", lambda: lm(lr=0), ValueError, r"lr must be > 0, got 0"),
    ("lm_lr_nan", lambda: lm(lr=float("nan")), ValueError, r"lr must be > 0, got nan"),
    ("lm_min_lr_ratio", lambda: lm(min_lr_ratio=1.5), ValueError, r"min_lr_ratio must lie in \[0, 1\], got 1\.5"),
    (
        "lm_min_lr_ratio_nan",
        lambda: lm(min_lr_ratio=float("nan")),
        ValueError,
        r"min_lr_ratio must lie in \[0, 1\], got nan",
    ),
    ("lm_weight_decay", lambda: lm(weight_decay=-1), ValueError, r"weight_decay must be >= 0, got -1"),
    # --- data modules
    ("bytes_seq_len", lambda: ByteCorpusDataModule(seq_len=0), ValueError, r"seq_len must be > 0, got 0"),
    ("bytes_batch_size", lambda: ByteCorpusDataModule(batch_size=0), ValueError, r"batch_size must be > 0, got 0"),
    (
        "bytes_val_fraction",
        lambda: ByteCorpusDataModule(val_fraction=1.0),
        ValueError,
        r"val_fraction must lie in \(0, 1\), got 1\.0",
    ),
    (
        "bytes_per_domain",
        lambda: ByteCorpusDataModule(bytes_per_domain=0),
        ValueError,
        r"bytes_per_domain must be > 0, got 0",
    ),
    ("text_no_source", lambda: TextDataModule(), ValueError, r"exactly one of `data_files`.*`dataset_name`"),
    (
        "text_two_sources",
        lambda: TextDataModule(data_files="a.txt", dataset_name="wikitext"),
        ValueError,
        r"exactly one of `data_files`",
    ),
    (
        "text_vocab_size",
        lambda: TextDataModule(data_files="a.txt", vocab_size=0),
        ValueError,
        r"vocab_size must be > 0, got 0",
    ),
    (
        "text_val_fraction",
        lambda: TextDataModule(data_files="a.txt", val_fraction=0),
        ValueError,
        r"val_fraction must lie in \(0, 1\), got 0",
    ),
    # --- callbacks
    (
        "load_monitor_every",
        lambda: LoadBalanceMonitor(every_n_steps=0),
        ValueError,
        r"every_n_steps must be > 0, got 0",
    ),
    (
        "specialization_num_labels",
        lambda: SpecializationMonitor(num_labels=0),
        ValueError,
        r"num_labels must be > 0, got 0",
    ),
    (
        "specialization_label_names",
        lambda: SpecializationMonitor(num_labels=2, label_names=["code"]),
        ValueError,
        r"label_names has 1 names but num_labels=2",
    ),
    (
        "transition_monitor_window",
        lambda: TransitionMonitor(num_labels=2, window=-1),
        ValueError,
        r"window must be >= 0, got -1",
    ),
    (
        "transition_monitor_correct_experts",
        lambda: TransitionMonitor(num_labels=2, correct_experts=[0]),
        ValueError,
        r"correct_experts=\[0\].*2 labels",
    ),
    (
        "geometry_projection",
        lambda: RouterGeometryMonitor(projection="down"),
        ValueError,
        r"projection 'down'.*'gate', 'up'",
    ),
    (
        "geometry_tokens",
        lambda: RouterGeometryMonitor(coupling_tokens=-1),
        ValueError,
        r"coupling_tokens must be >= 0, got -1",
    ),
    # --- MoEShape
    ("shape_top_k", lambda: MoEShape(**(SHAPE | {"top_k": 5})), ValueError, r"top_k=5 exceeds num_experts=4"),
    ("shape_heads", lambda: MoEShape(**SHAPE, n_heads=3), ValueError, r"d_model=16 is not divisible by n_heads=3"),
    (
        "shape_kv_heads",
        lambda: MoEShape(**SHAPE, n_heads=4, n_kv_heads=3),
        ValueError,
        r"n_kv_heads=3 does not divide n_heads=4",
    ),
    ("shape_kv_heads_zero", lambda: MoEShape(**SHAPE, n_kv_heads=0), ValueError, r"n_kv_heads must be > 0, got 0"),
    (
        "shape_dense_layers",
        lambda: MoEShape(**SHAPE, n_dense_layers=3),
        ValueError,
        r"n_dense_layers=3 exceeds n_layers=2",
    ),
    ("shape_shared_negative", lambda: MoEShape(**SHAPE, n_shared=-1), ValueError, r"n_shared must be >= 0, got -1"),
    # --- layer inputs: shapes, dtypes, non-finite values, empty
    (
        "layer_integer_input",
        lambda: layer()(ids(2, 8)),
        TypeError,
        r"input dtype must be floating point, got torch\.int64",
    ),
    ("layer_wrong_width", lambda: layer()(torch.zeros(2, 7)), ValueError, r"d_model=8, got shape \(2, 7\)"),
    ("layer_scalar_input", lambda: layer()(torch.tensor(1.0)), ValueError, r"d_model=8, got shape \(\)"),
    ("layer_list_input", lambda: layer()([[0.0] * 8]), TypeError, r"input must be a torch\.Tensor, got list"),
    ("layer_empty_input", lambda: layer()(torch.zeros(0, 8)), ValueError, r"empty input of shape \(0, 8\)"),
    (
        "layer_nan_input",
        lambda: layer()(torch.full((2, 8), float("nan"))),
        NonFiniteRoutingError,
        r"non-finite router scores",
    ),
    (
        "layer_inf_input",
        lambda: layer()(torch.full((2, 8), float("inf"))),
        NonFiniteRoutingError,
        r"non-finite router scores",
    ),
    # --- model inputs
    (
        "model_float_tokens",
        lambda: model()(torch.zeros(1, 4)),
        TypeError,
        r"integer tensor \[batch, seq\], got torch\.float32",
    ),
    ("model_1d_tokens", lambda: model()(ids(4)), TypeError, r"\[batch, seq\], got torch\.int64 \(4,\)"),
    ("model_empty_batch", lambda: model()(ids(0, 4)), ValueError, r"empty input of shape \(0, 4, 16\)"),
    ("model_empty_sequence", lambda: model()(ids(1, 0)), ValueError, r"empty input of shape \(1, 0, 16\)"),
    ("model_sequence_too_long", lambda: model()(ids(1, 33)), ValueError, r"sequence length 33 exceeds max_seq_len=32"),
    ("model_negative_token", lambda: model()(torch.tensor([[0, -1]])), ValueError, r"vocab_size=32\), got \[-1, 0\]"),
    (
        "model_token_out_of_vocab",
        lambda: model()(torch.tensor([[0, 32]])),
        ValueError,
        r"vocab_size=32\), got \[0, 32\]",
    ),
    # --- training batches
    ("batch_missing_labels", lambda: train_step(tokens=ids(1, 4)), ValueError, r"batch is missing 'labels'"),
    ("batch_missing_tokens", lambda: train_step(labels=ids(1, 4)), ValueError, r"batch is missing 'tokens'"),
    (
        "batch_labels_shape",
        lambda: train_step(tokens=ids(1, 4), labels=ids(1, 3)),
        ValueError,
        r"batch\['labels'\] has shape \(1, 3\) but batch\['tokens'\] has \(1, 4\)",
    ),
    (
        "batch_labels_float",
        lambda: train_step(tokens=ids(1, 4), labels=torch.zeros(1, 4)),
        TypeError,
        r"batch\['labels'\] must be an integer tensor.*torch\.float32",
    ),
    (
        "batch_labels_out_of_vocab",
        lambda: train_step(tokens=ids(1, 4), labels=ids(1, 4, value=40)),
        ValueError,
        r"label ids must lie in \[0, vocab_size=32\) or be -100.*got \[40, 40\]",
    ),
    (
        "batch_all_labels_ignored",
        lambda: train_step(tokens=ids(1, 4), labels=ids(1, 4, value=-100)),
        ValueError,
        r"no scored label \(all are -100\)",
    ),
    (
        "monitor_batch_without_domain_ids",
        fit_without_domain_ids,
        ValueError,
        r"SpecializationMonitor: the batch has no 'domain_ids'",
    ),
    # --- checkpoints
    (
        "checkpoint_random_bytes",
        load_file(random.Random(0).randbytes(512)),
        ValueError,
        r"cannot read checkpoint .*model\.ckpt.*not a PyTorch checkpoint",
    ),
    ("checkpoint_empty_file", load_file(b""), ValueError, r"cannot read checkpoint .*model\.ckpt.*empty, truncated"),
    ("checkpoint_truncated", damaged_checkpoint(lambda b: b[: len(b) // 2]), ValueError,
     r"cannot read checkpoint .*model\.ckpt.*truncated"),
    ("checkpoint_flipped_bytes", damaged_checkpoint(lambda b: b[:2000] + bytes(x ^ 0xFF for x in b[2000:2016]) + b[2016:]),
     ValueError, r"checkpoint .*model\.ckpt' is damaged: its entry .* fails its CRC-32 check"),
    ("softmax_weight_inf", lambda: SoftmaxTopK(load_balancing_weight=float("inf")), ValueError,
     r"load_balancing_weight must be a finite number, got inf"),
    ("sigmoid_rate_inf", lambda: SigmoidTopK(bias_update_rate=float("inf")), ValueError,
     r"bias_update_rate must be a finite number, got inf"),
    ("lm_lr_inf", lambda: lm(lr=float("inf")), ValueError, r"lr must be a finite number, got inf"),
    ("layer_half_input_to_float_layer", lambda: layer()(torch.randn(2, 8, dtype=torch.float16)), TypeError,
     r"input dtype torch.float16 differs from the layer's torch.float32 parameters; cast one"),
    ("router_ids_out_of_range", lambda: layer(router=_ShiftedIds())(torch.randn(2, 8)), ValueError,
     r"router _ShiftedIds returned expert ids outside \[0, 4\) \(min 1[0-3], max 1[0-3]\)"),
    ("router_bad_shapes", lambda: layer(router=_FlatScores())(torch.randn(2, 8)), ValueError,
     r"router _FlatScores returned .*scores_TE \(2,\) for 2 tokens and 4 experts"),
    ("text_empty_file", text_file(b""), ValueError, r"data_files entry '.*data\.txt' is empty"),
    ("text_binary_file", text_file(b"\x00\x01\x02" * 100), ValueError, r"'.*data\.txt' holds binary data"),
    ("text_latin1_file", text_file("café au lait\n".encode("latin1") * 50), ValueError,
     r"'.*data\.txt' is not UTF-8 \(byte 0xe9 at offset 3\); convert it"),
    ("text_directory", lambda tmp_path: TextDataModule(data_files=str(tmp_path)).setup("fit"), IsADirectoryError,
     r"data_files entry '.*' is a directory; list the files inside"),
    ("text_missing_tokenizer", lambda tmp_path: TextDataModule(data_files="x.txt", tokenizer=str(tmp_path / "t.json")),
     FileNotFoundError, r"tokenizer='.*t\.json' is not a file; pass the tokenizer\.json"),
    ("monitor_float_labels", _float_labels, TypeError, r"batch\['domain_ids'\] holds torch.float32 values; labels "
     r"must be integer class ids"),
]


@pytest.mark.parametrize(("make", "error", "message"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_hostile_input_fails_clearly(make, error, message, tmp_path):
    with pytest.raises(error, match=message) as info:
        make(tmp_path) if make.__code__.co_argcount else make()
    assert not isinstance(info.value, AssertionError)


def test_table_covers_every_case_once():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 25
