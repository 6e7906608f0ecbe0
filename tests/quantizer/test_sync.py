"""The quantizer across processes (vqvae/quantizer/sync.py): every rank keeps the same codebook, and without
torch.distributed nothing is synchronised."""

import faulthandler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqvae.quantizer import VectorQuantizer

K, D, STEPS, WORLD = 24, 8, 4, 2


def _batch(step, rank, rows=40):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1000 * step + rank))



def _distributed_worker(rank, init_file, out_dir, fixed_start):
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test instead of the CI run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Re-seeding on: the restarts must agree across ranks too.
        torch.manual_seed(100 + rank)  # different random picks on each rank
        restarting = fixed_start(VectorQuantizer(K, D, backend="torch", dead_code_threshold=2.5))
        # Re-seeding off: must equal one process that sees both ranks' batches.
        plain = fixed_start(VectorQuantizer(K, D, backend="torch", dead_code_threshold=0.0))
        # Initialisation from data: every rank must end up with rank 0's codebook.
        fresh = VectorQuantizer(K, D, backend="torch")
        for step in range(STEPS):
            restarting(_batch(step, rank))
            plain(_batch(step, rank))
            fresh(_batch(step, rank) * (rank + 1))
        torch.save({name: module.state_dict() for name, module in
                    (("restarting", restarting), ("plain", plain), ("fresh", fresh))}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_keep_identical_codebooks(tmp_path, fixed_start):
    # the fixture's function travels to the workers by reference (conftest._fixed_start)
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path), fixed_start), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("restarting", "plain", "fresh"):
        for key, value in states[0][name].items():
            assert torch.equal(value, states[1][name][key]), f"{name}.{key} differs between ranks"
    assert (states[0]["restarting"]["codebook.cluster_size"] >= 2.5).all(), "dead codes were re-seeded"

    single = fixed_start(VectorQuantizer(K, D, backend="torch", dead_code_threshold=0.0))
    for step in range(STEPS):
        single(torch.cat([_batch(step, r) for r in range(WORLD)]))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0]["plain"][key], value, rtol=1e-5, atol=1e-6)


def test_without_torch_distributed_nothing_is_synchronised(fixed_start):
    assert not dist.is_initialized()
    quantizer = fixed_start(VectorQuantizer(K, D, backend="torch"))
    quantizer(_batch(0, 0))  # would raise if it tried to all-reduce
