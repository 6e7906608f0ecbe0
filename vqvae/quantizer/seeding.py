"""Where new codes come from: rows of a batch chosen to seed a codebook or to replace its dead codes.

Everything runs on the rows' device; `draw_in_proportion` also without a host read, so the re-seeds of every
training step stay asynchronous.
"""

from __future__ import annotations

import math

import torch
from vq_kernels import reference

KMEANS_ROUNDS = 64


def draw_in_proportion(weights: torch.Tensor, k: int) -> torch.Tensor:
    """k indices drawn with replacement, each with probability weights[i] / weights.sum(), on the device and with
    no host read. (torch.multinomial takes at most 2**24 categories; a batch of rows may hold more.) With no
    positive weight, every draw is the last index."""
    cdf = weights.float().cumsum(dim=0)
    target = torch.rand(k, device=weights.device) * cdf[-1]
    return torch.searchsorted(cdf, target, right=True).clamp(max=weights.shape[0] - 1)


def first_of_copies(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool [K]: `mask`, except where an earlier masked row of `rows` [K, D] holds the very same vector. On the
    device with no host read: rows are compared by a hash of their bits (exact copies share it; two different rows
    rarely do, and then one re-seed waits a step), sorted with the masked rows first."""
    bits = rows.float().contiguous().view(torch.int32)
    # int32 products wrap around (still a hash) and sum into int64; at 2**18 codes of 32 features the temporaries
    # are 32 MiB, not the 64 MiB of int64 products.
    odd = (torch.arange(rows.shape[1], device=rows.device, dtype=torch.int32) * 2 + 1) * 0x2F3779B1
    key = (bits * odd).sum(dim=1, dtype=torch.int64)
    order = torch.argsort(key, stable=True)  # equal keys keep the rows' order
    order = order[torch.argsort((~mask[order]).to(torch.uint8), stable=True)]  # masked rows first
    key, masked = key[order], mask[order]
    repeat = torch.zeros_like(mask)
    repeat[order[1:]] = masked[1:] & masked[:-1] & (key[1:] == key[:-1])
    return mask & ~repeat


def random_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k random rows: distinct rows where there are k of them, repeats only where there are not."""
    n = rows.shape[0]
    if n >= k:
        return torch.randperm(n, device=rows.device)[:k]
    return torch.cat([torch.randperm(n, device=rows.device), torch.randint(n, (k - n,), device=rows.device)])


def kmeans_plus_plus(rows: torch.Tensor, k: int, rounds: int = KMEANS_ROUNDS) -> torch.Tensor:
    """Indices of k rows chosen by k-means++ seeding: each next row is drawn with probability proportional to its
    squared distance to the nearest row chosen so far, so the choice spreads over the data's regions.

    Exact k-means++ draws one row at a time (k passes over the rows); for large k the draws come in `rounds`
    rounds of ceil((k - 1) / rounds) rows, drawn without replacement from the same distances (k-means||-style;
    about one nearest-code search in all). No row is picked twice (rows already chosen have distance 0 and are not
    drawn again while others remain); with fewer rows than k, every row is taken and the rest repeat. Rows that are
    copies of each other can still be picked together within a round: pass distinct rows for distinct codes.
    """
    n, device = rows.shape[0], rows.device
    if n <= k:
        return random_rows(rows, k)
    chosen = torch.randint(n, (1,), device=device)
    d2 = (rows - rows[chosen]).square().sum(dim=1)
    per_round = math.ceil((k - 1) / rounds)
    picked = [chosen]
    taken = 1
    while taken < k:
        m = min(per_round, k - taken)
        d2[chosen] = 0.0
        # A floor far below any real distance keeps every weight positive (multinomial without replacement needs
        # m of them) without changing the draw while distances remain.
        weights = d2 + d2.amax().clamp(min=1e-20) * 1e-12
        chosen = torch.multinomial(weights, m, replacement=False)
        # each row's distance to the round's rows, in tiles (no N x m matrix: m reaches K / rounds)
        d2 = torch.minimum(d2, reference.nearest_code(rows, rows[chosen])[1].to(d2.dtype))
        picked.append(chosen)
        taken += m
    return torch.cat(picked)
