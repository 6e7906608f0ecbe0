"""Nearest-code search: for each row of x [N, D], the closest row of a codebook [K, D] and the squared distance.

One fused kernel. Each program keeps BLOCK_N rows of x on chip (for D up to 256 in `fast` mode and 64 in `exact`;
past that it re-reads them in slices, from cache) and streams the codebook past them in BLOCK_K tiles, keeping a
running minimum and argmin, so the N x K distance matrix never exists in memory. Distances are
ranked by the score ||c||^2 - 2 x.c (||x||^2 is the same for every code of a row), and the squared distance of the
chosen code is then recomputed directly as sum((x - c)^2) in fp32, which has no cancellation.

Both x and the codebook are first centred on the codebook's mean. Distances do not change, but the dot products
shrink to the scale of the data's spread rather than its offset, and so does their rounding error.

Precision modes (what the dot products are computed with; everything else is fp32):
  exact  fp32 operands through 3xTF32 (`input_precision="tf32x3"`), accurate to about fp32 rounding, for every
         input dtype (half-precision inputs are upcast exactly). The chosen code is a nearest one up to fp32
         rounding of the score: d(chosen) <= d(nearest) + c * D * 2**-24 * (|x - m| + max_k |c_k - m|)**2 with a
         small constant c, m the codebook mean.
  fast   bf16 operands (fp16 for fp16 inputs) on the tensor cores with fp32 accumulation. Rounding the operands
         to 8 mantissa bits perturbs each score by at most about 2**-7 * |x - m| * |c_k - m|, so the chosen code
         can be farther than the nearest by up to twice that; ties and near-ties may resolve differently.

Rows of x holding NaN or +-inf (or so large that their squared norm overflows fp32) get index -1 and distance
NaN: they match no code. Ties between codes resolve to the lower index within a tile and the earlier tile.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, autotune_configs, check_device, check_matrix, check_output, check_same_device, load_tile,
)

PRECISIONS = ("exact", "fast")


def _configs():
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        for bk in (64, 128)
        for w, s in ((4, 3), (8, 3), (8, 4))
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1))


@triton.jit
def _centred_rows(x_ptr, center_ptr, rows, cols, stride_xn, stride_xd, N, D):
    x = load_tile(x_ptr, rows, cols, stride_xn, stride_xd, rows < N, cols < D)
    center = tl.load(center_ptr + cols, mask=cols < D, other=0.0)
    return x - center[None, :]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 operands as their raw 16-bit integers. Products of two rounded half-
    # precision numbers are exact in fp32, so upcasting them first gives the tensor cores' numbers on the CPU.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.autotune(configs=_configs(), key=["K", "D", "BLOCK_D", "PRECISION"])
@triton.jit
def _nearest_code_kernel(
    # pointers
    x_ptr, code_ptr,  # inputs as given: x [N, D], codebook [K, D]
    prepared_ptr,  # centred codebook in the dot's operand dtype, contiguous [K, D]
    code_sqnorm_ptr, center_ptr,  # |c_k - m|^2 [K] and the codebook mean m [D], fp32
    index_ptr, sqdist_ptr,  # outputs [N]
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,  # D <= BLOCK_D: the rows fit one tile and stay in registers
    PRECISION: tl.constexpr,  # input_precision of tl.dot: "tf32x3" for exact, ignored for half operands
    UPCAST: tl.constexpr,  # multiply half operands in fp32 (the interpreter)
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    if ONE_D_TILE:  # the rows stay in registers for the whole codebook sweep
        x = _centred_rows(x_ptr, center_ptr, rows, dims, stride_xn, stride_xd, N, D)
        x_sqnorm = tl.sum(x * x, axis=1)
    else:
        x_sqnorm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            x = _centred_rows(x_ptr, center_ptr, rows, d0 + dims, stride_xn, stride_xd, N, D)
            x_sqnorm += tl.sum(x * x, axis=1)
    # A row holding NaN or inf is searched as zeros, so that no score is NaN, and marked unmatched at the end.
    finite = x_sqnorm < float("inf")  # NaN compares false too
    if ONE_D_TILE:
        x_op = tl.where(finite[:, None], x, 0.0).to(prepared_ptr.dtype.element_ty)

    best_score = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        if ONE_D_TILE:
            c = tl.load(prepared_ptr + codes[None, :].to(tl.int64) * D + dims[:, None],
                        mask=(codes[None, :] < K) & (dims[:, None] < D), other=0.0)
            dots = _dot(x_op, c, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), PRECISION, UPCAST)
        else:
            dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                x_op = _centred_rows(x_ptr, center_ptr, rows, d0 + dims, stride_xn, stride_xd, N, D)
                x_op = tl.where(finite[:, None], x_op, 0.0)
                c = tl.load(prepared_ptr + codes[None, :].to(tl.int64) * D + (d0 + dims)[:, None],
                            mask=(codes[None, :] < K) & ((d0 + dims)[:, None] < D), other=0.0)
                dots = _dot(x_op.to(c.dtype), c, dots, PRECISION, UPCAST)
        # Padding codes score +inf, so they never win.
        code_sqnorm = tl.load(code_sqnorm_ptr + codes, mask=codes < K, other=float("inf"))
        scores = code_sqnorm[None, :] - 2.0 * dots
        tile_score, tile_index = tl.min(scores, axis=1, return_indices=True)
        better = tile_score < best_score
        best_score = tl.where(better, tile_score, best_score)
        best_index = tl.where(better, k0 + tile_index, best_index)

    # Exact squared distance to the chosen code, from the inputs as given (no cancellation, never negative).
    sqdist = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = load_tile(x_ptr, rows, d0 + dims, stride_xn, stride_xd, rows < N, d0 + dims < D)
        c = load_tile(code_ptr, best_index, d0 + dims, stride_ck, stride_cd, rows < N, d0 + dims < D)
        sqdist += tl.sum((x - c) * (x - c), axis=1)

    row_mask = rows < N
    tl.store(index_ptr + rows, tl.where(finite, best_index, -1).to(tl.int64), mask=row_mask)
    tl.store(sqdist_ptr + rows, tl.where(finite, sqdist, float("nan")), mask=row_mask)


def _operand_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    if precision == "exact":
        return torch.float32
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _prepare_codebook(codebook: torch.Tensor, precision: str):
    """Centre the codebook once per call (K x D is small next to N x D) and cast it to the dot's operand dtype."""
    code32 = codebook.float()
    center = code32.mean(dim=0)
    centred = code32 - center
    code_sqnorm = centred.square().sum(dim=1)
    prepared = centred.to(_operand_dtype(codebook.dtype, precision)).contiguous()
    return prepared, code_sqnorm, center.contiguous()


def _block_d(D: int, precision: str) -> int:
    """Features per tile. Up to 256 bf16 features (64 fp32 ones, for `exact`) the rows stay on chip for the whole
    sweep; beyond, the kernel loops over 64-wide slices of them. The fp32 limit is shared memory: 3xTF32 operands of
    128 rows x 256 fp32 features, pipelined, need more than a Hopper SM's 227 KB."""
    on_chip = 64 if precision == "exact" else 256
    return max(16, triton.next_power_of_2(D)) if D <= on_chip else 64


def _outputs(out, n: int, device: torch.device):
    if out is None:
        return torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, dtype=torch.float32, device=device)
    indices, sq_dist = out
    check_output("out[0] (indices)", indices, (n,), torch.int64, device)
    check_output("out[1] (sq_dist)", sq_dist, (n,), torch.float32, device)
    return indices, sq_dist


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, precision: str = "exact", *, out=None):
    """Index (int64 [N]) and squared L2 distance (float32 [N]) of the nearest codebook row for each row of x.

    x [N, D] and codebook [K, D] share a dtype (float32, bfloat16 or float16) and a CUDA device; any strides.
    See the module docstring for what `precision` ("exact" or "fast") guarantees and for non-finite rows.
    out: optional (indices, sq_dist) to write into, e.g. buffers that a CUDA graph captured.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_matrix("x", x)
    check_matrix("codebook", codebook, cols=x.shape[1])
    if x.dtype != codebook.dtype:
        raise TypeError(f"x has dtype {x.dtype} but codebook has {codebook.dtype}; cast one to match")
    check_device("x", x)
    check_same_device("codebook", codebook, "x", x)

    (N, D), K = x.shape, codebook.shape[0]
    prepared, code_sqnorm, center = _prepare_codebook(codebook, precision)
    indices, sq_dist = _outputs(out, N, x.device)

    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _nearest_code_kernel[grid](
        x, codebook, prepared, code_sqnorm, center, indices, sq_dist,
        N, K, D,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        BLOCK_D=_block_d(D, precision),
        ONE_D_TILE=D <= _block_d(D, precision),
        PRECISION="tf32x3" if precision == "exact" else "tf32",
        UPCAST=INTERPRET,
    )
    return indices, sq_dist


# As a PyTorch custom op, torch.compile sees one opaque call with a known output shape instead of tracing into
# the launcher (and its autotuner), and models that contain the quantizer compile without graph breaks.
@torch.library.custom_op("vq_kernels::nearest_code", mutates_args=())
def nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nearest_code(x, codebook, precision)


@nearest_code_op.register_fake
def _(x, codebook, precision):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)
