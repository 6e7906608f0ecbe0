"""The fp16 tensor-core sweep that both search precisions make, and `fast` mode's kernel, which is that sweep alone.

Each program takes BLOCK_N rows of x and streams the codebook past them in BLOCK_K tiles on the tensor cores, so the
N x K distance matrix never exists in memory. Codes are ranked by the score s_k = |c_k - m|^2 - 2 (x - m).(c_k - m),
the squared distance less |x - m|^2 (the same for every code of a row), with m the codebook mean: distances do not
change, and the products shrink to the data's spread. The operands are the prepared codebook
(`vq_kernels.prepare_codebook`: centred, scaled by a power of two, fp16, zero-padded to whole tiles) and the rows,
centred, scaled by their own power of two (their largest entry in [2**13, 2**14)) and rounded to fp16 once, into
a staging buffer from which they are read back (for D up to 256 they then stay in shared memory for the whole
sweep; past that they are re-read in slices, from cache); products accumulate in fp32 and both scales come back
out exactly (`program_rows`, the prologue of every search kernel). The sweep is skewed by one tile: turn t issues
the MMA of tile t and, while it runs, scores tile t - 1 (`sweep_turn`; see `drain` and `_pinned` for how Triton is
made to keep an MMA in flight across turns). `fast` keeps each row's smallest score; `vq_kernels.nearest_exact` keeps
more, to certify or rescore. The reported squared distance is always that of the chosen code, computed directly as
sum((x - c)^2) in fp32 from the inputs as given, which has no cancellation (`direct_sqdist`).

Few rows, many codes: a block of rows is one program, so 1,024 rows are 8 programs, and on a GPU of 132 SMs the
sweep of a large codebook would keep 124 of them idle. Then each block of rows is swept by several programs
(`search_splits`), each over one contiguous range of the codes; they write their rows' partial results, and a
merge kernel combines them in code order (`_fast_merge_kernel`; `exact` mode's in `vq_kernels.nearest_exact`).

fast: the code with the smallest fp16 score. Rounding the operands (relative error 2**-11 each) moves each score by
up to about 2**-9 |x - m| |c_k - m|, so the chosen code's squared distance can exceed the nearest's by twice that.
Ties between computed scores go to the lower index (within a tile by an explicit minimum over indices, across
tiles because a later tile must score strictly lower). Two copies of one code get the same score only if the
hardware rounds their identical columns identically, which no one promises (the interpreter's BLAS need not), so
`fast` may return any copy of a duplicated code.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    autotune_configs,
    load_tile,
    multiprocessors,
    shared_memory_limit,
)
from .prepare_codebook import (
    MAX_BLOCK_K,
    OPERAND_DTYPE,
    OPERAND_TOP,
    PreparedCodebook,
    feature_tile,
    pow2_below,
)

SLICE_D = tl.constexpr(32)  # features per step of the per-row passes: narrow, to keep their registers few
# Splitting the codes over programs (search_splits): rows per program assumed when counting programs (the GPU
# configurations take 128 or 256), and the fewest codes a split sweeps, so that its prologue (the rows' norms and
# staging, a few tiles' worth) and the merge stay small beside its sweep.
SPLIT_ROWS = 128
MIN_SPLIT_CODES = 2048


def search_splits(n: int, k: int, sms: int) -> tuple[int, int]:
    """(splits, codes per split): how many programs sweep each block of rows, each over its own range of codes, so
    that the programs fill the SMs once where the row blocks alone would not. The ranges are whole tiles of the
    widest code tile, of MIN_SPLIT_CODES codes or more (the last may be shorter), and every one holds codes."""
    tiles = triton.cdiv(k, MAX_BLOCK_K)
    wanted = max(1, min(sms // triton.cdiv(n, SPLIT_ROWS), k // MIN_SPLIT_CODES))
    per_split = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, per_split), per_split * MAX_BLOCK_K


def search_configs():
    # From the compile check's figures (bench/NOTES.md): 256 rows halve the L2 traffic of 128 (each program streams
    # the whole codebook); 3 stages of 64 codes, or 2 of 128, keep the MMA fed; 128 rows x 2 stages fit an A100.
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8, num_stages=s)
        for bn, bk, s in ((128, 64, 2), (128, 64, 3), (128, 128, 2), (256, 64, 2))
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1))


def shared_bytes(config: triton.Config, block_d: int) -> int:
    """Shared memory a search configuration needs: the fp16 rows (staged there once for the tensor cores), one fp16
    codebook tile per pipeline stage, and drain's operands. The compile check holds this against the compiler."""
    kw = config.kwargs
    return 2 * (block_d * (kw["BLOCK_N"] + max(config.num_stages, 1) * kw["BLOCK_K"]) + 16 * (kw["BLOCK_N"] + 16))


def prune_configs(configs, named_args, **kwargs):
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
def staged(stage_ptr, rows, dims, stride_sn):
    return tl.load(stage_ptr + rows[:, None].to(tl.int64) * stride_sn + dims[None, :])


@triton.jit
def program_rows(x_ptr, center_ptr, stats_ptr, stage_ptr, N, D, stride_xn, stride_xd, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr):
    """The prologue of every sweep, for this program's BLOCK_N rows: |x - m|^2, whether each row is finite, the
    factor that takes both scales back out of a dot product, the norm of each row's rounding error; the rows'
    operand staged, and held on chip when ONE_D_TILE (else a placeholder: tile_dots re-reads the staging buffer);
    drain's operands."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sumsq, finite, scale = _row_scale(x_ptr, center_ptr, rows, N, D, stride_xn, stride_xd)
    factor = -2.0 * tl.load(stats_ptr) / scale  # a power of two: takes both scales back out exactly
    err = _stage_rows(x_ptr, center_ptr, stage_ptr, rows, finite, scale, N, D, stride_xn, stride_xd, stride_sn)
    tl.debug_barrier()  # other threads of the program read the staged rows
    x_op = scale
    if ONE_D_TILE:
        x_op = staged(stage_ptr, rows, tl.arange(0, BLOCK_D), stride_sn)
    sink_a, sink_b = _sink(stage_ptr, rows, stride_sn)
    return rows, sumsq, finite, factor, err, x_op, sink_a, sink_b


@triton.jit
def code_range(K, split_codes, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """The codes this program sweeps, [lo, hi): all of them, or with SPLIT its split's (program_id(1)) range of
    split_codes, a multiple of every BLOCK_K. Both ends are tile boundaries; hi is past K only by padding."""
    lo = 0
    hi = tl.cdiv(K, BLOCK_K) * BLOCK_K
    if SPLIT:
        lo = tl.program_id(1) * split_codes
        hi = tl.minimum(lo + split_codes, hi)
    return lo, hi


@triton.jit
def sweep_turn(dots, x_op, stage_ptr, operand_ptr, sqnorm_ptr, rows, factor, k0, lo, stride_sn, stride_ok,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr):
    """Turn k0 of the skewed sweep that starts at code lo: the scores of tile k0 - BLOCK_K (from `dots`, the
    previous turn's MMA) and the MMA of tile k0. The sweep runs one turn past its last tile; that turn's MMA is of
    the next tile (the spare padding tile at the end of the codebook), and its result is not read."""
    scores = _previous_scores(dots, sqnorm_ptr, factor, k0, lo, BLOCK_K, ONE_D_TILE and not UPCAST)
    dots = tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K, BLOCK_D, ONE_D_TILE,
                     UPCAST)
    return scores, dots


@triton.jit
def tile_dots(x_op, stage_ptr, operand_ptr, rows, k0, stride_sn, stride_ok, BLOCK_K: tl.constexpr,
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
            dots = _dot(staged(stage_ptr, rows, dims, stride_sn), _code_tile(operand_ptr, codes, dims, stride_ok),
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
def direct_sqdist(x_ptr, code_ptr, rows, codes, mask, D, stride_xn, stride_xd, stride_ck, stride_cd):
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
    """Operands for drain, [BLOCK_N, 16] and [16, 16]: staged features of this program's own rows (finite)."""
    sixteen = tl.arange(0, 16)
    return staged(stage_ptr, rows, sixteen, stride_sn), staged(stage_ptr, tl.min(rows, axis=0) + sixteen, sixteen,
                                                                 stride_sn)


@triton.jit
def drain(sink_a, sink_b):
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
def _previous_scores(dots, sqnorm_ptr, factor, k0, lo, BLOCK_K: tl.constexpr, PIN: tl.constexpr):
    """Scores of codes k0 - BLOCK_K .. k0, the previous turn's tile: |c - m|^2 - 2 (x - m).(c - m), with both
    power-of-two scales taken back out exactly by `factor`. Padding codes (and the first turn's, below lo) score
    +inf."""
    codes = k0 - BLOCK_K + tl.arange(0, BLOCK_K)
    sqnorm = tl.load(sqnorm_ptr + codes, mask=codes >= lo, other=float("inf"))
    scores = sqnorm[None, :] + factor[:, None] * dots
    if PIN:
        scores = _pinned(scores)
    return scores


@triton.jit
def tile_min(scores, BLOCK_K: tl.constexpr):
    """The smallest score of each row and the lowest column that attains it (cheaper than an argmin pair)."""
    low = tl.min(scores, axis=1)
    return low, tl.min(tl.where(scores == low[:, None], tl.arange(0, BLOCK_K)[None, :], BLOCK_K), axis=1)


@triton.autotune(configs=search_configs(), key=["K", "D", "BLOCK_D", "SPLIT"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _fast_kernel(
    # pointers
    x_ptr, code_ptr,  # x [N, D] and the codebook [K, D] as given
    center_ptr, operand_ptr, sqnorm_ptr, stats_ptr,  # the prepared codebook
    stage_ptr,  # scratch for the rows' operand [N rounded up to 256, padded_features(D)], fp16
    index_ptr, sqdist_ptr,  # outputs [N]
    part_score_ptr, part_index_ptr,  # with SPLIT, each split's best score and code instead [splits, N]
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    stride_sn, stride_ok,  # rows of the staging buffer and of the prepared operand: padded_features(D)
    split_codes,  # codes per split (search_splits)
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,  # D <= BLOCK_D: the rows' operand stays on chip, and each tile's MMA runs while
    # the previous tile's minimum is taken
    UPCAST: tl.constexpr,  # the interpreter: multiply in fp32, no PTX
    SPLIT: tl.constexpr,  # several programs share each block of rows (program_id(1): which range of codes)
):
    rows, _, finite, factor, _, x_op, sink_a, sink_b = program_rows(
        x_ptr, center_ptr, stats_ptr, stage_ptr, N, D, stride_xn, stride_xd, stride_sn, BLOCK_N, BLOCK_D, ONE_D_TILE)
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    lo, hi = code_range(K, split_codes, BLOCK_K, SPLIT)
    for k0 in range(lo, hi + BLOCK_K, BLOCK_K):
        if ONE_D_TILE:
            best += drain(sink_a, sink_b)
        scores, dots = sweep_turn(dots, x_op, stage_ptr, operand_ptr, sqnorm_ptr, rows, factor, k0, lo, stride_sn,
                                  stride_ok, BLOCK_K, BLOCK_D, ONE_D_TILE, UPCAST)
        low, col = tile_min(scores, BLOCK_K)
        better = low < best  # ties go to the earlier tile
        best = tl.where(better, low, best)
        best_index = tl.where(better, k0 - BLOCK_K + col, best_index)

    row_mask = rows < N
    if SPLIT:
        part = tl.program_id(1).to(tl.int64) * N + rows
        tl.store(part_score_ptr + part, best, mask=row_mask)
        tl.store(part_index_ptr + part, tl.where(finite, best_index, -1), mask=row_mask)
    else:
        sqdist = direct_sqdist(x_ptr, code_ptr, rows, best_index, row_mask, D, stride_xn, stride_xd, stride_ck,
                               stride_cd)
        tl.store(index_ptr + rows, tl.where(finite, best_index, -1).to(tl.int64), mask=row_mask)
        tl.store(sqdist_ptr + rows, tl.where(finite, sqdist, float("nan")), mask=row_mask)


@triton.jit
def _fast_merge_kernel(x_ptr, code_ptr, part_score_ptr, part_index_ptr, index_ptr, sqdist_ptr, N, D, splits,
                       stride_xn, stride_xd, stride_ck, stride_cd, BLOCK_N: tl.constexpr):
    """Each row's best over the splits, in code order (a later split must score strictly lower, as a later tile
    must within one), and its squared distance computed directly."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.load(part_index_ptr + rows, mask=row_mask, other=0)  # -1: a row holding NaN or inf
    for split in range(splits):
        part = split * N + rows
        score = tl.load(part_score_ptr + part, mask=row_mask, other=float("inf"))
        better = score < best
        best = tl.where(better, score, best)
        best_index = tl.where(better, tl.load(part_index_ptr + part, mask=row_mask, other=0), best_index)
    finite = best_index >= 0
    sqdist = direct_sqdist(x_ptr, code_ptr, rows, best_index, row_mask & finite, D, stride_xn, stride_xd, stride_ck,
                           stride_cd)
    tl.store(index_ptr + rows, best_index.to(tl.int64), mask=row_mask)
    tl.store(sqdist_ptr + rows, tl.where(finite, sqdist, float("nan")), mask=row_mask)


MERGE_ROWS = 128  # rows per program of `fast`'s merge (8 warps)


class Sweep:
    """A search's launch: its staging buffer, the sizes and strides every sweep kernel takes, its meta-parameters,
    and how many programs share each block of rows (`splits`, each over `split_codes` codes)."""

    def __init__(self, x: torch.Tensor, prepared: PreparedCodebook):
        (N, D), K, code = x.shape, prepared.codebook.shape[0], prepared.codebook
        d_pad = prepared.operand.shape[1]
        self.splits, split_codes = search_splits(N, K, multiprocessors(x.device))
        # The rows' operand, staged for every BLOCK_N up to 256 (see _stage_rows). With splits, every program of a
        # block of rows stages its rows: the same values, so the writes do not conflict.
        self.stage = torch.empty(triton.cdiv(N, 256) * 256, d_pad, dtype=OPERAND_DTYPE, device=x.device)
        self.sizes = (N, K, D, x.stride(0), x.stride(1), code.stride(0), code.stride(1), d_pad, d_pad)
        self.split_codes = split_codes
        self.meta = {"BLOCK_D": feature_tile(D), "ONE_D_TILE": D <= feature_tile(D), "UPCAST": INTERPRET}
        self.grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), self.splits)

    @property
    def strides(self) -> tuple:
        """x's and the codebook's strides, as the merge kernels take them."""
        return self.sizes[3:7]

    def scratch(self, *shape, dtype) -> torch.Tensor:
        """A buffer for what the splits hand to the merge; one element (never read) when there are no splits."""
        return torch.empty(shape if self.splits > 1 else (1,), dtype=dtype, device=self.stage.device)


def fast_search(x: torch.Tensor, prepared: PreparedCodebook, indices: torch.Tensor, sq_dist: torch.Tensor) -> None:
    sweep = Sweep(x, prepared)
    N, D = x.shape
    scores = sweep.scratch(sweep.splits, N, dtype=torch.float32)
    codes = sweep.scratch(sweep.splits, N, dtype=torch.int32)
    _fast_kernel[sweep.grid](x, prepared.codebook, *prepared[1:], sweep.stage, indices, sq_dist, scores, codes,
                             *sweep.sizes, sweep.split_codes, SPLIT=sweep.splits > 1, **sweep.meta)
    if sweep.splits > 1:
        _fast_merge_kernel[(triton.cdiv(N, MERGE_ROWS),)](x, prepared.codebook, scores, codes, indices, sq_dist, N, D,
                                                          sweep.splits, *sweep.strides, BLOCK_N=MERGE_ROWS, num_warps=8)
