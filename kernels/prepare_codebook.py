"""The codebook in the form the nearest-code search reads, made once per codebook change instead of once per search.

    prepared = prepare_codebook(codebook)          # after each codebook update
    indices, sq_dist = nearest_code(x, prepared)   # any number of searches

The search multiplies on the tensor cores in fp16, and wants from the codebook [K, D]:
  center   its mean m [D], fp32. Distances do not change when both sides are shifted, and centred dot products
           scale with the spread of the data rather than with its offset, and so does their rounding error.
  operand  (c_k - m) * 2**g rounded to fp16, contiguous. The power of two g puts the largest entry just under
           2**14: scaling by 2**g is exact, and keeps every entry inside fp16's normal range (no overflow of large
           codebooks, no flushing of small entries), where rounding is relative: |err| <= 2**-11 |entry|.
           Zero-padded to [padded_codes(K), padded_features(D)]: whole code tiles, one spare, and whole feature
           tiles, so that the search loads them without masks (and without the address arithmetic of masks).
  sqnorm   |c_k - m|**2 [padded_codes(K)], fp32, from the fp32 centred code (not from the rounded operand); +inf
           for the padding codes, which therefore never win.
  stats    [2**-g, C, R], fp32: the scale to undo, C = max_k |c_k - m| and R = max_k |operand_k 2**-g - (c_k - m)|,
           the norm of the largest rounding error, measured rather than assumed. `exact` mode's error bound reads
           C and R (see `vq_kernels.nearest_code`).
One reduction in PyTorch (the mean) and one Triton kernel, a single pass over K x D; ~6 MB at K = 4096, D = 256.

Why fp16 and not bf16: the two have the same tensor-core rate, and 3 more significand bits make `exact` mode's
first stage able to settle most rows on its own (bench/NOTES.md has the fractions); bf16's wider range is not
needed once the operands are scaled by powers of two.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, check_matrix, load_tile

OPERAND_DTYPE = torch.float16
OPERAND_TOP = tl.constexpr(14)  # entries scaled to below 2**14: fp16 overflows past 65504 ~ 2**16
MAX_BLOCK_K = 128  # the search's widest code tile
ON_CHIP_D = 256  # rows of up to this many features stay on chip for the whole search


def feature_tile(d: int) -> int:
    """The search's feature tile: all D features (a power of two, at least 16) up to ON_CHIP_D, else 64-wide slices."""
    return max(16, triton.next_power_of_2(d)) if d <= ON_CHIP_D else 64


def padded_features(d: int) -> int:
    return triton.cdiv(d, feature_tile(d)) * feature_tile(d)


def padded_codes(k: int) -> int:
    """Whole tiles of the widest code tile, plus one: the search's loop runs one tile past the last."""
    return (triton.cdiv(k, MAX_BLOCK_K) + 1) * MAX_BLOCK_K


class PreparedCodebook(NamedTuple):
    codebook: torch.Tensor  # [K, D] as given (any float dtype, any strides): exact distances are computed from it
    center: torch.Tensor  # [D] fp32
    operand: torch.Tensor  # [padded_codes(K), padded_features(D)] fp16: (c_k - m) * 2**g, rounded; zero-padded
    sqnorm: torch.Tensor  # [padded_codes(K)] fp32: |c_k - m|**2, +inf past K
    stats: torch.Tensor  # [3] fp32: 2**-g, max_k |c_k - m|, max_k |rounding error of operand_k| (unscaled)


@triton.jit
def pow2_below(amax, TOP: tl.constexpr):
    """2**e for the integer e that puts amax (>= 0) in [2**(TOP - 1), 2**TOP), read off amax's exponent bits so that
    it is exact; e is clamped to [-100, 100] (zero or subnormal amax: 2**100), far inside fp32's range."""
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # The tensor on the left: triton 3.7's interpreter cannot subtract a tensor from a tl.constexpr object.
    e = tl.minimum(tl.maximum(126 - biased + TOP, -100), 100)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _prepare_kernel(
    # pointers
    code_ptr,  # codebook [K, D] in its own dtype
    center_ptr,  # its mean [D], fp32
    amax_ptr,  # [1] fp32: an upper bound on max |c - m| over all entries, which sets the scale
    operand_ptr, sqnorm_ptr, stats_ptr,  # outputs: [K', D'] fp16, [K'] fp32 (padded), [3] fp32 (stats[1:] zeroed)
    # sizes
    K, D, D_PAD,  # D_PAD = D': the operand's row length
    # strides
    stride_ck, stride_cd,
    # meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TOP: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    scale = pow2_below(tl.load(amax_ptr), TOP)
    sqnorm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    err_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):  # the padding gets zeros
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = (codes[:, None] < K) & (dims[None, :] < D)
        c = load_tile(code_ptr, codes, dims, stride_ck, stride_cd, codes < K, dims < D)
        c = tl.where(mask, c - tl.load(center_ptr + dims, mask=dims < D, other=0.0)[None, :], 0.0)
        op = (c * scale).to(operand_ptr.dtype.element_ty)
        tl.store(operand_ptr + codes[:, None].to(tl.int64) * D_PAD + dims[None, :], op, mask=dims[None, :] < D_PAD)
        sqnorm += tl.sum(c * c, axis=1)
        err = op.to(tl.float32) / scale - c  # exact in fp32: both terms are within a few ulps of each other
        err_sq += tl.sum(err * err, axis=1)
    tl.store(sqnorm_ptr + codes, tl.where(codes < K, sqnorm, float("inf")))
    # Maxima of non-negative floats, whatever the order of the programs: the same bits on every run.
    tl.atomic_max(stats_ptr + 1, tl.max(tl.sqrt(sqnorm), axis=0))
    tl.atomic_max(stats_ptr + 2, tl.max(tl.sqrt(err_sq), axis=0))
    if tl.program_id(0) == 0:
        tl.store(stats_ptr, 1.0 / scale)


def prepare_codebook(codebook: torch.Tensor) -> PreparedCodebook:
    """The prepared form of a codebook [K, D] (fp32, bf16 or fp16, any strides) for `nearest_code`.

    Valid until the codebook changes: prepare again after every update (the search cannot tell).
    """
    check_matrix("codebook", codebook)
    check_device("codebook", codebook)
    K, D = codebook.shape
    center = codebook.float().mean(dim=0)
    # max |c - m| <= max |c| + max |m|: a bound is enough to set the scale, and needs no K x D temporary.
    amax = (torch.linalg.vector_norm(codebook, ord=float("inf"), dtype=torch.float32)
            + torch.linalg.vector_norm(center, ord=float("inf"))).reshape(1)
    k_pad, d_pad = padded_codes(K), padded_features(D)
    if k_pad * d_pad >= 2**31:
        raise ValueError(f"codebook of shape {tuple(codebook.shape)} is too large: the search indexes it in 32 bits")
    operand = torch.empty(k_pad, d_pad, dtype=OPERAND_DTYPE, device=codebook.device)
    sqnorm = torch.empty(k_pad, dtype=torch.float32, device=codebook.device)
    stats = torch.zeros(3, dtype=torch.float32, device=codebook.device)
    # Both divide k_pad and d_pad. Small code blocks spread a GPU's work over many programs; the interpreter runs
    # programs one after another, at a fixed cost each, so it gets the widest block.
    block_k, block_d = (MAX_BLOCK_K if INTERPRET else 16), min(64, d_pad)
    _prepare_kernel[(k_pad // block_k,)](
        codebook, center, amax, operand, sqnorm, stats,
        K, D, d_pad,
        codebook.stride(0), codebook.stride(1),
        BLOCK_K=block_k, BLOCK_D=block_d, TOP=OPERAND_TOP,
    )
    return PreparedCodebook(codebook, center, operand, sqnorm, stats)


# torch.compile sees one opaque op returning the four derived tensors (a NamedTuple cannot cross a custom op).
@torch.library.custom_op("vq_kernels::prepare_codebook", mutates_args=())
def prepare_codebook_op(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(prepare_codebook(codebook)[1:])


@prepare_codebook_op.register_fake
def _(codebook):
    K, D = codebook.shape
    return (codebook.new_empty(D, dtype=torch.float32),
            codebook.new_empty(padded_codes(K), padded_features(D), dtype=OPERAND_DTYPE),
            codebook.new_empty(padded_codes(K), dtype=torch.float32), codebook.new_empty(3, dtype=torch.float32))
