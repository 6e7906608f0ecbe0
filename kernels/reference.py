"""Plain PyTorch references for the quantizer's kernels.

Tests and benchmarks compare the Triton kernels with these, and the quantizer's `torch` backend runs them, so they
are written to be obviously right first and reasonably fast second (chunked, no one-hot matrices). They follow
the Triton functions' contracts, non-finite rows and skipped indices included, and check no inputs: callers do.
They compute in fp32, or in fp64 when given fp64 inputs: the tests' high-precision oracle.
"""

import torch

# A 1024 x 4096 fp32 score tile (16 MiB) stays in cache where 4096 x 4096 did not: at D = 32 on the 2-core CPU the
# search ran twice as fast with it (the scores are written and read once; at small D that traffic is the cost).
DEFAULT_CHUNK_ROWS, DEFAULT_CHUNK_CODES = 1024, 4096


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 chunk_codes: int = DEFAULT_CHUNK_CODES):
    """Index (int64 [N]) and squared L2 distance (float32 [N], fp64 for fp64 inputs) of the nearest codebook row.

    Works through x in chunks of `chunk_rows` and the codebook in tiles of `chunk_codes`, so at most
    chunk_rows x chunk_codes scores exist at once whatever N and K. Each score is |c|^2 - 2 x.c (the distance less
    |x|^2, the same for every code of a row), one matrix product of [x, 1] with [-2c, |c|^2]. With several tiles,
    a first pass keeps only each tile's lowest score per row (amin: a quarter of the cost of min with its index);
    then each row's best tile is scored again, for its rows alone, for the index (a host read per chunk of rows,
    to group them). Ties go to the lower index (the first best tile, the first best code in it). Like the kernel,
    it centres both sides on the codebook mean (distances are unchanged; rounding error shrinks), and gives rows
    holding NaN or inf (or whose squared norm overflows) index -1 and distance NaN.
    """
    dtype = _compute_dtype(x, codebook)
    codes = codebook.to(dtype)
    center = codes.mean(dim=0)
    centred_codes = codes - center
    weighted_codes = torch.cat([-2.0 * centred_codes, centred_codes.square().sum(dim=1, keepdim=True)], dim=1)
    num_codes = codes.shape[0]
    tiles = range(0, num_codes, chunk_codes)
    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    # One score buffer for every tile: a fresh allocation per tile costs page faults on the CPU.
    scores = torch.empty(min(chunk_rows, x.shape[0]), min(chunk_codes, num_codes), dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        rows = x[start : start + chunk_rows].to(dtype)
        lifted = torch.cat([rows - center, torch.ones_like(rows[:, :1])], dim=1)
        if len(tiles) == 1:
            chosen = torch.mm(lifted, weighted_codes.T, out=scores[: rows.shape[0]]).min(dim=1)[1]
        else:
            chosen = _best_in_best_tile(lifted, weighted_codes, tiles, chunk_codes, scores[: rows.shape[0]])
        dist = (rows - codes[chosen]).square().sum(dim=1)
        finite = torch.isfinite(rows.square().sum(dim=1))  # as the kernel: NaN, inf or overflow of |x|^2
        indices[start : start + chunk_rows] = torch.where(finite, chosen, -1)
        sq_dist[start : start + chunk_rows] = torch.where(finite, dist, float("nan"))
    return indices, sq_dist


def _best_in_best_tile(lifted, weighted_codes, tiles, chunk_codes, scores):
    tile_low = torch.empty(lifted.shape[0], len(tiles), dtype=scores.dtype, device=scores.device)
    for t, k0 in enumerate(tiles):
        tile = scores[:, : min(chunk_codes, weighted_codes.shape[0] - k0)]
        torch.mm(lifted, weighted_codes[k0 : k0 + chunk_codes].T, out=tile)
        torch.amin(tile, dim=1, out=tile_low[:, t])
    best_tile = tile_low.argmin(dim=1)  # NaN rows: some tile; they get index -1 anyway
    chosen = torch.empty(lifted.shape[0], dtype=torch.int64, device=lifted.device)
    for t in best_tile.unique().tolist():
        members = (best_tile == t).nonzero().squeeze(1)
        k0 = tiles[t]
        chosen[members] = (lifted[members] @ weighted_codes[k0 : k0 + chunk_codes].T).min(dim=1)[1] + k0
    return chosen


def code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int):
    """Per-code row counts [K] and row sums [K, D] (float32, fp64 for fp64 x) of x grouped by `indices`.

    Rows whose index is outside [0, num_codes) (-1 marks a row to leave out) add nothing.
    """
    keep = (indices >= 0) & (indices < num_codes)
    # Send left-out rows to an extra bin that is dropped, rather than selecting rows (a host sync on CUDA).
    bins = torch.where(keep, indices, num_codes)
    dtype = _compute_dtype(x)
    rows = torch.where(keep[:, None], x.to(dtype), 0.0)
    counts = torch.zeros(num_codes + 1, dtype=dtype, device=x.device)
    sums = torch.zeros(num_codes + 1, x.shape[1], dtype=dtype, device=x.device)
    counts.index_add_(0, bins, torch.ones_like(bins, dtype=dtype))
    sums.index_add_(0, bins, rows)
    return counts[:num_codes], sums[:num_codes]


def ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps: float) -> None:
    """Blend one batch's statistics into the EMA state and rebuild the codebook, in place.

    cluster_size <- decay * cluster_size + (1 - decay) * counts
    embed_sum    <- decay * embed_sum    + (1 - decay) * sums
    codebook_k   <- embed_sum_k / smoothed_k,  with Laplace smoothing
        smoothed_k = (cluster_size_k + eps) / (sum(cluster_size) + K * eps) * sum(cluster_size)
    so that a code whose count has decayed to nothing is not divided by zero. A batch with no rows
    (sum(counts) == 0) leaves all three exactly as they were. decay: a float or a 0-d tensor.
    """
    num_codes = cluster_size.shape[0]
    active = counts.sum() > 0
    blended_size = decay * cluster_size + (1.0 - decay) * counts
    blended_sum = decay * embed_sum + (1.0 - decay) * sums
    total = blended_size.sum()
    smoothed = (blended_size + eps) / (total + num_codes * eps) * total
    # where, not an early return: no host read of `active`, as in the kernel.
    codebook.copy_(torch.where(active, blended_sum / smoothed[:, None], codebook))
    embed_sum.copy_(torch.where(active, blended_sum, embed_sum))
    cluster_size.copy_(torch.where(active, blended_size, cluster_size))


def ema_update_(x, indices, cluster_size, embed_sum, codebook, decay, eps: float) -> torch.Tensor:
    """Both steps: statistics of (x, indices), then the blend. Returns the batch's per-code counts."""
    counts, sums = code_stats(x, indices, cluster_size.shape[0])
    ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
    return counts
