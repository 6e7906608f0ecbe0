"""Per-code statistics of a batch: how many rows chose each code, and the sum of those rows.

These are the sufficient statistics of the EMA codebook update, computed without a one-hot matrix:
  fast           each row is added into its code's accumulator with fp32 atomics (relaxed: only their sum
                 matters, not their order). The order in which rows land varies between runs, so the sums can
                 differ in their last bits.
  deterministic  rows are sorted by code (a stable sort, so the order is fixed), each code's run of rows is cut
                 into chunks of CHUNK_ROWS, one program sums each chunk in a fixed tree order, and a second kernel
                 adds each code's chunk sums in chunk order: the same bits on every run, for the price of the sort.
                 Chunks spread a code that takes most of the batch (a collapsing codebook) over many programs,
                 where one program per code would serialise it.

Rows whose index is outside [0, K) add nothing: -1, which the nearest-code search gives rows holding NaN or inf,
marks a row to leave out. Counts are float32 so that they blend directly into the EMA state.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    check_device,
    check_matrix,
    check_output,
    check_same_device,
    load_tile,
)

INDEX_DTYPES = (torch.int64, torch.int32)
CHUNK_ROWS = 256  # deterministic mode: rows per program; a code's run of R rows spreads over ceil(R / 256)


@triton.jit
def _code_stats_atomic_kernel(
    # pointers
    x_ptr, index_ptr,  # x [N, D] in its own dtype; index [N]
    counts_ptr, sums_ptr,  # zeroed accumulators: counts [K], sums [K, D] contiguous, fp32
    # sizes
    N, K, D,
    # strides
    stride_xn, stride_xd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    code = tl.load(index_ptr + rows, mask=rows < N, other=-1).to(tl.int64)
    keep = (code >= 0) & (code < K)
    x = load_tile(x_ptr, rows, dims, stride_xn, stride_xd, keep, dims < D)
    tl.atomic_add(sums_ptr + code[:, None] * D + dims[None, :], x, mask=keep[:, None] & (dims[None, :] < D),
                  sem="relaxed")
    if tl.program_id(1) == 0:
        tl.atomic_add(counts_ptr + code, tl.full((BLOCK_N,), 1.0, tl.float32), mask=keep, sem="relaxed")


@triton.jit
def _chunk_sums_kernel(
    # pointers
    x_ptr,  # x [N, D] in its own dtype
    order_ptr, run_start_ptr,  # rows sorted by code [N]; where each code's run starts [K + 1]
    chunk_code_ptr,  # per chunk: its code, K past the last chunk [max chunks]
    chunk_start_ptr,  # per code: its first chunk [K + 1]
    partial_ptr,  # output: per chunk, the sum of its rows [max chunks, D] fp32
    # sizes
    K, D,
    # strides
    stride_xn, stride_xd,
    # meta-parameters
    CHUNK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    code = tl.load(chunk_code_ptr + chunk)
    if code < K:  # the grid is sized for the most chunks there can be
        start = tl.load(run_start_ptr + code) + (chunk - tl.load(chunk_start_ptr + code)) * CHUNK_ROWS
        end = tl.minimum(start + CHUNK_ROWS, tl.load(run_start_ptr + code + 1))
        # Partial sums per lane, then one tree reduction: the order is fixed by the sort and the block shape alone.
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rows = tl.load(order_ptr + ranks, mask=ranks < end, other=0)
            acc += load_tile(x_ptr, rows, dims, stride_xn, stride_xd, ranks < end, dims < D)
        tl.store(partial_ptr + chunk.to(tl.int64) * D + dims, tl.sum(acc, axis=0), mask=dims < D)


@triton.jit
def _combine_kernel(
    # pointers
    partial_ptr, chunk_start_ptr, run_start_ptr,  # chunk sums [max chunks, D]; first chunk and first row per code
    counts_ptr, sums_ptr,  # outputs: counts [K], sums [K, D] contiguous, fp32
    # sizes
    D,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for chunk in range(tl.load(chunk_start_ptr + code), tl.load(chunk_start_ptr + code + 1)):  # in chunk order
        total += tl.load(partial_ptr + chunk * D + dims, mask=dims < D, other=0.0)  # < (N / 256 + K) D: 32 bits
    tl.store(sums_ptr + code.to(tl.int64) * D + dims, total, mask=dims < D)
    if tl.program_id(1) == 0:
        run = tl.load(run_start_ptr + code + 1) - tl.load(run_start_ptr + code)
        tl.store(counts_ptr + code, run.to(tl.float32))


def _check_inputs(x, indices, num_codes):
    check_matrix("x", x)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an int64 or int32 tensor, got {got}")
    if indices.shape != (x.shape[0],):
        raise ValueError(f"indices must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(indices.shape)}")
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    check_device("x", x)
    check_same_device("indices", indices, "x", x)


def _assert_index_range(indices, num_codes):
    # A device-side assert, as PyTorch's own indexing makes: the host does not wait for the answer. On CUDA a
    # failure surfaces at the next synchronising call (and, as with an index error in PyTorch, ends the CUDA context);
    # on the CPU it raises here.
    torch._assert_async((indices < num_codes).all(),
                        f"indices out of range for num_codes={num_codes} (negative indices mark rows to leave out; "
                        "indices >= num_codes are errors)")


def _outputs(out, num_codes: int, dim: int, device: torch.device):
    if out is None:
        return (torch.empty(num_codes, dtype=torch.float32, device=device),
                torch.empty(num_codes, dim, dtype=torch.float32, device=device))
    counts, sums = out
    check_output("out[0] (counts)", counts, (num_codes,), torch.float32, device)
    check_output("out[1] (sums)", sums, (num_codes, dim), torch.float32, device)
    return counts, sums


def _stats_with_atomics(x, indices, counts, sums):
    N, D = x.shape
    counts.zero_()
    sums.zero_()
    block_n, block_d = 64, min(128, max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _code_stats_atomic_kernel[grid](
        x, indices, counts, sums, N, counts.shape[0], D, x.stride(0), x.stride(1), BLOCK_N=block_n, BLOCK_D=block_d
    )
    return counts, sums


def _stats_in_sorted_order(x, indices, counts, sums):
    (N, D), num_codes = x.shape, counts.shape[0]
    # Left-out rows go to bin K, which sorts last and which no program reads.
    bins = torch.where((indices >= 0) & (indices < num_codes), indices.long(), num_codes)
    order = torch.argsort(bins, stable=True)
    # index_add rather than bincount, whose output size depends on the data (a host sync on CUDA).
    run_length = torch.zeros(num_codes + 1, dtype=torch.int64, device=x.device).index_add_(
        0, bins, torch.ones_like(bins))
    run_start = torch.zeros(num_codes + 2, dtype=torch.int64, device=x.device)
    torch.cumsum(run_length, dim=0, out=run_start[1:])
    # Chunks of each code's run, numbered code after code; their number is bounded without reading it on the host.
    max_chunks = N // CHUNK_ROWS + num_codes
    chunk_start = torch.zeros(num_codes + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.div(run_length[:num_codes] + CHUNK_ROWS - 1, CHUNK_ROWS, rounding_mode="floor"), dim=0,
                 out=chunk_start[1:])
    # The code of each chunk; num_codes past the last chunk.
    chunk_code = torch.searchsorted(chunk_start, torch.arange(max_chunks, device=x.device), right=True) - 1
    partial = torch.empty(max_chunks, D, dtype=torch.float32, device=x.device)
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    _chunk_sums_kernel[(max_chunks, triton.cdiv(D, block_d))](
        x, order, run_start, chunk_code, chunk_start, partial, num_codes, D, x.stride(0), x.stride(1),
        CHUNK_ROWS=CHUNK_ROWS, BLOCK_R=16, BLOCK_D=block_d,
    )
    _combine_kernel[(num_codes, triton.cdiv(D, block_d))](
        partial, chunk_start, run_start, counts, sums, D, BLOCK_D=block_d,
    )
    return counts, sums


def code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, deterministic: bool = False,
               validate_indices: bool = True, out=None):
    """Per-code counts (float32 [K]) and sums of rows (float32 [K, D]) of x [N, D] grouped by indices [N].

    Negative indices leave their row out. With validate_indices an index >= num_codes fails a device-side assert
    (no host read; see `_assert_index_range`); without it such rows are left out too. deterministic=True gives the
    same bits on every run.
    out: optional (counts, sums) to write into.
    """
    _check_inputs(x, indices, num_codes)
    counts, sums = _outputs(out, num_codes, x.shape[1], x.device)
    if validate_indices:
        _assert_index_range(indices, num_codes)
    if deterministic:
        return _stats_in_sorted_order(x, indices, counts, sums)
    return _stats_with_atomics(x, indices, counts, sums)


# As a PyTorch custom op, torch.compile sees one opaque call with a known output shape instead of tracing into
# the launcher, and models that contain the quantizer compile without graph breaks.
@torch.library.custom_op("vq_kernels::code_stats", mutates_args=())
def code_stats_op(x: torch.Tensor, indices: torch.Tensor, num_codes: int,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return code_stats(x, indices, num_codes, deterministic=deterministic, validate_indices=False)


@code_stats_op.register_fake
def _(x, indices, num_codes, deterministic):
    return x.new_empty(num_codes, dtype=torch.float32), x.new_empty(num_codes, x.shape[1], dtype=torch.float32)
