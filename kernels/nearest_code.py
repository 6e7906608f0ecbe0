"""Nearest-code search: for each row of x [N, D], the closest row of a codebook [K, D] and the squared distance.

    indices, sq_dist = nearest_code(x, codebook)                        # exact (default)
    indices, sq_dist = nearest_code(x, prepare_codebook(codebook), "fast")

Both precisions stream the codebook past blocks of rows on the tensor cores in fp16 and never build the N x K
distance matrix; with fewer blocks of rows than the GPU has SMs, each block is swept by several programs over ranges
of the codes and their results merged in code order (the same answers). The search is in three files, by stage:
  kernels/nearest_pass.py    the fp16 sweep (centred, power-of-two-scaled operands; one tile's MMA in flight while
                             the previous tile is scored) and `fast` mode, which is the sweep alone: the code with
                             the smallest fp16 score, within about 2**-8 |x - m| |c - m| of the nearest's distance;
  kernels/nearest_exact.py   `exact` mode: the same sweep keeps a few candidates per row and a proven error bound,
                             then rescores in fp32 what the bound cannot certify (a second pass over the codebook
                             for the rare row it must), giving a nearest code up to fp32 rounding of the distances,
                             ties to the lower index;
  this file                  the public function, its checks, and the custom op that torch.compile sees.
The reported squared distance is always that of the chosen code, computed directly as sum((x - c)^2) in fp32.
Rows of x holding NaN or +-inf (or so large that their squared norm overflows fp32) get index -1 and distance
NaN: they match no code.
"""

import torch

from ._common import check_device, check_matrix, check_output, check_same_device
from .nearest_exact import exact_search
from .nearest_pass import fast_search
from .prepare_codebook import (
    OPERAND_DTYPE,
    PreparedCodebook,
    padded_codes,
    padded_features,
    prepare_codebook,
)

PRECISIONS = ("exact", "fast")


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
                             f"{t.dtype} {tuple(t.shape)} on {t.device}: make it with vq_kernels.prepare_codebook")


def nearest_code(x: torch.Tensor, codebook, precision: str = "exact", *, out=None, levels=None):
    """Index (int64 [N]) and squared L2 distance (float32 [N]) of the nearest codebook row for each row of x.

    x [N, D]: fp32, bf16 or fp16, any strides, read in its own dtype. codebook: a [K, D] tensor (any float dtype,
    not necessarily x's) or, to skip preparing it on every call, `vq_kernels.prepare_codebook(codebook)`.
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
    if precision == "fast":
        fast_search(x, prepared, indices, sq_dist)
    else:
        exact_search(x, prepared, indices, sq_dist, levels)
    return indices, sq_dist


# As a PyTorch custom op, torch.compile sees one opaque call with a known output shape instead of tracing into the
# launcher (and its autotuner), and models that contain the quantizer compile without graph breaks. It takes the
# prepared codebook's tensors, since the quantizer prepares once per codebook change.
@torch.library.custom_op("vq_kernels::nearest_code_prepared", mutates_args=())
def nearest_code_prepared_op(x: torch.Tensor, codebook: torch.Tensor, center: torch.Tensor, operand: torch.Tensor,
                             sqnorm: torch.Tensor, stats: torch.Tensor,
                             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nearest_code(x, PreparedCodebook(codebook, center, operand, sqnorm, stats), precision)


@nearest_code_prepared_op.register_fake
def _(x, codebook, center, operand, sqnorm, stats, precision):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)
