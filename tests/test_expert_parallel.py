"""Expert parallelism on CPU with 2 and 4 gloo processes, against one process on the same global batch.

Each rank routes its own share of the global batch; the experts are sharded over the expert-parallel ranks and
the token copies travel by ``all_to_all``. What must not change: the layer's output and input gradients, every
parameter's gradient (expert gradients summed over the ranks whose tokens reached them, then averaged like the
rest), the aux losses, gradient clipping, one optimizer step, and stateful router buffers (bit-identical on every
rank). Loads are uneven, one expert never receives a token, and at P=4 one rank receives no row at all. Then the
same through Lightning (MoELanguageModel under ModelParallelStrategy, with monitors), checkpoints moving between
expert-parallel sizes, every router, and the refusals.

Ranks are forked (they inherit this process's imports), as in tests/test_fsdp.py.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_moe.callbacks import CouplingMonitor, LoadBalanceMonitor, RouterGeometryMonitor
from lightning_moe.experts import Experts
from lightning_moe.gating import ExpertChoice, KMeansRouter, SigmoidTopK, SoftmaxTopK, TransitionRouter
from lightning_moe.layers import MoELayer, update_router_states
from lightning_moe.modules import MoELanguageModel
from lightning_moe.parallel import ExpertParallelExperts, clip_grad_norm_, expert_parallel_mesh, shard_experts
from tests.helpers import TINY
from tests.test_ddp_lm import assert_matches_single_process, assert_ranks_identical, outcomes, train

E, D, F, B, S = 8, 8, 8, 4, 6
ROUTERS = {
    # Aux losses linear in the batch (z-loss is a token mean, the sequence balance loss a sequence mean), so the
    # mean of the ranks' losses is the single process's loss, not another objective.
    "softmax": lambda: SoftmaxTopK(load_balancing_weight=0.0, z_loss_weight=1e-2),
    "sigmoid": lambda: SigmoidTopK(bias_update_rate=1e-2, sequence_balance_weight=1e-2),
}


def _layer(router: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, top_k=2, router=ROUTERS[router]())
    with torch.no_grad():
        # Experts 6 and 7 are never chosen: an empty expert, and at P=4 a rank (owning 6 and 7) with no row.
        layer.router.layer.weight[6:] = 0
        layer.router.layer.weight[6:, 0] = -50
    return layer.train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_BSD = torch.randn(B, S, D, generator=g)
    x_BSD[..., 0] = x_BSD[..., 0].abs() + 0.5  # keeps experts 6 and 7 far below the others
    return x_BSD, torch.randn(B, S, D, generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(layer: MoELayer, x_BSD: torch.Tensor, g_BSD: torch.Tensor, world: int) -> dict:
    """Forward, backward of a mean loss, gradients averaged over ranks (FSDP2's job for the non-expert ones),
    one SGD step and one router-state update; everything returned as full tensors."""
    x_BSD = x_BSD.clone().requires_grad_()
    y_BSD = layer(x_BSD)
    loss = (y_BSD * g_BSD).sum(-1).mean() + layer.aux_loss
    loss.backward()
    for p in layer.parameters():
        if not isinstance(layer.experts, ExpertParallelExperts) or p not in set(layer.experts.parameters()):
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
    out = {"y": y_BSD.detach(), "x_grad": x_BSD.grad, "aux": {k: v.detach() for k, v in layer.aux_losses.items()},
           "counts_E": layer.routing.expert_counts(E),
           "grads": {n: _full(p.grad).clone() for n, p in layer.named_parameters()}}
    # A max norm below the gradient norm, so the clip scales every gradient (expert ones on their own mesh).
    clip = clip_grad_norm_ if world > 1 else torch.nn.utils.clip_grad_norm_
    out["grad_norm"] = clip(layer.parameters(), 0.05)
    out["clipped"] = {n: _full(p.grad).clone() for n, p in layer.named_parameters()}
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    update_router_states(layer)
    out["state"] = {n: _full(t).clone() for n, t in layer.state_dict().items()}
    return out


def _use_path(path: str) -> None:
    """``sorted``: run the sort + grouped GEMM path (CUDA's) on CPU too, instead of the fused CPU loop."""
    if path == "sorted":
        Experts._fused_forward = Experts._sorted_forward


def _ep_rank(rank: int, world: int, port: int, router: str, out, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _use_path(path)  # a forked child: the change dies with it
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _layer(router)
        sharded = shard_experts(layer, expert_parallel_mesh(world, world))
        assert len(sharded) == 3 and layer.experts.mlp.local("w1").shape == (E // world * F, D)
        x_BSD, g_BSD = (t.chunk(world)[rank] for t in _batch())
        torch.save(_step(layer, x_BSD, g_BSD, world), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("router", "world", "path"), [
    ("softmax", 2, "fused"), ("softmax", 4, "fused"), ("sigmoid", 2, "fused"), ("sigmoid", 4, "fused"),
    ("sigmoid", 4, "sorted"),
])
def test_layer_matches_one_process(router, world, path, tmp_path, monkeypatch):
    torch.multiprocessing.start_processes(_ep_rank, args=(world, find_free_network_port(), router, tmp_path, path),
                                          nprocs=world, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    if path == "sorted":
        monkeypatch.setattr(Experts, "_fused_forward", Experts._sorted_forward)
    single = _step(_layer(router), *_batch(), world=1)
    assert (single["counts_E"][6:] == 0).all() and single["counts_E"].max() > 2 * single["counts_E"].min()
    cat = lambda key: torch.cat([r[key] for r in ranks])  # noqa: E731
    torch.testing.assert_close(cat("y"), single["y"], rtol=1e-5, atol=1e-6)
    # The loss is the mean of the ranks' local means, so each token's input gradient carries 1 / world more.
    torch.testing.assert_close(cat("x_grad") / world, single["x_grad"], rtol=1e-5, atol=1e-7)
    assert ranks[0]["aux"].keys() == single["aux"].keys() and single["aux"]
    for k, v in single["aux"].items():
        torch.testing.assert_close(torch.stack([r["aux"][k] for r in ranks]).mean(), v, rtol=1e-5, atol=1e-7)
    assert single["grad_norm"] > 0.05
    for r in ranks:
        torch.testing.assert_close(r["grad_norm"], single["grad_norm"], rtol=1e-5, atol=0)
    for key in ("grads", "clipped", "state"):
        for name, want in single[key].items():
            for r in ranks:
                if name.endswith("expert_bias"):
                    assert torch.equal(r[key][name], want), name
                torch.testing.assert_close(r[key][name], want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(single["state"]["router.expert_bias"], torch.zeros(E)) if router == "sigmoid" else True


# ------------------------------------------------------------------------------ through Lightning
GLOBAL_BATCH = 8
CLIP = 0.5  # gradient-norm clipping on, through MoELanguageModel.configure_gradient_clipping under EP


def _monitors() -> list:
    # The load monitor counts routing events; geometry and coupling also read the expert weights (gathered).
    return [LoadBalanceMonitor(every_n_steps=2), RouterGeometryMonitor(every_n_steps=2),
            CouplingMonitor(every_n_steps=2)]


def _lm_rank(rank: int, world: int, port: int, out, ep: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    train("sigmoid", out, devices=world, strategy=strategy, batch_size=GLOBAL_BATCH // world, callbacks=_monitors(),
          gradient_clip_val=CLIP, expert_parallel_size=ep)


def _launch(world: int, out, ep: int) -> None:
    torch.multiprocessing.start_processes(_lm_rank, args=(world, find_free_network_port(), out, ep), nprocs=world,
                                          start_method="fork")


@pytest.fixture(scope="module")
def single_lm(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    train("sigmoid", out, batch_size=GLOBAL_BATCH, callbacks=_monitors(), gradient_clip_val=CLIP)
    return outcomes(out)[0]


@pytest.mark.parametrize(("world", "ep"), [(2, 2), (4, 2), (4, 4)], ids=["ep2", "dp2xep2", "ep4"])
def test_training_matches_one_process(world, ep, single_lm, tmp_path):
    """MoELanguageModel(expert_parallel_size=ep) under ModelParallelStrategy: experts sharded over ep ranks,
    FSDP2 on the rest over all ranks, gradient-norm clipping on (it clips: the norm is ~1.3 at the first step);
    losses, parameters after 4 AdamW steps and the sign-rule bias (bit-identical) equal one process's on the
    same global batches; the load monitor logs the same numbers as the same ranks without expert parallelism
    (its per-micro-batch MaxVio is each rank's own batch's, so not one process's)."""
    _launch(world, tmp_path / "ep", ep)
    _launch(world, tmp_path / "fsdp", 1)
    ranks, fsdp = outcomes(tmp_path / "ep", world), outcomes(tmp_path / "fsdp", world)
    assert ranks[0]["sharded"]
    assert_ranks_identical(ranks)
    assert_matches_single_process(ranks, single_lm)
    assert {k.split("/")[1] for k in fsdp[0]["monitors"]} == {"load", "geometry", "coupling"}
    assert ranks[0]["monitors"].keys() == fsdp[0]["monitors"].keys()
    for key, value in fsdp[0]["monitors"].items():
        assert ranks[0]["monitors"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# ------------------------------------------------------------------------------ checkpoints in one layout
class StartState(pl.Callback):
    """Each rank writes the full state it starts training from (after a checkpoint was restored)."""

    def __init__(self, out) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"start{trainer.global_rank}.pt")


def _resume_rank(rank: int, world: int, port: int, out, ep: int, steps: int, ckpt_in, ckpt_out, dcp: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    # dcp=False: one checkpoint file with the full (gathered) state, the layout of a single process; True: a
    # torch.distributed.checkpoint folder of shards.
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=dcp)
    _resume(out, world, strategy, ep, steps, ckpt_in, ckpt_out)


def _resume(out, world, strategy, ep, steps, ckpt_in, ckpt_out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainer = train("sigmoid", out, devices=world, strategy=strategy, batch_size=GLOBAL_BATCH // world,
                    callbacks=[StartState(out)], ckpt_path=ckpt_in, steps=steps, expert_parallel_size=ep)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)


def _run(out, world: int, ep: int, steps: int, ckpt_in=None, ckpt_out=None, dcp: bool = False) -> None:
    if world == 1:
        _resume(out, 1, "auto", 1, steps, ckpt_in, ckpt_out)
        return
    torch.multiprocessing.start_processes(
        _resume_rank, args=(world, find_free_network_port(), out, ep, steps, ckpt_in, ckpt_out, dcp), nprocs=world,
        start_method="fork",
    )


def _assert_states_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_checkpoints_move_between_expert_parallel_sizes(tmp_path):
    """P=2 writes a checkpoint, one process (P=1) resumes from it and writes another, P=4 resumes from that:
    every run starts from exactly the parameters (and router buffers) the previous one saved, under the same names
    and shapes (experts.mlp.w1 [E*F, D]), and P=4 continues exactly as one process resuming the same checkpoint."""
    _run(tmp_path / "p2", world=2, ep=2, steps=2, ckpt_out=tmp_path / "p2.ckpt")
    _run(tmp_path / "p1", world=1, ep=1, steps=4, ckpt_in=tmp_path / "p2.ckpt", ckpt_out=tmp_path / "p1.ckpt")
    _run(tmp_path / "p4", world=4, ep=4, steps=6, ckpt_in=tmp_path / "p1.ckpt")
    _run(tmp_path / "p1_again", world=1, ep=1, steps=6, ckpt_in=tmp_path / "p1.ckpt")
    (p2,), (p1,), p4 = outcomes(tmp_path / "p2", 1), outcomes(tmp_path / "p1"), outcomes(tmp_path / "p4", 4)
    (p1_again,) = outcomes(tmp_path / "p1_again")
    assert p2["state"]["model.blocks.0.ffn.experts.mlp.w1"].shape == (4 * 16, 16)
    _assert_states_equal(torch.load(tmp_path / "p1" / "start0.pt"), p2["state"])
    for r in range(4):
        _assert_states_equal(torch.load(tmp_path / "p4" / f"start{r}.pt"), p1["state"])
    assert len(p4[0]["losses"]) == 2
    assert_ranks_identical(p4)
    assert_matches_single_process(p4, p1_again)


def test_distributed_checkpoints_reshard_between_expert_parallel_sizes(tmp_path):
    """A torch.distributed.checkpoint folder of shards written at P=2 resumes at P=4 from the same full
    parameters and router buffers."""
    _run(tmp_path / "p2", world=2, ep=2, steps=2, ckpt_out=tmp_path / "p2_dcp", dcp=True)
    _run(tmp_path / "p4", world=4, ep=4, steps=3, ckpt_in=tmp_path / "p2_dcp")
    (p2,) = outcomes(tmp_path / "p2", 1)
    assert (tmp_path / "p2_dcp").is_dir()
    for r in range(4):
        _assert_states_equal(torch.load(tmp_path / "p4" / f"start{r}.pt"), p2["state"])


# ------------------------------------------------------------------------------ every router, and refusals
EVERY_ROUTER = {
    "expert_choice": lambda: ExpertChoice(),
    "kmeans": lambda: KMeansRouter(),
    "transition": lambda: TransitionRouter(),
}


def _router_rank(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, make in EVERY_ROUTER.items():
            torch.manual_seed(0)
            layer = MoELayer(D, F, E, top_k=2, router=make())
            shard_experts(layer, expert_parallel_mesh(world, world))
            x_BSD = _batch()[0].chunk(world)[rank].clone().requires_grad_()
            y_BSD = layer(x_BSD)
            y_BSD.square().sum().backward()
            update_router_states(layer)
            results[name] = (y_BSD.detach(), x_BSD.grad, {k: v.clone() for k, v in layer.router.state_dict().items()})
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_router_runs_under_expert_parallelism(tmp_path):
    """Expert choice (batch-dependent, padded slots), k-means and transition routers: each rank's output and input
    gradient under P=2 are those of one process applying the layer to that rank's tokens; router buffers after
    an update (centroids, biases, statistics summed over ranks) are bit-identical on both ranks."""
    world = 2
    torch.multiprocessing.start_processes(_router_rank, args=(world, find_free_network_port(), tmp_path),
                                          nprocs=world, start_method="fork")
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, make in EVERY_ROUTER.items():
            torch.manual_seed(0)
            layer = MoELayer(D, F, E, top_k=2, router=make())
            x_BSD = _batch()[0].chunk(world)[rank].clone().requires_grad_()
            y_BSD = layer(x_BSD)
            y_BSD.square().sum().backward()
            torch.testing.assert_close(got[name][0], y_BSD.detach(), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(got[name][1], x_BSD.grad, rtol=1e-5, atol=1e-6, msg=name)
    first = torch.load(tmp_path / "rank0.pt")
    for rank in range(1, world):
        for name, (_, _, state) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert state.keys() == first[name][2].keys()
            for key, value in state.items():
                assert torch.equal(value, first[name][2][key]), f"{name}: {key}"
    assert any(first[name][2] for name in EVERY_ROUTER)


def test_unsupported_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by expert_parallel_size=3.*divides 4"):
        MoELanguageModel(**TINY, expert_parallel_size=3)
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 needs backend='native', got backend='megablocks'"):
        MoELanguageModel(**TINY, backend="megablocks", expert_parallel_size=2)
    with pytest.raises(ValueError, match=r"expert_parallel_size must be > 0"):
        MoELanguageModel(**TINY, expert_parallel_size=0)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by expert_parallel_size=4"):
        expert_parallel_mesh(6, 4)
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 needs Lightning's ModelParallelStrategy"):
        MoELanguageModel(**TINY, expert_parallel_size=2).setup("fit")  # a Trainer without a device mesh
