"""Triton kernels of the EMA vector quantizer. Plain PyTorch references of the same functions: `vq_kernels.reference`.

Each function also exists as a PyTorch custom op (`*_op`, namespace `vq_kernels`; the search's takes a prepared
codebook) for use under torch.compile. The folder kernels/ installs as the package `vq_kernels` (pyproject.toml).
"""

from .code_stats import code_stats, code_stats_op
from .ema_update import ema_blend_, ema_blend_op, ema_update_
from .nearest_code import PRECISIONS, nearest_code, nearest_code_prepared_op
from .prepare_codebook import PreparedCodebook, prepare_codebook, prepare_codebook_op

__all__ = ["PRECISIONS", "PreparedCodebook", "code_stats", "code_stats_op", "ema_blend_", "ema_blend_op", "ema_update_",
           "nearest_code", "nearest_code_prepared_op", "prepare_codebook", "prepare_codebook_op"]
