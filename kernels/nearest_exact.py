"""`exact` mode of the nearest-code search: the fp16 sweep of `vq_kernels.nearest_pass`, then fp32 where it cannot
decide.

The result is a nearest code up to fp32 rounding of the distances. Each score s'_k of the fp16 pass is within E of
the score s_k of the fp32 centred operands, with
    E = 2 (d C + (X + d) R) + (X + d)(C + R)(D + 1) 2**-21 + (D + 2) 2**-24 (C + R)^2,
X = |x - m| and d = |rounding error of the row| (measured per row), C = max_k |c_k - m| and R = max_k |rounding
error of code k| (measured by `prepare_codebook`). The terms: x'.c' - x~.c~ = dx.c' + x~.dc (Cauchy-Schwarz on
each); fp32 accumulation of D exact fp16 products, allowing each addition an error of 2**-22 of the running
magnitude (twice round-to-nearest's, for truncating tensor-core adders); the fp32 sums of squares in |c_k - m|^2
and the final rounding of s'_k. With T = 2E (and a 2**-10 margin), each row keeps the minima of its KEEP best code
tiles (with indices) and, for each tile, its second-smallest score; from these it knows s1 (its best score) and a
lower bound L on the score of every code outside the kept ones. Three levels settle a row:
  0 certified    every other code scores above s1 + T: the best code is the nearest.
  1 candidates   L > s1 + T: the nearest is one of the kept minima within s1 + T; they are rescored by their exact
                 fp32 distances (`_exact_kernel`, at the end of the sweep).
  2 fallback     otherwise the row is listed, and a second pass over the whole codebook (`_fallback_kernel`, split
                 across programs) rescores, by exact fp32 distance, every code whose fp16 score is within s1 + T;
                 `_finish_kernel` writes its answers.
Between codes at the same fp32 distance (exact duplicates among them: they compute bit-identical distances), the
lower index wins. With splits (few rows, many codes: `vq_kernels.nearest_pass.search_splits`) each program keeps the
minima of its own range of codes, and `_merge_kernel` offers them all to one row's KEEP, as the sweep offers tiles,
before settling the rows as above: what it turns away lowers the bound on the unkept codes, so the levels hold.
"""

import torch
import triton
import triton.language as tl

from ._common import multiprocessors
from .nearest_pass import (
    Sweep,
    code_range,
    direct_sqdist,
    drain,
    program_rows,
    prune_configs,
    search_configs,
    staged,
    sweep_turn,
    tile_dots,
    tile_min,
)
from .prepare_codebook import PreparedCodebook

KEEP = 4  # tile minima kept per row as candidates
# Rows per program of the merge (with splits), 8 warps: at 128 rows its KEEP candidates a row spilled registers.
MERGE_ROWS = 64
FALLBACK = {"BLOCK_N": 64, "BLOCK_K": 64, "CHUNK": 512, "num_warps": 4, "num_stages": 2}


@triton.jit
def _keep(kept, kept_index, kept_next, unkept, low, index, next_low, KEEP: tl.constexpr):
    """Offer a tile's minimum (score `low` at code `index`; `next_low`: the tile's second-smallest score) to a row's
    KEEP best tile minima [BLOCK_N, KEEP], evicting the largest. What is turned away or evicted lowers `unkept`, a
    lower bound on the score of every code in a tile whose minimum is not kept."""
    slots = tl.arange(0, KEEP)[None, :]
    worst = tl.max(kept, axis=1)
    slot = tl.max(tl.where(kept == worst[:, None], slots, -1), axis=1)
    take = low < worst
    hit = take[:, None] & (slots == slot[:, None])
    unkept = tl.minimum(unkept, tl.where(take, worst, low))
    return (tl.where(hit, low[:, None], kept), tl.where(hit, index[:, None], kept_index),
            tl.where(hit, next_low[:, None], kept_next), unkept)


@triton.jit
def _reach(stats_ptr, sumsq, err, best, D):
    """best + T: no code whose fp16 score exceeds it can be the nearest (T = 2E; see the module docstring)."""
    X = tl.sqrt(sumsq) + err  # >= |rounded row|
    C = tl.load(stats_ptr + 1)
    R = tl.load(stats_ptr + 2)
    E = (2.0 * (err * C + X * R) + X * (C + R) * (D + 1) * 4.76837158203125e-07  # 2**-21
         + (D + 2) * 5.960464477539063e-08 * (C + R) * (C + R))  # 2**-24
    return best + 2.0 * E * (1.0 + 2**-10) + 2.384185791015625e-07 * tl.abs(best)  # 2**-22: rounding of the sum


@triton.jit
def _settle(x_ptr, code_ptr, stats_ptr, index_ptr, sqdist_ptr, level_ptr, list_ptr, count_ptr, reach_ptr, factor_ptr,
            key_ptr, rows, sumsq, finite, factor, err, kept, kept_index, kept_next, unkept, N, K, D,
            stride_xn, stride_xd, stride_ck, stride_cd, KEEP: tl.constexpr):
    """From a row's KEEP kept tile minima and the bound on the rest: the level that settles it (module docstring),
    its answer among the kept minima within reach, by exact distance, and for a fallback row its place in the list
    (a provisional answer, which the fallback improves)."""
    best = tl.min(kept, axis=1)
    first = tl.min(tl.where(kept == best[:, None], kept_index, K), axis=1)
    second = tl.min(tl.where(kept_index == first[:, None], float("inf"), kept), axis=1)
    outside = tl.minimum(unkept, tl.min(kept_next, axis=1))  # no code outside the kept minima scores lower
    reach = _reach(stats_ptr, sumsq, err, best, D)
    level = tl.where(tl.minimum(outside, second) > reach, 0, tl.where(outside > reach, 1, 2))
    level = tl.where(finite, level, 0)

    row_mask = rows < N
    slots = tl.arange(0, KEEP)[None, :]
    sqdist = tl.full((rows.shape[0],), float("inf"), dtype=tl.float32)
    index = first
    for m in tl.static_range(KEEP):
        value = tl.sum(tl.where(slots == m, kept, 0.0), axis=1)
        code = tl.sum(tl.where(slots == m, kept_index, 0), axis=1)
        take = row_mask & finite & (value <= reach)
        d = direct_sqdist(x_ptr, code_ptr, rows, code, take, D, stride_xn, stride_xd, stride_ck, stride_cd)
        better = take & ((d < sqdist) | ((d == sqdist) & (code < index)))
        sqdist = tl.where(better, d, sqdist)
        index = tl.where(better, code, index)
    tl.store(index_ptr + rows, tl.where(finite, index, -1).to(tl.int64), mask=row_mask)
    tl.store(sqdist_ptr + rows, tl.where(finite, sqdist, float("nan")), mask=row_mask)
    tl.store(level_ptr + rows, level.to(tl.int8), mask=row_mask)

    # Append the fallback rows to the list; their order in it is irrelevant (each row is settled on its own).
    fall = (row_mask & (level == 2)).to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(fall, axis=0))
    tl.store(list_ptr + base + tl.cumsum(fall, axis=0) - 1, rows, mask=fall > 0)
    tl.store(reach_ptr + rows, reach, mask=fall > 0)
    tl.store(factor_ptr + rows, factor, mask=fall > 0)
    tl.store(key_ptr + rows, tl.full((rows.shape[0],), 0x7FFFFFFFFFFFFFFF, dtype=tl.int64), mask=fall > 0)


@triton.autotune(configs=search_configs(), key=["K", "D", "BLOCK_D", "SPLIT"],
                 prune_configs_by={"early_config_prune": prune_configs},
                 reset_to_zero=["count_ptr"])  # trial runs must not leave rows in the fallback list
@triton.jit
def _exact_kernel(
    # pointers
    x_ptr, code_ptr,  # x [N, D] and the codebook [K, D] as given
    center_ptr, operand_ptr, sqnorm_ptr, stats_ptr,  # the prepared codebook
    stage_ptr,  # scratch for the rows' operand [N rounded up to 256, padded_features(D)], fp16
    index_ptr, sqdist_ptr, level_ptr,  # outputs [N]; level (int8): 0 certified, 1 candidates, 2 fallback
    list_ptr, count_ptr,  # for the fallback: its rows [N] and their number [1]
    reach_ptr, factor_ptr, key_ptr,  # and per row [N]: s1 + T, the scores' factor, the result (initialised here)
    part_kept_ptr, part_index_ptr, part_next_ptr,  # with SPLIT, each split's kept minima instead [splits, N, KEEP]
    part_unkept_ptr, row_ptr,  # its bound on the rest [splits, N]; and per row, |x - m|^2 and the rounding [2, N]
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    stride_sn, stride_ok,  # rows of the staging buffer and of the prepared operand: padded_features(D)
    split_codes,  # codes per split (search_splits)
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,  # D <= BLOCK_D: the rows' operand stays on chip, and each tile's MMA runs while
    # the previous tile's minima are taken
    UPCAST: tl.constexpr,  # the interpreter: multiply in fp32, no PTX
    KEEP: tl.constexpr,  # tile minima kept per row
    SPLIT: tl.constexpr,  # several programs share each block of rows (program_id(1): which range of codes)
):
    rows, sumsq, finite, factor, err, x_op, sink_a, sink_b = program_rows(
        x_ptr, center_ptr, stats_ptr, stage_ptr, N, D, stride_xn, stride_xd, stride_sn, BLOCK_N, BLOCK_D, ONE_D_TILE)
    kept = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    kept_index = tl.zeros((BLOCK_N, KEEP), dtype=tl.int32)
    kept_next = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    unkept = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    lo, hi = code_range(K, split_codes, BLOCK_K, SPLIT)
    for k0 in range(lo, hi + BLOCK_K, BLOCK_K):
        if ONE_D_TILE:
            unkept += drain(sink_a, sink_b)
        scores, dots = sweep_turn(dots, x_op, stage_ptr, operand_ptr, sqnorm_ptr, rows, factor, k0, lo, stride_sn,
                                  stride_ok, BLOCK_K, BLOCK_D, ONE_D_TILE, UPCAST)
        low, col = tile_min(scores, BLOCK_K)
        next_low = tl.min(tl.where(tl.arange(0, BLOCK_K)[None, :] == col[:, None], float("inf"), scores), axis=1)
        kept, kept_index, kept_next, unkept = _keep(kept, kept_index, kept_next, unkept, low, k0 - BLOCK_K + col,
                                                    next_low, KEEP)

    if SPLIT:
        row_mask = rows < N
        part = tl.program_id(1).to(tl.int64) * N + rows
        slots = part[:, None] * KEEP + tl.arange(0, KEEP)[None, :]
        tl.store(part_kept_ptr + slots, kept, mask=row_mask[:, None])
        tl.store(part_index_ptr + slots, kept_index, mask=row_mask[:, None])
        tl.store(part_next_ptr + slots, kept_next, mask=row_mask[:, None])
        tl.store(part_unkept_ptr + part, unkept, mask=row_mask)
        if tl.program_id(1) == 0:  # every split computed the same per-row figures
            tl.store(row_ptr + rows, sumsq, mask=row_mask)
            tl.store(row_ptr + N + rows, err, mask=row_mask)
            tl.store(factor_ptr + rows, factor, mask=row_mask)
    else:
        _settle(x_ptr, code_ptr, stats_ptr, index_ptr, sqdist_ptr, level_ptr, list_ptr, count_ptr, reach_ptr,
                factor_ptr, key_ptr, rows, sumsq, finite, factor, err, kept, kept_index, kept_next, unkept, N, K, D,
                stride_xn, stride_xd, stride_ck, stride_cd, KEEP)


@triton.jit
def _merge_kernel(
    x_ptr, code_ptr, stats_ptr,
    index_ptr, sqdist_ptr, level_ptr, list_ptr, count_ptr, reach_ptr, factor_ptr, key_ptr,  # as _exact_kernel's
    part_kept_ptr, part_index_ptr, part_next_ptr, part_unkept_ptr, row_ptr,  # the splits' results
    N, K, D, splits,
    stride_xn, stride_xd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, KEEP: tl.constexpr,
):
    """The splits' kept minima offered, split by split, to each row's KEEP (as the sweep offers its tiles), their
    bounds on the rest combined, then the rows settled as an unsplit sweep settles them."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kept = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    kept_index = tl.zeros((BLOCK_N, KEEP), dtype=tl.int32)
    kept_next = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    unkept = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    for split in range(splits):
        part = split * N + rows
        unkept = tl.minimum(unkept, tl.load(part_unkept_ptr + part, mask=row_mask, other=float("inf")))
        for m in tl.static_range(KEEP):
            slot = part * KEEP + m
            low = tl.load(part_kept_ptr + slot, mask=row_mask, other=float("inf"))
            index = tl.load(part_index_ptr + slot, mask=row_mask, other=0)
            next_low = tl.load(part_next_ptr + slot, mask=row_mask, other=float("inf"))
            kept, kept_index, kept_next, unkept = _keep(kept, kept_index, kept_next, unkept, low, index, next_low,
                                                        KEEP)
    sumsq = tl.load(row_ptr + rows, mask=row_mask, other=0.0)
    err = tl.load(row_ptr + N + rows, mask=row_mask, other=0.0)
    factor = tl.load(factor_ptr + rows, mask=row_mask, other=0.0)
    finite = sumsq < float("inf")  # as program_rows decides it
    _settle(x_ptr, code_ptr, stats_ptr, index_ptr, sqdist_ptr, level_ptr, list_ptr, count_ptr, reach_ptr, factor_ptr,
            key_ptr, rows, sumsq, finite, factor, err, kept, kept_index, kept_next, unkept, N, K, D,
            stride_xn, stride_xd, stride_ck, stride_cd, KEEP)


@triton.jit
def _fallback_kernel(
    # pointers
    x_ptr, code_ptr,  # x [N, D] and the codebook [K, D] as given
    operand_ptr, sqnorm_ptr,  # the prepared codebook's
    stage_ptr,  # the rows' operand, staged by the first pass
    list_ptr, count_ptr, reach_ptr, factor_ptr,  # the rows to settle [N], their number [1], s1 + T and factor [N]
    key_ptr,  # per row: min over codes within reach of (fp32 distance bits << 32 | index), int64 [N]
    # sizes
    K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    stride_sn, stride_ok,  # rows of the staging buffer and of the prepared operand
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr,
):
    # A persistent grid over (block of listed rows, chunk of CHUNK codes): the list's length is only known on the
    # device, and a handful of rows must still spread over every SM.
    count = tl.load(count_ptr)
    chunks = tl.cdiv(K, CHUNK)
    for item in range(tl.program_id(0), tl.cdiv(count, BLOCK_N) * chunks, tl.num_programs(0)):
        slots = (item // chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
        listed = slots < count
        rows = tl.load(list_ptr + slots, mask=listed, other=0)
        reach = tl.load(reach_ptr + rows, mask=listed, other=-float("inf"))  # unlisted: nothing within reach
        factor = tl.load(factor_ptr + rows, mask=listed, other=0.0)
        x_op = factor
        if ONE_D_TILE:
            x_op = staged(stage_ptr, rows, tl.arange(0, BLOCK_D), stride_sn)
        best = tl.full((BLOCK_N,), 0x7FFFFFFFFFFFFFFF, dtype=tl.int64)
        start = (item % chunks) * CHUNK
        for k0 in range(start, tl.minimum(start + CHUNK, K), BLOCK_K):
            dots = tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K, BLOCK_D,
                              ONE_D_TILE, UPCAST)
            scores = tl.load(sqnorm_ptr + k0 + tl.arange(0, BLOCK_K))[None, :] + factor[:, None] * dots
            near = scores <= reach[:, None]
            while tl.max(near.to(tl.int32)) > 0:  # one code per row and round: rarely more than a few rounds
                col = tl.min(tl.where(near, tl.arange(0, BLOCK_K)[None, :], BLOCK_K), axis=1)
                found = col < BLOCK_K
                d = direct_sqdist(x_ptr, code_ptr, rows, k0 + col, found, D, stride_xn, stride_xd, stride_ck,
                                   stride_cd)
                # Distances are >= 0, so their bits order as integers: the smallest key is the nearest code,
                # and among equal distances the lowest index.
                key = (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (k0 + col).to(tl.int64)
                best = tl.where(found, tl.minimum(best, key), best)
                near = near & (tl.arange(0, BLOCK_K)[None, :] != col[:, None])
        tl.atomic_min(key_ptr + rows, best, mask=listed)


@triton.jit
def _finish_kernel(list_ptr, count_ptr, key_ptr, index_ptr, sqdist_ptr, BLOCK: tl.constexpr):
    """Unpack the fallback's keys into the outputs."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    listed = slots < tl.load(count_ptr)
    rows = tl.load(list_ptr + slots, mask=listed, other=0)
    key = tl.load(key_ptr + rows, mask=listed, other=0)
    tl.store(index_ptr + rows, key & 0xFFFFFFFF, mask=listed)
    tl.store(sqdist_ptr + rows, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), mask=listed)


def exact_search(x: torch.Tensor, prepared: PreparedCodebook, indices: torch.Tensor, sq_dist: torch.Tensor,
                 levels: torch.Tensor | None) -> None:
    N, device = x.shape[0], x.device
    sweep = Sweep(x, prepared)
    levels = torch.empty(N, dtype=torch.int8, device=device) if levels is None else levels
    listed = torch.empty(N, dtype=torch.int32, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    reach, factor = torch.empty(2, N, dtype=torch.float32, device=device)
    keys = torch.empty(N, dtype=torch.int64, device=device)
    S = sweep.splits
    parts = (sweep.scratch(S, N, KEEP, dtype=torch.float32), sweep.scratch(S, N, KEEP, dtype=torch.int32),
             sweep.scratch(S, N, KEEP, dtype=torch.float32), sweep.scratch(S, N, dtype=torch.float32),
             sweep.scratch(2, N, dtype=torch.float32))
    _exact_kernel[sweep.grid](x, prepared.codebook, *prepared[1:], sweep.stage, indices, sq_dist, levels, listed,
                              count, reach, factor, keys, *parts, *sweep.sizes, sweep.split_codes, KEEP=KEEP,
                              SPLIT=S > 1, **sweep.meta)
    if S > 1:
        _merge_kernel[(triton.cdiv(N, MERGE_ROWS),)](
            x, prepared.codebook, prepared.stats, indices, sq_dist, levels, listed, count, reach, factor, keys, *parts,
            N, prepared.codebook.shape[0], x.shape[1], S, *sweep.strides, BLOCK_N=MERGE_ROWS, KEEP=KEEP, num_warps=8)
    # Launched whatever the count: reading it on the host would cost a sync (and break CUDA graphs).
    _fallback_kernel[(multiprocessors(device),)](
        x, prepared.codebook, prepared.operand, prepared.sqnorm, sweep.stage, listed, count, reach, factor, keys,
        *sweep.sizes[1:], **sweep.meta, **FALLBACK)
    _finish_kernel[(triton.cdiv(N, 1024),)](listed, count, keys, indices, sq_dist, BLOCK=1024)
