"""Expert parallelism for the native backend: experts sharded over a device mesh, tokens exchanged with
``all_to_all`` (NCCL on GPUs, gloo on CPU)."""

from lightning_moe.parallel.expert_parallel import (
    ExpertParallelExperts,
    check_expert_parallel,
    clip_grad_norm_,
    expert_parallel_mesh,
    shard_experts,
)

__all__ = ["ExpertParallelExperts", "check_expert_parallel", "clip_grad_norm_", "expert_parallel_mesh", "shard_experts"]
