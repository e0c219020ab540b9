"""RoutingTraceWriter: Parquet shards of sampled routing during a tiny fit, resume, disk budget, read-back; and
figures handed to loggers that take images."""

from __future__ import annotations

import shutil
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_moe.callbacks import RoutingTraceWriter, log_figure, read_routing_traces
from lightning_moe.callbacks.plots import new_figure
from tests.helpers import fit_two_layer_lm

pytest.importorskip("pyarrow")
LAYERS = ["model.blocks.0.ffn", "model.blocks.1.ffn"]
TOKENS, EVERY = 5, 2


def _fit(root, max_steps, ckpt_path=None, save_at=None, **writer_kwargs):
    kwargs = {"dirpath": root / "traces", "tokens_per_step": TOKENS, "every_n_steps": EVERY,
              "label_keys": ("tokens", "domain_ids"), **writer_kwargs}
    writer = RoutingTraceWriter(**kwargs)
    fit_two_layer_lm(root, writer, max_steps, ckpt_path, save_at)
    return writer


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("traces")
    return _fit(root, max_steps=6, save_at=4, scores=True), root


def test_rows_are_cadence_times_layers_times_tokens(full):
    writer, root = full
    table = read_routing_traces(root / "traces", format="arrow")
    assert table.num_rows == writer.rows_written == 3 * 2 * TOKENS  # steps 2, 4, 6 x 2 layers x 5 tokens
    assert sorted(set(table["step"].to_pylist())) == [2, 4, 6]
    assert sorted(set(table["layer"].to_pylist())) == LAYERS
    assert writer.shards == [f"traces-step{s:09d}-rank0000.parquet" for s in (2, 4, 6)]


def test_rows_read_back_with_datasets_hold_the_routing_and_labels(full):
    pytest.importorskip("datasets")
    _, root = full
    ds = read_routing_traces(root / "traces")
    assert ds.column_names == ["step", "rank", "batch_idx", "layer", "sample", "position", "tokens", "domain_ids",
                               "experts", "weights", "scores"]
    row = ds[0]
    assert len(row["experts"]) == 2 and len(row["weights"]) == 2 and len(row["scores"]) == 4
    assert all(0 <= e < 4 for e in row["experts"]) and len(set(row["experts"])) == 2
    assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-5)  # softmax scores over the 4 experts
    assert 0 <= row["sample"] < 2 and 0 <= row["position"] < 16


def test_both_layers_trace_the_same_tokens(full):
    _, root = full
    table = read_routing_traces(root / "traces", format="arrow").to_pydict()
    by_layer = {layer: [(s, b, p) for s, b, p, l in zip(table["step"], table["sample"], table["position"],
                                                       table["layer"]) if l == layer] for layer in LAYERS}
    assert by_layer[LAYERS[0]] == by_layer[LAYERS[1]]


def test_resume_appends_shards_and_continues_the_counts(full, tmp_path):
    writer, root = full
    # A copy of the interrupted run's folder as of its step-4 checkpoint (shards 2 and 4), then the resume.
    (tmp_path / "traces").mkdir()
    for name in writer.shards[:2]:
        shutil.copy(root / "traces" / name, tmp_path / "traces" / name)
    before = (tmp_path / "traces" / writer.shards[0]).read_bytes()
    resumed = _fit(tmp_path, max_steps=6, ckpt_path=root / "ckpt" / "step=4.ckpt", scores=True)
    assert resumed.shards == writer.shards and resumed.rows_written == writer.rows_written
    assert resumed.bytes_written == writer.bytes_written
    assert (tmp_path / "traces" / writer.shards[0]).read_bytes() == before  # old shards are never rewritten
    a = read_routing_traces(root / "traces", format="arrow")
    b = read_routing_traces(tmp_path / "traces", format="arrow")
    assert a.equals(b)  # the resumed run traced the same tokens with the same routing


def test_disk_budget_stops_writing_and_warns_once(tmp_path):
    with pytest.warns(UserWarning, match="RoutingTraceWriter stopped at step 4") as record:
        writer = _fit(tmp_path, max_steps=6, max_bytes=4000)
    assert len([w for w in record if "RoutingTraceWriter stopped" in str(w.message)]) == 1
    assert len(writer.shards) == 1 and 0 < writer.bytes_written <= 4000
    assert sum(f.stat().st_size for f in (tmp_path / "traces").iterdir()) == writer.bytes_written
    assert read_routing_traces(tmp_path / "traces", format="arrow").num_rows == 2 * TOKENS


def test_missing_pyarrow_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"need pyarrow: `pip install pyarrow`"):
        RoutingTraceWriter()


def test_reader_names_the_folder_when_empty(tmp_path):
    with pytest.raises(ValueError, match="no routing trace shard"):
        read_routing_traces(tmp_path)


# --------------------------------------------------------------------------------------- figures to loggers
class ImageLogger:  # the log_image(key, images=[...]) convention (Weights & Biases, Neptune)
    def __init__(self):
        self.images = []

    def log_image(self, key, images, step=None):
        self.images.append((key, images[0].shape, step))


class BoardLogger:  # the TensorBoard convention: logger.experiment.add_figure
    save_dir = None  # read by trainer.log_dir (None: the Trainer's default_root_dir)

    def __init__(self):
        self.figures = []
        self.experiment = self

    def add_figure(self, tag, figure, global_step=None, close=True):
        self.figures.append((tag, global_step, close))


class BrokenLogger:
    def log_image(self, key, images, step=None):
        raise RuntimeError("offline")


class CsvLike:
    experiment = object()


def test_figures_reach_every_logger_that_takes_images():
    pytest.importorskip("matplotlib")
    fig, _ = new_figure(1)
    image, board = ImageLogger(), BoardLogger()
    assert log_figure([image, board, CsvLike()], "load_train", fig, step=7) == 2
    assert image.images[0][0] == "load_train" and image.images[0][1][2] == 3 and image.images[0][2] == 7
    assert board.figures == [("load_train", 7, False)]


def test_a_failing_logger_warns_once_and_never_raises():
    pytest.importorskip("matplotlib")
    fig, _ = new_figure(1)
    warned: set[str] = set()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert log_figure([BrokenLogger()], "x", fig, 0, warned) == 0
    assert [str(w.message) for w in record] == [
        "BrokenLogger did not take the figure 'x' (RuntimeError: offline); it is still saved as a PNG. "
        "This warning is shown once per logger type."
    ]


def test_monitor_plots_go_to_the_trainers_image_loggers(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_moe.callbacks import RoutingConsistencyMonitor

    board = BoardLogger()
    monitor = RoutingConsistencyMonitor(every_n_steps=1)
    monitor.history_steps, monitor.history = [1, 2], {"layer": [torch.tensor([[0, 1]]), torch.tensor([[1, 2]])]}
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path)
    trainer.loggers = [board]
    monitor.on_fit_end(trainer, None)
    assert board.figures == [("consistency_saturation", 0, False)]
    assert monitor.saturation_vs_final == {"layer": [0.5, 1.0]}
