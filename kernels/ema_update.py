"""EMA codebook update: blend a batch's per-code statistics into the running state and rebuild the codebook.

The maths is that of Sonnet's VectorQuantizerEMA (see `reference.ema_blend_`):
  cluster_size <- decay * cluster_size + (1 - decay) * counts
  embed_sum    <- decay * embed_sum    + (1 - decay) * sums
  codebook_k   <- embed_sum_k / ((cluster_size_k + eps) / (sum(cluster_size) + K * eps) * sum(cluster_size))
The blend, the Laplace smoothing and the division are one kernel and one pass over the K x D state. The only
cross-code quantities, sum(cluster_size) and the batch's row count, are reduced beforehand on the device, so nothing
waits on the host.

A batch with no rows (every row masked out, non-finite or skipped) leaves the state exactly as it was, whatever the
decay: blending in nothing would only shrink the counts (with decay 0, to zero, and then 0 / 0 in the smoothing).
`decay` may be a Python float (passed to the kernel by value) or a 0-d fp32 tensor on the state's device, such as a
warm-up schedule computed on the device (one compiled graph for every step); neither makes the host wait.

`ema_update_` chains `code_stats` and the blend for one batch; callers that must combine statistics first
(several micro-batches, several processes) call the two steps themselves.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import check_device, check_matrix, check_same_device, check_vector
from .code_stats import code_stats


@triton.jit
def _ema_blend_kernel(
    # pointers: EMA state, updated in place, fp32
    cluster_size_ptr, embed_sum_ptr, codebook_ptr,
    # pointers: the batch's statistics
    counts_ptr, sums_ptr,
    # pointers to 1-element fp32 tensors: the decay (read only if DECAY_ON_DEVICE), the batch's row count, sum over
    # codes of the blended cluster_size
    decay_ptr, rows_ptr, total_ptr,
    # sizes
    K, D,
    # strides
    stride_ek, stride_ed, stride_ck, stride_cd, stride_sk, stride_sd,
    # scalars: eps, and the decay when it is a Python float (passed by value: no copy to the device to wait for)
    eps, decay_value,
    # meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DECAY_ON_DEVICE: tl.constexpr,
):
    # A program owns whole codes (all of D), so it can read and then overwrite their cluster_size with no race.
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    codes64 = codes.to(tl.int64)
    # An empty batch writes nothing (see the module docstring): as if there were no codes, every store is masked.
    code_mask = codes < tl.where(tl.load(rows_ptr) > 0.0, K, 0)
    if DECAY_ON_DEVICE:
        decay = tl.load(decay_ptr)
    else:
        decay = decay_value
    cluster_size = tl.load(cluster_size_ptr + codes, mask=code_mask, other=0.0)
    counts = tl.load(counts_ptr + codes, mask=code_mask, other=0.0)
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    total = tl.load(total_ptr)
    smoothed = (cluster_size + eps) / (total + K * eps) * total

    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = code_mask[:, None] & (dims[None, :] < D)
        embed_offsets = codes64[:, None] * stride_ek + dims[None, :] * stride_ed
        embed_sum = tl.load(embed_sum_ptr + embed_offsets, mask=mask, other=0.0)
        sums = tl.load(sums_ptr + codes64[:, None] * stride_sk + dims[None, :] * stride_sd, mask=mask, other=0.0)
        embed_sum = decay * embed_sum + (1.0 - decay) * sums
        tl.store(embed_sum_ptr + embed_offsets, embed_sum, mask=mask)
        tl.store(codebook_ptr + codes64[:, None] * stride_ck + dims[None, :] * stride_cd,
                 embed_sum / smoothed[:, None], mask=mask)
    tl.store(cluster_size_ptr + codes, cluster_size, mask=code_mask)


def _check_state(cluster_size, embed_sum, codebook):
    check_matrix("codebook", codebook, dtypes=(torch.float32,))
    K, D = codebook.shape
    check_matrix("embed_sum", embed_sum, dtypes=(torch.float32,), cols=D)
    if embed_sum.shape[0] != K:
        raise ValueError(f"embed_sum has {embed_sum.shape[0]} rows but codebook has {K}")
    check_vector("cluster_size", cluster_size, K, torch.float32)
    if not cluster_size.is_contiguous():
        raise ValueError("cluster_size must be contiguous (it is updated in place)")
    check_device("codebook", codebook)
    for name, tensor in (("embed_sum", embed_sum), ("cluster_size", cluster_size)):
        check_same_device(name, tensor, "codebook", codebook)


def _check_rates(decay, eps, device):
    if isinstance(decay, torch.Tensor):
        # A device tensor's value is not read here (that would cost a host sync); its caller keeps it in range.
        if decay.shape not in ((), (1,)) or decay.dtype != torch.float32:
            raise ValueError(f"decay as a tensor must be a 0-d float32 tensor, got shape {tuple(decay.shape)} "
                             f"and dtype {decay.dtype}")
        if decay.device != device:
            raise ValueError(f"decay is on {decay.device} but the EMA state is on {device}")
    elif not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not eps > 0.0:
        raise ValueError(f"eps must be positive, got {eps}")


def ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay: float | torch.Tensor, eps: float) -> None:
    """Blend per-code counts [K] and sums [K, D] (fp32) into the EMA state in place; see the module docstring."""
    _check_state(cluster_size, embed_sum, codebook)
    K, D = codebook.shape
    check_vector("counts", counts, K, torch.float32)
    check_matrix("sums", sums, dtypes=(torch.float32,), cols=D)
    if sums.shape[0] != K:
        raise ValueError(f"sums has {sums.shape[0]} rows but codebook has {K}")
    check_same_device("counts", counts, "codebook", codebook)
    check_same_device("sums", sums, "codebook", codebook)
    _check_rates(decay, eps, codebook.device)
    _launch_blend(cluster_size, embed_sum, codebook, counts.contiguous(), sums, decay, eps)


def _launch_blend(cluster_size, embed_sum, codebook, counts, sums, decay, eps):
    K, D = codebook.shape
    on_device = isinstance(decay, torch.Tensor)
    if on_device:
        decay, new_weight = decay.reshape(1), 1.0 - decay.reshape(1)
    else:
        # The float stays on the host (torch.as_tensor(decay, device=...) is a copy the host waits on), rounded to
        # fp32 as a device tensor would be, so that both paths give the same bits.
        decay = float(np.float32(decay))
        new_weight = float(np.float32(1.0) - np.float32(decay))
    rows = counts.sum().reshape(1)
    # sum_k of the blended cluster_size, before the kernel overwrites cluster_size.
    total = decay * cluster_size.sum() + new_weight * rows
    block_k, block_d = 16, min(128, max(16, triton.next_power_of_2(D)))
    _ema_blend_kernel[(triton.cdiv(K, block_k),)](
        cluster_size, embed_sum, codebook, counts, sums,
        decay if on_device else rows, rows, total,  # (rows: a pointer the kernel does not read)
        K, D,
        embed_sum.stride(0), embed_sum.stride(1), codebook.stride(0), codebook.stride(1),
        sums.stride(0), sums.stride(1),
        float(eps), 0.0 if on_device else decay,
        BLOCK_K=block_k, BLOCK_D=block_d, DECAY_ON_DEVICE=on_device,
    )


def ema_update_(x, indices, cluster_size, embed_sum, codebook, decay: float | torch.Tensor, eps: float, *,
                deterministic: bool = False, validate_indices: bool = True) -> torch.Tensor:
    """One EMA step from a batch x [N, D] and its code indices [N]; returns the batch's counts (float32 [K]).

    Every input is checked before any state changes, so a rejected call leaves the codebook as it was.
    """
    _check_state(cluster_size, embed_sum, codebook)
    check_matrix("x", x, cols=codebook.shape[1])
    check_same_device("x", x, "codebook", codebook)
    _check_rates(decay, eps, codebook.device)
    counts, sums = code_stats(x, indices, codebook.shape[0], deterministic=deterministic,
                              validate_indices=validate_indices)
    _launch_blend(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
    return counts


# decay is a tensor here, so that a decay that changes every step (a warm-up) does not recompile the caller.
@torch.library.custom_op("vq_kernels::ema_blend_", mutates_args=("cluster_size", "embed_sum", "codebook"))
def ema_blend_op(cluster_size: torch.Tensor, embed_sum: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor,
                 sums: torch.Tensor, decay: torch.Tensor, eps: float) -> None:
    ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)


@ema_blend_op.register_fake
def _(cluster_size, embed_sum, codebook, counts, sums, decay, eps):
    return None
