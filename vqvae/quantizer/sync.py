"""The quantizer across processes: under torch.distributed every rank must keep the same codebook.

Each EMA step sums the per-code statistics (and the dead-code re-seed candidates) over all ranks, and the first
batch's initialisation is broadcast from rank 0. With torch.distributed not initialised nothing here runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def sum_across_ranks(counts, sums, candidates, candidate_ok):
    """Sum the statistics over all processes in one all-reduce of K + KD numbers (2K + 2KD with the re-seed
    candidates), never the N rows.

    Rank r contributes the re-seed candidates of the codes k with k % world == r, so after the sum every rank
    holds the same candidates: restarts agree everywhere, and draw on every rank's data.
    """
    world = world_size()
    if world == 1:
        return counts, sums, candidates, candidate_ok
    num_codes, dim = sums.shape
    parts = [counts, sums.reshape(-1)]
    if candidates is not None:
        mine = torch.arange(num_codes, device=counts.device) % world == dist.get_rank()
        parts += [torch.where(mine[:, None], candidates, 0.0).reshape(-1), (mine & candidate_ok).float()]
    bucket = torch.cat(parts)
    dist.all_reduce(bucket)
    counts, sums, *rest = bucket.split([p.numel() for p in parts])
    if candidates is not None:
        candidates, candidate_ok = rest[0].view(num_codes, dim), rest[1] > 0.5
    return counts, sums.view(num_codes, dim), candidates, candidate_ok


def sum_moments_across_ranks(n: torch.Tensor, rows: torch.Tensor):
    """The row count, per-feature sum and per-feature sum of squares of ``rows`` (zeros where not counted), over
    all processes: one all-reduce of 1 + 2D numbers, so that every rank moves its codebook by the same frame."""
    parts = torch.cat([n.reshape(1), rows.sum(dim=0), rows.square().sum(dim=0)])
    if world_size() > 1:
        dist.all_reduce(parts)
    dim = rows.shape[1]
    return parts[0], parts[1:1 + dim], parts[1 + dim:]
