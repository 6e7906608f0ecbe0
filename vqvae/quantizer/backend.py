"""Where the codebook's arithmetic runs: the Triton kernels or their PyTorch references, behind one interface.

A codebook picks its backend once per device (`pick_backend`): "triton", "torch", or "auto" (Triton on CUDA,
PyTorch elsewhere: Triton's interpreter is a correctness tool, not a CPU backend). Both offer the same three
operations with the same contracts (`vq_kernels` and `vq_kernels.reference` document them):
    nearest(rows, codebook, prepared) -> int64 [N], -1 for non-finite rows
    stats(rows, indices, num_codes)   -> counts [K], sums [K, D]; index -1 adds nothing
    blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)   the EMA step, in place (decay: a 0-d
                                                                         fp32 tensor on the state's device)
and `prepare(codebook)`, the search's operand form of the codebook (None where the search needs none).
"""

from __future__ import annotations

import contextlib

import torch
import vq_kernels
from vq_kernels import reference


class TorchBackend:
    name = "torch"

    def prepare(self, codebook: torch.Tensor):
        return None

    def nearest(self, rows: torch.Tensor, codebook: torch.Tensor, prepared) -> torch.Tensor:
        return reference.nearest_code(rows, codebook)[0]

    def stats(self, rows: torch.Tensor, indices: torch.Tensor, num_codes: int):
        return reference.code_stats(rows, indices, num_codes)

    def blend_(self, cluster_size, embed_sum, codebook, counts, sums, decay, eps: float) -> None:
        reference.ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)


class TritonBackend:
    """The fused kernels, as custom ops (so torch.compile traces through them)."""

    name = "triton"

    def __init__(self, precision: str, deterministic: bool):
        self.precision, self.deterministic = precision, deterministic

    def prepare(self, codebook: torch.Tensor):
        return vq_kernels.prepare_codebook_op(codebook)

    def nearest(self, rows: torch.Tensor, codebook: torch.Tensor, prepared) -> torch.Tensor:
        return vq_kernels.nearest_code_prepared_op(rows, codebook, *prepared, self.precision)[0]

    def stats(self, rows: torch.Tensor, indices: torch.Tensor, num_codes: int):
        return vq_kernels.code_stats_op(rows, indices, num_codes, self.deterministic)

    def blend_(self, cluster_size, embed_sum, codebook, counts, sums, decay, eps: float) -> None:
        vq_kernels.ema_blend_op(cluster_size, embed_sum, codebook, counts, sums, decay, eps)


TORCH = TorchBackend()


def pick_backend(name: str, device: torch.device, precision: str, deterministic: bool):
    """The backend that `name` ("auto", "triton" or "torch") means on `device`."""
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        return TritonBackend(precision, deterministic)
    return TORCH


def full_precision(device: torch.device):
    """Autocast off for the block: the codebook's maths stays in fp32 whatever the caller's autocast says. The meta
    device has no autocast (and needs none): a step runs there to count its bytes from the shapes alone."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
