"""Where new codes come from: rows of a batch chosen to seed a codebook or to replace its dead codes.

Everything runs on the rows' device; `draw_in_proportion` also without a host read, so the re-seeds of every
training step stay asynchronous.
"""

from __future__ import annotations

import math

import torch

KMEANS_ROUNDS = 64


def draw_in_proportion(weights: torch.Tensor, k: int) -> torch.Tensor:
    """k indices drawn with replacement, each with probability weights[i] / weights.sum(), on the device and with
    no host read. (torch.multinomial takes at most 2**24 categories; a batch of rows may hold more.) With no
    positive weight, every draw is the last index."""
    cdf = weights.float().cumsum(dim=0)
    target = torch.rand(k, device=weights.device) * cdf[-1]
    return torch.searchsorted(cdf, target, right=True).clamp(max=weights.shape[0] - 1)


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
    sqnorm = rows.square().sum(dim=1)
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
        new = rows[chosen]
        dist = (sqnorm[:, None] - 2.0 * rows @ new.T + new.square().sum(dim=1)[None, :]).clamp(min=0.0)
        d2 = torch.minimum(d2, dist.amin(dim=1))
        picked.append(chosen)
        taken += m
    return torch.cat(picked)
