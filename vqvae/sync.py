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


def sum_across_ranks(counts, sums, sq_sums, candidates, candidate_ok):
    """Sum the statistics over all processes in one all-reduce of K + KD numbers (plus D for the sums of squares
    of `affine_reparam`, and K + KD for the re-seed candidates), never the N rows.

    Rank r contributes the re-seed candidates of the codes k with k % world == r, so after the sum every rank
    holds the same candidates: restarts agree everywhere, and draw on every rank's data.
    """
    world = world_size()
    if world == 1:
        return counts, sums, sq_sums, candidates, candidate_ok
    num_codes, dim = sums.shape
    parts = [counts, sums.reshape(-1)]
    if sq_sums is not None:
        parts.append(sq_sums)
    if candidates is not None:
        mine = torch.arange(num_codes, device=counts.device) % world == dist.get_rank()
        parts += [torch.where(mine[:, None], candidates, 0.0).reshape(-1), (mine & candidate_ok).float()]
    bucket = torch.cat(parts)
    dist.all_reduce(bucket)
    counts, sums, *rest = bucket.split([p.numel() for p in parts])
    if sq_sums is not None:
        sq_sums, *rest = rest
    if candidates is not None:
        candidates, candidate_ok = rest[0].view(num_codes, dim), rest[1] > 0.5
    return counts, sums.view(num_codes, dim), sq_sums, candidates, candidate_ok
