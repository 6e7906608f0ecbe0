"""How the quantizer reads its input (vqvae/quantizer/layout.py): rows of D-vectors from either layout and back, the
ambiguous shapes named, and every bad input refused before anything runs."""

import pytest
import torch

from vqvae.quantizer.layout import from_rows, grid_shape, mask_rows, to_rows

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape, layout, channels_first", [
    ((2, 5, 3, 4), "auto", True),          # (B, D, H, W)
    ((2, 3, 4, 5), "auto", False),         # (B, H, W, D)
    ((7, 5), "auto", False),               # (N, D)
    ((2, 3, 5), "auto", False),            # (B, N, D): not 4-d, so channels-last
    ((2, 5, 6), "channels_first", True),   # (B, D, T)
    ((2, 5, 3, 4, 2), "channels_first", True),
])
def test_rows_come_back_in_the_input_layout(shape, layout, channels_first):
    x = torch.randn(*shape)
    if x.ndim >= 3:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    rows, first = to_rows(x, 5, layout, CPU)
    assert first is channels_first and rows.shape == (x.numel() // 5, 5)
    assert grid_shape(x.shape, first) == tuple(s for i, s in enumerate(x.shape) if i != (1 if first else x.ndim - 1))
    assert torch.equal(from_rows(rows, x.shape, first), x)
    # another feature size on the way back (a projection's): the grid is kept
    assert from_rows(torch.zeros(rows.shape[0], 2), x.shape, first).shape[1 if first else -1] == 2


def test_a_shape_with_dim_in_both_places_asks_for_the_layout():
    x = torch.randn(2, 4, 3, 4)
    with pytest.raises(ValueError, match=r"dim=4 both at position 1 and last; pass layout='channels_first'"):
        to_rows(x, 4, "auto", CPU)
    assert to_rows(x, 4, "channels_last", CPU)[1] is False and to_rows(x, 4, "channels_first", CPU)[1] is True


@pytest.mark.parametrize("x, error, message", [
    ([1.0, 2.0], TypeError, "x must be a torch.Tensor, got list"),
    (torch.zeros(3, 5, dtype=torch.float64), TypeError, "x has dtype torch.float64"),
    (torch.zeros(0, 5), ValueError, r"x is empty \(shape \(0, 5\)\)"),
    (torch.zeros(3, 4), ValueError, r"x must have shape \(\.\.\., 5\)"),
    (torch.zeros(2, 4, 3, 3), ValueError, r"x must have shape \(B, 5, H, W\) or \(\.\.\., 5\)"),
])
def test_bad_input_is_named(x, error, message):
    with pytest.raises(error, match=message):
        to_rows(x, 5, "auto", CPU)


def test_channels_first_is_refused_for_a_shape_without_dim_at_position_one():
    with pytest.raises(ValueError, match=r"layout='channels_first' needs x of shape \(B, 5, \.\.\.\)"):
        to_rows(torch.zeros(2, 3, 5), 5, "channels_first", CPU)


def test_a_mask_must_be_bool_and_match_the_code_grid():
    assert mask_rows(torch.ones(2, 3, dtype=torch.bool), (2, 3), CPU).shape == (6,)
    with pytest.raises(TypeError, match="mask must be a bool tensor, got torch.float32"):
        mask_rows(torch.ones(2, 3), (2, 3), CPU)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\); it must match the code grid \(2, 3\)"):
        mask_rows(torch.ones(3, 2, dtype=torch.bool), (2, 3), CPU)
