"""FSDP2 through Lightning's ModelParallelStrategy on CPU (2 gloo processes): MoELanguageModel.configure_model
shards the blocks over the data-parallel mesh, and training matches one process with the same global batches
to the tolerance DDP meets (tests/test_ddp_lm.py). Tensor parallelism is refused with a clear error.

The two ranks are forked by the test, with the environment Lightning reads for externally created processes, so
they inherit the imports (the strategy's own launcher would start two fresh interpreters).
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.multiprocessing import ProcessRaisedException

from tests.test_ddp_lm import assert_matches_single_process, assert_ranks_identical, outcomes, train


def _rank(rank: int, port: int, router: str, out, data_parallel: int, tensor_parallel: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
    train(router, out, devices=2, strategy=strategy, batch_size=2)


def _launch(router: str, out, data_parallel: int = 2, tensor_parallel: int = 1) -> None:
    args = (find_free_network_port(), router, out, data_parallel, tensor_parallel)
    torch.multiprocessing.start_processes(_rank, args=args, nprocs=2, start_method="fork")


def test_fsdp2_training_matches_one_process(tmp_path):
    _launch("sigmoid", tmp_path / "fsdp")
    train("sigmoid", tmp_path / "single", batch_size=4)
    ranks, (single,) = outcomes(tmp_path / "fsdp", 2), outcomes(tmp_path / "single")
    assert ranks[0]["sharded"] and not single["sharded"]
    assert_ranks_identical(ranks)
    assert_matches_single_process(ranks, single)


def test_tensor_parallel_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ProcessRaisedException, match=r"tensor_parallel_size=2; use ModelParallelStrategy\("
                                                     r"data_parallel_size=2, tensor_parallel_size=1\)"):
        _launch("sigmoid", tmp_path / "tp", data_parallel=1, tensor_parallel=2)
