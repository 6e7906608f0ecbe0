"""Nearest-code search: for each row of x [N, D], the closest row of a codebook [K, D] and the squared distance.

Each program takes BLOCK_N rows of x and streams the codebook past them in BLOCK_K tiles on the tensor cores, so the
N x K distance matrix never exists in memory. Codes are ranked by the score s_k = |c_k - m|^2 - 2 (x - m).(c_k - m),
the squared distance less |x - m|^2 (the same for every code of a row), with m the codebook mean: distances do not
change, and the products shrink to the data's spread. The operands are the prepared codebook
(`kernels.prepare_codebook`: centred, scaled by a power of two, fp16, zero-padded to whole tiles) and the rows,
centred, scaled by their own power of two (their largest entry in [2**13, 2**14)) and rounded to fp16 once, into
a staging buffer from which they are read back (for D up to 256 they then stay in shared memory for the whole
sweep; past that they are re-read in slices, from cache); products accumulate in fp32 and both scales come back
out exactly. The sweep is skewed by one tile: turn t issues the MMA of tile t and, while it runs, takes the
minimum of tile t - 1 (see _drain and _pinned for how Triton is made to keep an MMA in flight across turns).
The reported squared distance is always that of the chosen code, computed directly as sum((x - c)^2) in fp32
from the inputs as given, which has no cancellation.

Precision modes:
  fast   the code with the smallest fp16 score. Rounding the operands (relative error 2**-11 each) moves each
         score by up to about 2**-9 |x - m| |c_k - m|, so the chosen code's squared distance can exceed the
         nearest's by twice that. Ties between computed scores go to the lower index (within a tile by an
         explicit minimum over indices, across tiles because a later tile must score strictly lower). Two copies
         of one code get the same score only if the hardware rounds their identical columns identically, which no
         one promises (the interpreter's BLAS need not), so `fast` may return any copy of a duplicated code.
  exact  a nearest code up to fp32 rounding of the distances: the fp16 pass, then fp32 where it cannot decide.
         Each score s'_k of the fp16 pass is within E of the score s_k of the fp32 centred operands, with
             E = 2 (d C + (X + d) R) + (X + d)(C + R)(D + 1) 2**-21 + (D + 2) 2**-24 (C + R)^2,
         X = |x - m| and d = |rounding error of the row| (measured per row), C = max_k |c_k - m| and R = max_k
         |rounding error of code k| (measured by `prepare_codebook`). The terms: x'.c' - x~.c~ = dx.c' + x~.dc
         (Cauchy-Schwarz on each); fp32 accumulation of D exact fp16 products, allowing each addition an error of
         2**-22 of the running magnitude (twice round-to-nearest's, for truncating tensor-core adders); the fp32 sums
         of squares in |c_k - m|^2 and the final rounding of s'_k. With T = 2E (and a 2**-10 margin), each row keeps
         the minima of its KEEP best code tiles (with indices) and, for each tile, its second-smallest score; from
         these it knows s1 (its best score) and a lower bound L on the score of every code outside the kept ones.
           certified    every other code scores above s1 + T: the best code is the nearest.
           candidates   L > s1 + T: the nearest is one of the kept minima within s1 + T; they are rescored by their
                        exact fp32 distances.
           fallback     otherwise the row is listed, and a second pass over the whole codebook (split across
                        programs) rescores, by exact fp32 distance, every code whose fp16 score is within s1 + T.
         Between codes at the same fp32 distance (exact duplicates among them: they compute bit-identical
         distances), the lower index wins. `levels=` receives which of the three settled each row (0, 1, 2).

Rows of x holding NaN or +-inf (or so large that their squared norm overflows fp32) get index -1 and distance
NaN: they match no code.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, autotune_configs, check_device, check_matrix, check_output, check_same_device, load_tile,
    shared_memory_limit,
)
from .prepare_codebook import (
    OPERAND_DTYPE, OPERAND_TOP, PreparedCodebook, feature_tile, padded_codes, padded_features, pow2_below,
    prepare_codebook,
)

PRECISIONS = ("exact", "fast")
KEEP = 4  # exact mode: tile minima kept per row as candidates
FALLBACK = {"BLOCK_N": 64, "BLOCK_K": 64, "CHUNK": 512, "num_warps": 4, "num_stages": 2}
SLICE_D = tl.constexpr(32)  # features per step of the per-row passes: narrow, to keep their registers few


def _configs():
    # From the compile check's figures (bench/NOTES.md): 256 rows halve the L2 traffic of 128 (each program streams
    # the whole codebook); 3 stages of 64 codes, or 2 of 128, keep the MMA fed; 128 rows x 2 stages fit an A100.
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8, num_stages=s)
        for bn, bk, s in ((128, 64, 2), (128, 64, 3), (128, 128, 2), (256, 64, 2))
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1))


def shared_bytes(config: triton.Config, block_d: int) -> int:
    """Shared memory a search configuration needs: the fp16 rows (staged there once for the tensor cores), one fp16
    codebook tile per pipeline stage, and _drain's operands. The compile check holds this against the compiler."""
    kw = config.kwargs
    return 2 * (block_d * (kw["BLOCK_N"] + max(config.num_stages, 1) * kw["BLOCK_K"]) + 16 * (kw["BLOCK_N"] + 16))


def _prune(configs, named_args, **kwargs):
    """Drop, before compiling, the configurations whose shared memory cannot fit this device's SM."""
    limit, block_d = shared_memory_limit(), kwargs["BLOCK_D"]
    fitting = [c for c in configs if shared_bytes(c, block_d) <= limit]
    return fitting or [min(configs, key=lambda c: shared_bytes(c, block_d))]


@triton.jit
def _centred(x_ptr, center_ptr, rows, dims, N, D, stride_xn, stride_xd):
    x = load_tile(x_ptr, rows, dims, stride_xn, stride_xd, rows < N, dims < D)
    return x - tl.load(center_ptr + dims, mask=dims < D, other=0.0)[None, :]


@triton.jit
def _row_scale(x_ptr, center_ptr, rows, N, D, stride_xn, stride_xd):
    """Per row: |x - m|^2, whether it is finite, and the power of two that puts its largest centred entry in
    [2**13, 2**14)."""
    sumsq = tl.zeros((rows.shape[0],), dtype=tl.float32)
    amax = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for d0 in range(0, D, SLICE_D):
        x = _centred(x_ptr, center_ptr, rows, d0 + tl.arange(0, SLICE_D), N, D, stride_xn, stride_xd)
        sumsq += tl.sum(x * x, axis=1)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    finite = sumsq < float("inf")  # NaN compares false too
    return sumsq, finite, pow2_below(tl.where(finite, amax, 0.0), OPERAND_TOP)


@triton.jit
def _stage_rows(x_ptr, center_ptr, stage_ptr, rows, finite, scale, N, D, stride_xn, stride_xd, stride_sn):
    """Write the rows' tensor-core operand, centred, scaled and rounded (zeros for rows holding NaN or inf, which are
    searched as zeros), to this program's rows of the staging buffer [rows, stride_sn]; return the norm of what the
    rounding changed, per row. The search reads the operand back from there: an operand computed in the kernel,
    Triton keeps in registers and reloads from shared memory for every code tile (16 LDSM, and ptxas then moves the
    tile's minimum ahead of the next MMA); one it loads, it stages in shared memory once, and the tensor cores read
    it there directly."""
    err_sq = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for d0 in range(0, stride_sn, SLICE_D):  # the padding features get zeros
        dims = d0 + tl.arange(0, SLICE_D)
        x = tl.where(finite[:, None], _centred(x_ptr, center_ptr, rows, dims, N, D, stride_xn, stride_xd), 0.0)
        op = (x * scale[:, None]).to(stage_ptr.dtype.element_ty)
        tl.store(stage_ptr + rows[:, None].to(tl.int64) * stride_sn + dims[None, :], op, mask=dims[None, :] < stride_sn)
        err = op.to(tl.float32) / scale[:, None] - x
        err_sq += tl.sum(err * err, axis=1)
    return tl.sqrt(err_sq)


@triton.jit
def _staged(stage_ptr, rows, dims, stride_sn):
    return tl.load(stage_ptr + rows[:, None].to(tl.int64) * stride_sn + dims[None, :])


@triton.jit
def _tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled dot products of the rows with codes k0 .. k0 + BLOCK_K, fp32 [BLOCK_N, BLOCK_K]. The prepared
    operand and the staging buffer are zero-padded to whole tiles (and a spare code tile), so no masks."""
    codes = k0 + tl.arange(0, BLOCK_K)
    dots = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
    if ONE_D_TILE:
        dots = _dot(x_op, _code_tile(operand_ptr, codes, tl.arange(0, BLOCK_D), stride_ok), dots, UPCAST)
    else:  # the rows do not fit on chip: re-read them (from cache) in slices
        for d0 in range(0, stride_sn, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dots = _dot(_staged(stage_ptr, rows, dims, stride_sn), _code_tile(operand_ptr, codes, dims, stride_ok),
                        dots, UPCAST)
    return dots


@triton.jit
def _code_tile(operand_ptr, codes, dims, stride_ok):
    """Codes as the dot's right operand [BLOCK_D, BLOCK_K]; 32-bit offsets, which prepare_codebook checks."""
    return tl.load(operand_ptr + codes[None, :] * stride_ok + dims[:, None])


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # The interpreter multiplies half floats as their raw integers. Products of two fp16 numbers are exact in fp32,
    # so upcasting first gives the tensor cores' products on the CPU ("ieee": no TF32 rounding of the fp32 copies).
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _direct_sqdist(x_ptr, code_ptr, rows, codes, mask, D, stride_xn, stride_xd, stride_ck, stride_cd):
    """sum_d (x_d - c_d)^2 in fp32 from the inputs as given, for each row and its own code; identical codes give
    bit-identical results (the same operations in the same order)."""
    sqdist = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for d0 in range(0, D, SLICE_D):
        dims = d0 + tl.arange(0, SLICE_D)
        x = load_tile(x_ptr, rows, dims, stride_xn, stride_xd, mask, dims < D)
        c = load_tile(code_ptr, codes, dims, stride_ck, stride_cd, mask, dims < D)
        sqdist += tl.sum((x - c) * (x - c), axis=1)
    return sqdist


@triton.jit
def _sink(stage_ptr, rows, stride_sn):
    """Operands for _drain, [BLOCK_N, 16] and [16, 16]: staged features of this program's own rows (finite)."""
    sixteen = tl.arange(0, 16)
    return _staged(stage_ptr, rows, sixteen, stride_sn), _staged(stage_ptr, tl.min(rows, axis=0) + sixteen, sixteen,
                                                                 stride_sn)


@triton.jit
def _drain(sink_a, sink_b):
    """A tiny MMA whose result is used at once, so Triton waits for it, and with it for every MMA of the warp group
    still in flight: the previous tile's. Triton keeps an MMA in flight past the end of a loop turn only when its
    result is first read after such a wait in the next turn; that is what lets each tile's MMA run while the
    previous tile's minimum is taken. Returns zeros (the products are finite)."""
    return tl.sum(tl.dot(sink_a, sink_b), axis=1) * 0.0


@triton.jit
def _pinned(v):
    """v, through an instruction the compiler may not move: the scores must be read out of the accumulator before
    the next tile's MMA overwrites it, or ptxas serialises every MMA ('non wgmma instructions reading accumulator
    registers'). PTX, so not under the interpreter (where it would be the identity anyway)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _previous_scores(dots, sqnorm_ptr, factor, k0, BLOCK_K: tl.constexpr, PIN: tl.constexpr):
    """Scores of codes k0 - BLOCK_K .. k0, the previous turn's tile: |c - m|^2 - 2 (x - m).(c - m), with both
    power-of-two scales taken back out exactly by `factor`. Padding codes (and the first turn's) score +inf."""
    codes = k0 - BLOCK_K + tl.arange(0, BLOCK_K)
    sqnorm = tl.load(sqnorm_ptr + codes, mask=codes >= 0, other=float("inf"))
    scores = sqnorm[None, :] + factor[:, None] * dots
    if PIN:
        scores = _pinned(scores)
    return scores


@triton.jit
def _tile_min(scores, BLOCK_K: tl.constexpr):
    """The smallest score of each row and the lowest column that attains it (cheaper than an argmin pair)."""
    low = tl.min(scores, axis=1)
    return low, tl.min(tl.where(scores == low[:, None], tl.arange(0, BLOCK_K)[None, :], BLOCK_K), axis=1)


@triton.autotune(configs=_configs(), key=["K", "D", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fast_kernel(
    # pointers
    x_ptr, code_ptr,  # x [N, D] and the codebook [K, D] as given
    center_ptr, operand_ptr, sqnorm_ptr, stats_ptr,  # the prepared codebook
    stage_ptr,  # scratch for the rows' operand [N rounded up to 256, padded_features(D)], fp16
    index_ptr, sqdist_ptr,  # outputs [N]
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    stride_sn, stride_ok,  # rows of the staging buffer and of the prepared operand: padded_features(D)
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,  # D <= BLOCK_D: the rows' operand stays on chip, and each tile's MMA runs while
    # the previous tile's minimum is taken
    UPCAST: tl.constexpr,  # the interpreter: multiply in fp32, no PTX
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _, finite, scale = _row_scale(x_ptr, center_ptr, rows, N, D, stride_xn, stride_xd)
    factor = -2.0 * tl.load(stats_ptr) / scale  # a power of two: takes both scales back out exactly
    _stage_rows(x_ptr, center_ptr, stage_ptr, rows, finite, scale, N, D, stride_xn, stride_xd, stride_sn)
    tl.debug_barrier()  # other threads of the program read the staged rows
    x_op = scale
    if ONE_D_TILE:
        x_op = _staged(stage_ptr, rows, tl.arange(0, BLOCK_D), stride_sn)
    sink_a, sink_b = _sink(stage_ptr, rows, stride_sn)
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Turn k0: the MMA of tile k0 and the minimum of tile k0 - BLOCK_K; the last turn's MMA is of the spare padding.
    for k0 in range(0, tl.cdiv(K, BLOCK_K) * BLOCK_K + BLOCK_K, BLOCK_K):
        if ONE_D_TILE:
            best += _drain(sink_a, sink_b)
        scores = _previous_scores(dots, sqnorm_ptr, factor, k0, BLOCK_K, ONE_D_TILE and not UPCAST)
        dots = _tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K, BLOCK_D, ONE_D_TILE,
                          UPCAST)
        low, col = _tile_min(scores, BLOCK_K)
        better = low < best  # ties go to the earlier tile
        best = tl.where(better, low, best)
        best_index = tl.where(better, k0 - BLOCK_K + col, best_index)

    row_mask = rows < N
    sqdist = _direct_sqdist(x_ptr, code_ptr, rows, best_index, row_mask, D, stride_xn, stride_xd, stride_ck,
                            stride_cd)
    tl.store(index_ptr + rows, tl.where(finite, best_index, -1).to(tl.int64), mask=row_mask)
    tl.store(sqdist_ptr + rows, tl.where(finite, sqdist, float("nan")), mask=row_mask)


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


@triton.autotune(configs=_configs(), key=["K", "D", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune},
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
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    stride_sn, stride_ok,  # rows of the staging buffer and of the prepared operand: padded_features(D)
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,  # D <= BLOCK_D: the rows' operand stays on chip, and each tile's MMA runs while
    # the previous tile's minima are taken
    UPCAST: tl.constexpr,  # the interpreter: multiply in fp32, no PTX
    KEEP: tl.constexpr,  # tile minima kept per row
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sumsq, finite, scale = _row_scale(x_ptr, center_ptr, rows, N, D, stride_xn, stride_xd)
    factor = -2.0 * tl.load(stats_ptr) / scale
    err = _stage_rows(x_ptr, center_ptr, stage_ptr, rows, finite, scale, N, D, stride_xn, stride_xd, stride_sn)
    tl.debug_barrier()  # other threads of the program read the staged rows
    x_op = scale
    if ONE_D_TILE:
        x_op = _staged(stage_ptr, rows, tl.arange(0, BLOCK_D), stride_sn)
    sink_a, sink_b = _sink(stage_ptr, rows, stride_sn)
    kept = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    kept_index = tl.zeros((BLOCK_N, KEEP), dtype=tl.int32)
    kept_next = tl.full((BLOCK_N, KEEP), float("inf"), dtype=tl.float32)
    unkept = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Turn k0: the MMA of tile k0 and the minima of tile k0 - BLOCK_K; the last turn's MMA is of the spare padding.
    for k0 in range(0, tl.cdiv(K, BLOCK_K) * BLOCK_K + BLOCK_K, BLOCK_K):
        if ONE_D_TILE:
            unkept += _drain(sink_a, sink_b)
        scores = _previous_scores(dots, sqnorm_ptr, factor, k0, BLOCK_K, ONE_D_TILE and not UPCAST)
        dots = _tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K, BLOCK_D, ONE_D_TILE,
                          UPCAST)
        low, col = _tile_min(scores, BLOCK_K)
        next_low = tl.min(tl.where(tl.arange(0, BLOCK_K)[None, :] == col[:, None], float("inf"), scores), axis=1)
        kept, kept_index, kept_next, unkept = _keep(kept, kept_index, kept_next, unkept, low, k0 - BLOCK_K + col,
                                                    next_low, KEEP)

    # Which level settles each row (module docstring).
    best = tl.min(kept, axis=1)
    first = tl.min(tl.where(kept == best[:, None], kept_index, K), axis=1)
    second = tl.min(tl.where(kept_index == first[:, None], float("inf"), kept), axis=1)
    outside = tl.minimum(unkept, tl.min(kept_next, axis=1))  # no code outside the kept minima scores lower
    reach = _reach(stats_ptr, sumsq, err, best, D)
    level = tl.where(tl.minimum(outside, second) > reach, 0, tl.where(outside > reach, 1, 2))
    level = tl.where(finite, level, 0)

    # Kept minima within reach, by exact distance; a fallback row gets a provisional answer that it will improve.
    row_mask = rows < N
    slots = tl.arange(0, KEEP)[None, :]
    sqdist = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    index = first
    for m in tl.static_range(KEEP):
        value = tl.sum(tl.where(slots == m, kept, 0.0), axis=1)
        code = tl.sum(tl.where(slots == m, kept_index, 0), axis=1)
        take = row_mask & finite & (value <= reach)
        d = _direct_sqdist(x_ptr, code_ptr, rows, code, take, D, stride_xn, stride_xd, stride_ck, stride_cd)
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
    tl.store(key_ptr + rows, tl.full((BLOCK_N,), 0x7FFFFFFFFFFFFFFF, dtype=tl.int64), mask=fall > 0)


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
            x_op = _staged(stage_ptr, rows, tl.arange(0, BLOCK_D), stride_sn)
        best = tl.full((BLOCK_N,), 0x7FFFFFFFFFFFFFFF, dtype=tl.int64)
        start = (item % chunks) * CHUNK
        for k0 in range(start, tl.minimum(start + CHUNK, K), BLOCK_K):
            dots = _tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K, BLOCK_D,
                              ONE_D_TILE, UPCAST)
            scores = tl.load(sqnorm_ptr + k0 + tl.arange(0, BLOCK_K))[None, :] + factor[:, None] * dots
            near = scores <= reach[:, None]
            while tl.max(near.to(tl.int32)) > 0:  # one code per row and round: rarely more than a few rounds
                col = tl.min(tl.where(near, tl.arange(0, BLOCK_K)[None, :], BLOCK_K), axis=1)
                found = col < BLOCK_K
                d = _direct_sqdist(x_ptr, code_ptr, rows, k0 + col, found, D, stride_xn, stride_xd, stride_ck,
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


def _outputs(out, n: int, device: torch.device):
    if out is None:
        return torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, dtype=torch.float32, device=device)
    indices, sq_dist = out
    check_output("out[0] (indices)", indices, (n,), torch.int64, device)
    check_output("out[1] (sq_dist)", sq_dist, (n,), torch.float32, device)
    return indices, sq_dist


def _check_prepared(prepared: PreparedCodebook, d: int, device: torch.device) -> None:
    check_matrix("codebook", prepared.codebook, cols=d)
    if prepared.codebook.device != device:
        raise ValueError(f"codebook is on {prepared.codebook.device} but x is on {device}; they must share a device")
    K = prepared.codebook.shape[0]
    for name, t, shape, dtype in (("center", prepared.center, (d,), torch.float32),
                                  ("operand", prepared.operand, (padded_codes(K), padded_features(d)), OPERAND_DTYPE),
                                  ("sqnorm", prepared.sqnorm, (padded_codes(K),), torch.float32),
                                  ("stats", prepared.stats, (3,), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise ValueError(f"prepared.{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}: make it with kernels.prepare_codebook")


def _fallback_programs(device: torch.device) -> int:
    if INTERPRET:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def nearest_code(x: torch.Tensor, codebook, precision: str = "exact", *, out=None, levels=None):
    """Index (int64 [N]) and squared L2 distance (float32 [N]) of the nearest codebook row for each row of x.

    x [N, D]: fp32, bf16 or fp16, any strides, read in its own dtype. codebook: a [K, D] tensor (any float dtype,
    not necessarily x's) or, to skip preparing it on every call, `kernels.prepare_codebook(codebook)`.
    See the module docstring for what `precision` ("exact" or "fast") guarantees and for non-finite rows.
    out: optional (indices, sq_dist) to write into, e.g. buffers that a CUDA graph captured.
    levels: optional int8 [N] that `exact` fills with the level that settled each row (0, 1 or 2).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_matrix("x", x)
    check_device("x", x)
    N, D = x.shape
    if isinstance(codebook, PreparedCodebook):
        _check_prepared(codebook, D, x.device)
        prepared = codebook
    else:
        check_matrix("codebook", codebook, cols=D)
        check_same_device("codebook", codebook, "x", x)
        prepared = prepare_codebook(codebook)
    if levels is not None:
        if precision != "exact":
            raise ValueError("levels= is only filled by precision='exact'")
        check_output("levels", levels, (N,), torch.int8, x.device)
    indices, sq_dist = _outputs(out, N, x.device)
    _search(x, prepared, precision, indices, sq_dist, levels)
    return indices, sq_dist


def _search(x, prepared, precision, indices, sq_dist, levels):
    (N, D), K, code = x.shape, prepared.codebook.shape[0], prepared.codebook
    d_pad = prepared.operand.shape[1]
    # The rows' operand, staged for every BLOCK_N up to 256 (see _stage_rows).
    stage = torch.empty(triton.cdiv(N, 256) * 256, d_pad, dtype=OPERAND_DTYPE, device=x.device)
    sizes = (N, K, D, x.stride(0), x.stride(1), code.stride(0), code.stride(1), d_pad, d_pad)
    meta = {"BLOCK_D": feature_tile(D), "ONE_D_TILE": D <= feature_tile(D), "UPCAST": INTERPRET}
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if precision == "fast":
        _fast_kernel[grid](x, code, *prepared[1:], stage, indices, sq_dist, *sizes, **meta)
        return
    levels = torch.empty(N, dtype=torch.int8, device=x.device) if levels is None else levels
    listed = torch.empty(N, dtype=torch.int32, device=x.device)
    count = torch.zeros(1, dtype=torch.int32, device=x.device)
    reach, factor = torch.empty(2, N, dtype=torch.float32, device=x.device)
    keys = torch.empty(N, dtype=torch.int64, device=x.device)
    _exact_kernel[grid](x, code, *prepared[1:], stage, indices, sq_dist, levels, listed, count, reach, factor, keys,
                        *sizes, KEEP=KEEP, **meta)
    # Launched whatever the count: reading it on the host would cost a sync (and break CUDA graphs).
    _fallback_kernel[(_fallback_programs(x.device),)](
        x, code, prepared.operand, prepared.sqnorm, stage, listed, count, reach, factor, keys, *sizes[1:], **meta,
        **FALLBACK)
    _finish_kernel[(triton.cdiv(N, 1024),)](listed, count, keys, indices, sq_dist, BLOCK=1024)


# As PyTorch custom ops, torch.compile sees one opaque call with a known output shape instead of tracing into the
# launcher (and its autotuner), and models that contain the quantizer compile without graph breaks.
@torch.library.custom_op("vq_kernels::nearest_code", mutates_args=())
def nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nearest_code(x, codebook, precision)


@nearest_code_op.register_fake
def _(x, codebook, precision):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("vq_kernels::nearest_code_prepared", mutates_args=())
def nearest_code_prepared_op(x: torch.Tensor, codebook: torch.Tensor, center: torch.Tensor, operand: torch.Tensor,
                             sqnorm: torch.Tensor, stats: torch.Tensor,
                             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nearest_code(x, PreparedCodebook(codebook, center, operand, sqnorm, stats), precision)


@nearest_code_prepared_op.register_fake
def _(x, codebook, center, operand, sqnorm, stats, precision):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)
