"""Shipped study records: every study folder with a ``records/`` rebuilds its committed REPORT.md byte for byte
from them with ``lightning-moe study report``, without training (on a copy of ``recipes/``, so the committed
files are only read)."""

import pathlib
import shutil

import pytest

from lightning_moe.studies import load_study
from lightning_moe.studies.cli import main
from lightning_moe.studies.runner import RECORDS_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.parent.parent for p in ROOT.rglob(f"{RECORDS_DIR}/runs.jsonl"))
COMPANIONS = {c for folder in SHIPPED for c in load_study(folder).companions}
TOP = [folder for folder in SHIPPED if folder not in COMPANIONS]


def test_some_study_ships_its_records():
    assert TOP


@pytest.mark.parametrize("folder", TOP, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_committed_reports_are_rebuilt_byte_for_byte_from_the_records(folder, tmp_path):
    copy = tmp_path / "recipes"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("plots"))
    assert main(["report", str(copy / folder.relative_to(ROOT))]) == 0
    for study in [folder, *load_study(folder).companions]:
        rebuilt = copy / study.relative_to(ROOT) / "REPORT.md"
        assert rebuilt.read_text() == (study / "REPORT.md").read_text(), study.relative_to(ROOT)
