"""Two gloo ranks that observe different tokens end with identical router state: the update of all their tokens.

Kept in its own file so a failure here reads as a distributed problem.
"""

import torch

from lightning_moe.gating import KMeansRouter, SigmoidTopK, TransitionRouter


def _stateful_routers():
    torch.manual_seed(0)
    routers = [SigmoidTopK(), KMeansRouter(), TransitionRouter(beta=False, precision=True, anticipation=False)]
    for router in routers:
        router.bind(8, 4, 2)
    return routers


def _observe_and_update(routers, halves_HTD):
    for router in routers:
        for x_TD in halves_HTD:
            routing = router(x_TD.unsqueeze(0))
            router.observe(x_TD, routing)
            router.observe_errors(x_TD.square().sum(-1), routing)  # a no-op for routers without precision
        router.update_state()


def _tokens():
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))


def _ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        routers = _stateful_routers()
        _observe_and_update(routers, _tokens()[rank : rank + 1])
        torch.save([r.state_dict() for r in routers], f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_take_one_update_from_all_their_tokens(tmp_path):
    # fork: the ranks inherit the imports instead of paying for them again.
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    routers = _stateful_routers()
    _observe_and_update(routers, _tokens())  # one process observing both ranks' tokens as micro-batches
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, router in enumerate(routers):
        for key, value in router.state_dict().items():
            torch.testing.assert_close(states[0][i][key], value)
            torch.testing.assert_close(states[1][i][key], value)
