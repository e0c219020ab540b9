"""Shipped study records: every study folder with a ``records/`` rebuilds its committed REPORT.md byte for byte
from them, without training (the plots are drawn into a scratch folder)."""

import pathlib

import pytest

from lightning_moe.studies import load_study, plan_runs
from lightning_moe.studies.report import write_report
from lightning_moe.studies.runner import RECORDS_DIR, StudyPaths

ROOT = pathlib.Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.parent for p in ROOT.rglob(f"{RECORDS_DIR}/runs.jsonl"))


def test_some_study_ships_its_records():
    assert SHIPPED


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.parent.relative_to(ROOT).as_posix())
def test_the_committed_report_is_rebuilt_byte_for_byte_from_the_records(folder, tmp_path):
    study = load_study(folder.parent)
    records = StudyPaths.of_records(study)
    report = write_report(study, plan_runs(study), StudyPaths(records.root, tmp_path, records=True))
    assert report.read_text() == (folder.parent / "REPORT.md").read_text()
