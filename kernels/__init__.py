"""Triton kernels of the EMA vector quantizer. Plain PyTorch references of the same functions: `kernels.reference`."""

from .code_stats import code_stats
from .ema_update import ema_blend_, ema_update_
from .nearest_code import PRECISIONS, nearest_code

__all__ = ["PRECISIONS", "code_stats", "ema_blend_", "ema_update_", "nearest_code"]
