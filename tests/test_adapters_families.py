"""Every MoE family of the installed transformers is read correctly, or listed in UNREADABLE_FAMILIES with why.

The families are found automatically (``tests/hf_families.py``: configs that name an expert count), each built
tiny from its config (nothing downloaded) and run once under ``record_routing`` in a subprocess; our per-expert
counts and skipped slots are compared with the model's own routing (its router's returned selection, else what
the block handed its experts).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="Hugging Face adapters need the `hf` extra (transformers>=5)")

from hf_families import moe_families  # noqa: E402 - after the importorskip

from lightning_moe.adapters import UNREADABLE_FAMILIES  # noqa: E402

FAMILIES = moe_families()
SCRIPT = Path(__file__).with_name("hf_families.py")
GROUPS = 2  # one subprocess per core; each amortises the transformers import over its families


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """One JSON result per family, from GROUPS subprocesses run side by side (one process for all ~80 families
    ran out of memory; one per family spends most of its time importing transformers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *FAMILIES[g::GROUPS]], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for g in range(GROUPS)]
    out: dict[str, dict] = {}
    for proc in procs:
        stdout, _ = proc.communicate(timeout=600)
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                out[record["family"]] = record
    return out


def _problem(record: dict | None) -> str | None:
    """Why a family is not read correctly, or None when it is."""
    if record is None:
        return "its subprocess printed no result (crashed or timed out)"
    if "error" in record:
        return f"not built or run: {record['error']}"
    if not record["taps"]:
        return f"no tap found in {record['model']}"
    if record["warnings"]:
        return f"a tap removed itself: {record['warnings'][0]}"
    ours, theirs = record["ours"], record["theirs"]
    # A block the input never reaches (ERNIE-VL's vision experts on text) has no event and no reference call.
    if not ours or sorted(ours) != sorted(theirs):
        return f"events from {sorted(ours)}, the model routed in {sorted(theirs)}"
    for layer, events in ours.items():
        if [e["scores_columns"] for e in events if e["scores_columns"] is not None] != \
                [record["num_experts"][layer]] * sum(e["scores_columns"] is not None for e in events):
            return f"{layer}: scores_TE columns {[e['scores_columns'] for e in events]} != E"
        want = [(t["counts"], t["skipped"], t["dropped"]) for t in theirs.get(layer, [])]
        got = [(e["counts"], e["skipped"], e["dropped"]) for e in events]
        if got != want:
            return f"{layer}: (counts, skipped, dropped) ours {got} vs the model's {want}"
    return None


def test_the_enumeration_finds_the_families_we_know():
    print(f"{len(FAMILIES)} MoE families: {' '.join(FAMILIES)}")
    assert {"mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "llama4", "zaya", "dbrx", "switch_transformers"} \
        <= set(FAMILIES)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNREADABLE_FAMILIES])
def test_family_is_read_correctly(results, family):
    problem = _problem(results.get(family))
    assert problem is None, (
        f"{family}: {problem}. Fix the adapter, or list it with the reason in "
        "lightning_moe.adapters.huggingface.UNREADABLE_FAMILIES and the README table."
    )


@pytest.mark.parametrize("family", sorted(UNREADABLE_FAMILIES))
def test_a_listed_family_is_really_not_read(results, family):
    # The table stays honest: a family that became readable must leave it.
    if family not in FAMILIES:
        pytest.skip(f"{family} names no expert count in its config, so the enumeration does not reach it")
    assert _problem(results.get(family)) is not None, f"{family} is read correctly now: remove it from the table"


def test_skip_slots_are_counted_apart_from_the_experts(results):
    # ZAYA's skip class and LongCat-Flash's identity experts occur in these tiny forwards and match the model's.
    for family in ("zaya", "longcat_flash"):
        record = results[family]
        assert _problem(record) is None
        assert sum(e["skipped"] for events in record["ours"].values() for e in events) > 0


def test_capacity_drops_are_counted(results):
    # Switch (top-1) and NLLB-MoE (top-2) with capacity 2 drop choices in a 10-token forward; ours match theirs.
    for family in ("switch_transformers", "nllb_moe"):
        record = results[family]
        assert _problem(record) is None
        assert sum(e["dropped"] for events in record["ours"].values() for e in events) > 0
