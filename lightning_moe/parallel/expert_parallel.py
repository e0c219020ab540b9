"""Expert parallelism on the native backend: each rank of an expert-parallel group of size P holds E/P experts.

Legend: T local tokens, D model width, F expert width, E experts, L = E/P local experts, K slots per token,
N = T*K routed copies sent by this rank, M copies received by this rank, P expert-parallel ranks.

Forward of one layer (the router already ran on this rank's own tokens, so routing events are unchanged):
sort the N copies by expert (the native dispatch) -> exchange per-expert counts -> ``all_to_all`` the copies to
the ranks owning their experts -> run the L local experts with the native kernels (fused on CPU, grouped GEMM
elsewhere) -> ``all_to_all`` the outputs back -> weight and un-permute (the native combine). Backward runs the
same two exchanges in reverse (:class:`_AllToAll`). Dropless: splits are uneven, an expert may receive nothing.
The native dispatch and combine and the expert kernels are reused as they are: only the exchange is new.

Weights stay in one layout: ``experts.mlp.w1`` etc. are DTensors of global shape ``[E*F, D]`` sharded on dim 0
over the ``expert_parallel`` mesh dimension, so a full state dict (or a DCP checkpoint) holds the same tensors
whatever P, and loads at any other P.

Gradients: a rank's local experts receive gradients from the tokens of every rank of its expert-parallel group.
To match FSDP2 on the other parameters (the mean of every rank's gradient, so a per-rank mean loss gives the
gradient of the global mean), expert gradients are summed over the expert's replicas (the
``expert_data_parallel`` mesh dimension) and divided by the world size, once per backward. This happens inside
the autograd graph (:class:`_ExpertGrad`), not in parameter hooks, which are lost where a module move replaces
the parameter objects (as Lightning's strategy setup does with DTensors).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_moe.experts.native import Experts
from lightning_moe.gating.base import Routing
from lightning_moe.utils import check_positive_int

EP_DIMS = ("expert_data_parallel", "expert_parallel")


def check_expert_parallel(num_experts: int, backend: str, expert_parallel_size: int) -> None:
    """Refuse, before anything is built, what expert parallelism does not support."""
    check_positive_int("expert_parallel_size", expert_parallel_size)
    if expert_parallel_size == 1:
        return
    if num_experts % expert_parallel_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by expert_parallel_size={expert_parallel_size}; every "
            "expert-parallel rank holds num_experts / expert_parallel_size experts, so choose an "
            f"expert_parallel_size that divides {num_experts}."
        )
    if backend != "native":
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} needs backend='native', got backend={backend!r}; "
            "MegaBlocks' own expert parallelism is not wired in. Use backend='native' or expert_parallel_size=1."
        )


def expert_parallel_mesh(world_size: int, expert_parallel_size: int, device_type: str = "cpu") -> DeviceMesh:
    """A ``(expert_data_parallel, expert_parallel)`` mesh over all ranks: consecutive ranks form an
    expert-parallel group; ranks at the same position in every group hold the same experts."""
    if world_size % expert_parallel_size:
        raise ValueError(
            f"the world size {world_size} is not divisible by expert_parallel_size={expert_parallel_size}; "
            f"choose an expert_parallel_size that divides the number of processes ({world_size})."
        )
    return init_device_mesh(device_type, (world_size // expert_parallel_size, expert_parallel_size),
                            mesh_dim_names=EP_DIMS)


def _exchange(x_ND: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x_ND.new_empty(sum(recv), *x_ND.shape[1:])
    dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks with uneven splits (``send[j]`` rows to rank j, ``recv[j]`` from it); backward sends
    the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_ND, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x_ND, send, recv, group)

    @staticmethod
    def backward(ctx, g_MD):
        return _exchange(g_MD, ctx.recv, ctx.send, ctx.group), None, None, None


class _ExpertGrad(torch.autograd.Function):
    """Identity on a local expert weight; backward sums its gradient over the expert's replicas and divides by
    the world size (FSDP2's mean over all ranks for the other parameters)."""

    @staticmethod
    def forward(ctx, w, replica_group, replicas, world):
        ctx.replica_group, ctx.replicas, ctx.world = replica_group, replicas, world
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        g = g / ctx.world  # a new tensor: the incoming gradient is not ours to change in place
        if ctx.replicas > 1:
            dist.all_reduce(g, group=ctx.replica_group)
        return g, None, None, None


class ExpertParallelExperts(Experts):
    """:class:`Experts` whose weights are sharded over an expert-parallel mesh dimension (see the module
    docstring). Built by :func:`shard_experts` from a module's ``Experts``; ``num_experts`` stays E.

    Args:
        experts: the native ``Experts`` to shard; each expert-parallel group takes its shards from its first
            rank, so replicas start equal when every rank holds the same values (as after seeding).
        mesh: a mesh with dimensions ``expert_data_parallel`` and ``expert_parallel`` (:func:`expert_parallel_mesh`).
    """

    def __init__(self, experts: Experts, mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)
        P = mesh["expert_parallel"].size()
        check_expert_parallel(experts.num_experts, experts.backend, P)
        self.activation, self.backend, self._megablocks = experts.activation, experts.backend, None
        self.mlp = experts.mlp
        ep_mesh = mesh["expert_parallel"]
        for name in ("w1", "v1", "w2"):
            w = getattr(self.mlp, name)
            if w is not None:
                # Shard(0) of [E*F, D] gives rank j the contiguous rows of experts j*L .. (j+1)*L - 1.
                setattr(self.mlp, name, nn.Parameter(distribute_tensor(w.detach(), ep_mesh, [Shard(0)])))
        self.ep_size = P
        self._ep_group = ep_mesh.get_group()
        self._replica_group = mesh["expert_data_parallel"].get_group()
        self._replicas = mesh["expert_data_parallel"].size()
        self._world = mesh.size()

    @property
    def num_experts(self) -> int:
        return self.mlp.num_experts

    def _local_weight(self, name: str) -> Tensor:
        # Before any cast to the compute dtype: gradients are reduced in the parameters' dtype.
        return _ExpertGrad.apply(super()._local_weight(name), self._replica_group, self._replicas, self._world)

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        P, L, E = self.ep_size, self.mlp.local_experts, self.num_experts
        # Padding slots (mask_TK False: expert choice gives every token E slots, weight 0 where unchosen) go to
        # a sentinel expert E, sorted after the real copies and never sent: their outputs are weighted by 0 and
        # no gradient reaches their weights, so sending them would only multiply the exchange.
        experts_TK = routing.experts_TK
        if routing.mask_TK is not None:
            experts_TK = experts_TK.masked_fill(~routing.mask_TK, E)
        x_ND, order_N, counts = self._dispatch(x_TD, replace(routing, experts_TK=experts_TK), E + 1)
        # Copies sorted by expert are grouped by destination rank already (rank j owns experts j*L .. j*L+L-1).
        counts_PL = counts[:E].view(P, L)
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self._ep_group)
        # The one host read of expert parallelism: all_to_all needs its split sizes as host ints (NCCL and
        # gloo alike), so the layer waits for the count exchange here. 2P + P*L numbers in one read.
        sizes = torch.cat([counts_PL.sum(1), recv_PL.sum(1), recv_PL.reshape(-1)]).tolist()
        send, recv, recv_counts = sizes[:P], sizes[P : 2 * P], sizes[2 * P :]
        x_MD = _AllToAll.apply(x_ND[: sum(send)], send, recv, self._ep_group)
        # Received rows come by source rank, each source's block sorted by local expert.
        local_M = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(P),
            torch.tensor(recv_counts, device=x_TD.device), output_size=sum(recv),
        )
        # The local experts through the native kernels, as a K = 1 routing with weight 1 (exact in fp32): the
        # router's weights are applied once, by the combine below, on this rank's own copies. Experts never read
        # the scores, hence the empty ones.
        ones_M1 = x_MD.new_ones(x_MD.shape[0], 1, dtype=torch.float32)
        local = Routing(local_M.unsqueeze(1), ones_M1, x_MD.new_empty(x_MD.shape[0], 0))
        # Called even with no row received (M = 0): the local experts then get zero gradients, and every rank
        # takes part in the replica all-reduce of _ExpertGrad (a rank skipping it would hang the others).
        y_MD = super().forward(x_MD, local)
        y_ND = _AllToAll.apply(y_MD, recv, send, self._ep_group)
        padding = x_ND.shape[0] - sum(send)
        if padding:
            y_ND = torch.cat([y_ND, y_ND.new_zeros(padding, y_ND.shape[1])])
        return self._combine(y_ND, order_N, routing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert_parallel_size={self.ep_size}"


def shard_experts(module: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Replace the ``Experts`` of every :class:`~lightning_moe.MoELayer` in ``module`` by
    :class:`ExpertParallelExperts` over ``mesh`` (:func:`expert_parallel_mesh`); returns the sharded parameters
    (pass them to FSDP2's ``fully_shard(..., ignored_params=...)``, which must not shard them again)."""
    from lightning_moe.layers import moe_layers  # layers imports the experts package; avoid a cycle

    if tuple(mesh.mesh_dim_names or ()) != EP_DIMS:
        raise ValueError(f"mesh must have dimensions {EP_DIMS}, got {mesh.mesh_dim_names}; build it with "
                         "lightning_moe.parallel.expert_parallel_mesh.")
    sharded: set[nn.Parameter] = set()
    for layer in moe_layers(module):
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts(layer.experts, mesh)
        sharded.update(layer.experts.parameters())
    return sharded


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2 norm over all gradients) where gradients are DTensors on different
    meshes (experts on the expert-parallel mesh, the rest on FSDP2's), which torch's version cannot stack.
    Returns the total norm before clipping. Runs at the optimizer step, never in the forward."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Each norm reduced over its own mesh, then combined as plain tensors.
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    # torch's clip_grad_norm_ formula: scale by min(1, max_norm / (total + 1e-6)), without a host read.
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(scale.to(local.dtype))
    return total
