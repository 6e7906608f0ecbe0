"""Running the trainer as several processes under torchrun: the process group, DDP, and what ranks share.

Without torchrun's environment (RANK, WORLD_SIZE) every function here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vqvae.checkpoint import rng_state, set_rng_state
from vqvae.config import ConfigError
from vqvae.data import DataError
from vqvae.model import VQVAE


@dataclass
class Processes:
    """This process's place among those torchrun started; rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this trainer created the process group, so it destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(device: torch.device) -> tuple[Processes, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU) when RANK and WORLD_SIZE say there are
    several processes, or adopt a group the caller has already made. Each process takes GPU ``LOCAL_RANK``."""
    adopted = dist.is_available() and dist.is_initialized()
    launched = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not (adopted or launched):
        return Processes(), device
    if not dist.is_available():
        raise ConfigError("this process was started by torchrun, but this torch build has no torch.distributed")
    if "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    else:  # a group made by the caller, without torchrun: the caller has chosen the GPU
        local_rank = torch.cuda.current_device() if device.type == "cuda" else 0
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                              f"visible: start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not adopted:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Processes(dist.get_rank(), local_rank, dist.get_world_size(), owns_group=not adopted), device


def stop_processes(procs: Processes) -> None:
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(procs: Processes):
    """Rank 0 runs the block first, then the other ranks: a hub dataset is downloaded and cached once. If the
    block fails on rank 0, the others raise too rather than wait for it."""
    if not procs.distributed:
        yield
        return
    if not procs.main and not _rank0_succeeded(None):
        raise DataError("rank 0 could not load the data (its error is above)")
    try:
        yield
    except BaseException:
        if procs.main:
            _rank0_succeeded(False)
        raise
    if procs.main:
        _rank0_succeeded(True)


def _rank0_succeeded(ok: bool | None) -> bool:
    """Rank 0 passes ``ok``; the others get it."""
    flag = torch.tensor([bool(ok)], dtype=torch.int32, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def wrap_model(model: VQVAE, device: torch.device, procs: Processes) -> torch.nn.Module:
    """The model itself on one process; under torchrun, DistributedDataParallel for the gradient all-reduce.

    DDP broadcasts rank 0's parameters when it is built, and by default re-broadcasts every buffer from rank 0
    at the start of each forward. The quantizer's buffers (codebook, cluster_size, embed_sum) need no such help:
    they start equal (the same checkpoint, or the first batch's initialisation broadcast from rank 0), and each
    EMA step all-reduces every rank's statistics before the blend, so all ranks make the same step and keep the
    same codebook. The per-forward broadcast would only resend them (2 K D + K floats, 8 MB at the seed config)
    every micro-batch, so it is switched off.
    """
    if not procs.distributed:
        return model
    # A 1x1 convolution's weight gradient can come back with other strides on its size-1 dimensions: the same
    # memory layout as the weight, but DDP compares the strides and warns once per rank. Its copy into the
    # all-reduce bucket is the one it makes for every gradient anyway, and no slower here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    options = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False  # torch >= 2.13's name; broadcast_buffers is deprecated there
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)


def mean_over_ranks(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.distributed:
        dist.all_reduce(values)  # a sum: gloo has no average
        values = values / procs.world_size
    return values


def gather_rng_states(procs: Processes) -> list[dict] | None:
    """Every rank's RNG states, on rank 0 (None on the others, and with one process), for the checkpoint: the
    ranks draw different dead-code re-seed candidates, so each must resume its own stream."""
    if not procs.distributed:
        return None
    states = [None] * procs.world_size if procs.main else None
    dist.gather_object(rng_state(), states, dst=0)
    return states


def restore_rng(ckpt: dict, procs: Processes, seed: int) -> None:
    states = ckpt.get("rng_ranks")
    if procs.distributed and states is not None and len(states) == procs.world_size:
        set_rng_state(states[procs.rank])
        return
    set_rng_state(ckpt["rng"])
    if procs.distributed and not procs.main:
        # a checkpoint of another number of processes: rank 0 goes on with its stream, the others start their own
        torch.manual_seed(seed + procs.rank)
