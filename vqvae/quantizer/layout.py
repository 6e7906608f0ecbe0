"""How the quantizer reads its input: the rows of D-vectors of a (B, D, *spatial) or (..., D) tensor, and back.

Every check on the input happens here, before anything else runs, so a rejected call changes no state.
"""

from __future__ import annotations

import torch

LAYOUTS = ("auto", "channels_first", "channels_last")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def to_rows(x, dim: int, layout: str, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(N, dim) rows of x (a view where the layout allows) and whether x was channels-first."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the codebook is on {device}; move the quantizer or the input "
                         "with .to()")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if is_channels_first(x, dim, layout):
        return x.movedim(1, -1).reshape(-1, dim), True
    return x.reshape(-1, dim), False


def is_channels_first(x: torch.Tensor, dim: int, layout: str) -> bool:
    first = x.ndim >= 3 and x.shape[1] == dim
    last = x.ndim >= 2 and x.shape[-1] == dim
    if layout == "channels_first":
        if not first:
            raise ValueError(f"layout='channels_first' needs x of shape (B, {dim}, ...), got {tuple(x.shape)}")
        return True
    if layout == "channels_last" or x.ndim != 4:
        if not last:
            raise ValueError(f"x must have shape (..., {dim}) or (B, {dim}, H, W), got {tuple(x.shape)}")
        return False
    if first and last:
        raise ValueError(f"x of shape {tuple(x.shape)} has dim={dim} both at position 1 and last; "
                         "pass layout='channels_first' or 'channels_last' to the quantizer")
    if not (first or last):
        raise ValueError(f"x must have shape (B, {dim}, H, W) or (..., {dim}), got {tuple(x.shape)}")
    return first


def mask_rows(mask, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The mask as one flag per row, checked against the code grid."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if tuple(mask.shape) != tuple(grid):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must match the code grid {tuple(grid)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the codebook is on {device}")
    return mask.reshape(-1)


def grid_shape(shape: torch.Size, channels_first: bool) -> tuple[int, ...]:
    """The shape of the code grid: the input's shape without its feature axis."""
    return (shape[0], *shape[2:]) if channels_first else tuple(shape[:-1])


def from_rows(rows: torch.Tensor, shape: torch.Size, channels_first: bool) -> torch.Tensor:
    """Rows back in the input's layout; `shape` is the input's, with any feature size in place of its own."""
    if channels_first:
        return rows.reshape(*grid_shape(shape, True), rows.shape[-1]).movedim(-1, 1)
    return rows.reshape(*shape[:-1], rows.shape[-1])
