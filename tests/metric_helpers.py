"""Checks shared by the metric tests: DDP-safe state reductions and merging."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum


def assert_reductions(metric: Metric, allowed=(dim_zero_sum,)) -> None:
    """Every state reduces with one of ``allowed`` (sum by default), so DDP synchronisation is exact."""
    bad = {name: fn for name, fn in metric._reductions.items() if fn not in allowed}
    assert not bad, f"states not reduced by {allowed}: {bad}"


def assert_merge_equals_whole(make: Callable[[], Metric], update: Callable[[Metric, slice], None], n: int) -> None:
    """Two instances that saw two shares of the batches, merged, compute what one instance that saw every batch
    computes (what DDP's reduction of the states does). The ``n`` items are fed as batches of 10."""
    batches = [slice(i, min(i + 10, n)) for i in range(0, n, 10)]
    whole, first, second = make(), make(), make()
    for s in batches:
        update(whole, s)
    for i, s in enumerate(batches):
        update(first if i < len(batches) // 2 else second, s)
    first.merge_state(second)
    expected, got = whole.compute(), first.compute()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], equal_nan=True, msg=key)


SUM_OR_CAT = (dim_zero_sum, dim_zero_cat)
