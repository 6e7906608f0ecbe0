"""kernels.nearest_code against fp64: the chosen code must be a nearest one within a justified tolerance.

Index equality is the wrong test (near-ties may resolve either way); instead, for each row, the fp64 distance of
the chosen code may exceed the fp64 minimum by at most twice the worst score error that the same arithmetic makes
in plain PyTorch: fp32 scores for `exact`, scores of bf16/fp16-rounded operands for `fast`. A kernel that picks a
code for any other reason lands far outside that.
"""

import pytest
import torch

import kernels
from kernels import reference

SHAPES = [  # (N, K, D): single rows and codes, sizes that are not block multiples, D past the on-chip limit
    (1, 1, 3),
    (1, 37, 3),
    (3, 1, 200),
    (37, 5, 3),
    (1023, 37, 200),
    (130, 300, 64),
    (64, 70, 300),
    (200, 129, 17),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, k, d, dtype, device, contiguous=True, offset=0.0):
    x = torch.randn(n, d, device=device) + offset
    codebook = torch.randn(k, d, device=device) + offset
    if not contiguous:  # column-major x and every other row of a larger codebook
        x = x.T.contiguous().T
        codebook = torch.cat([codebook, torch.randn_like(codebook)], dim=1).reshape(2 * k, d)[::2]
        assert not x.is_contiguous() and not codebook.is_contiguous()
    return x.to(dtype), codebook.to(dtype)


def _score_error_bound(x, codebook, precision):
    """Per row: max over codes of |score computed as the kernel does - exact score| (from fp64)."""
    x64, c64 = x.double(), codebook.double()
    center = c64.mean(0)
    xc, cc = x64 - center, c64 - center
    exact = (cc * cc).sum(1)[None, :] - 2 * xc @ cc.T
    if precision == "fast":
        op = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
        xc, cc = xc.to(op).double(), cc.to(op).double()
        approx = (c64 - center).square().sum(1)[None, :] - 2 * xc @ cc.T
    else:
        xc32, cc32 = xc.float(), cc.float()
        approx = ((cc32 * cc32).sum(1)[None, :] - 2 * xc32 @ cc32.T).double()
    return (approx - exact).abs().amax(dim=1)


def _assert_nearest(x, codebook, indices, sq_dist, precision):
    d64 = torch.cdist(x.double(), codebook.double()).square()
    assert indices.dtype == torch.int64 and sq_dist.dtype == torch.float32
    assert ((indices >= 0) & (indices < codebook.shape[0])).all(), "index out of range"
    chosen = d64.gather(1, indices[:, None]).squeeze(1)
    excess = chosen - d64.min(dim=1).values
    # 2x: the chosen and the true nearest code can each be off by the bound; 2x again for accumulation order.
    tolerance = 4 * _score_error_bound(x, codebook, precision) + 1e-9
    worst = (excess - tolerance).argmax()
    assert (excess <= tolerance).all(), f"row {worst}: {excess[worst]:.3g} farther than nearest, tol {tolerance[worst]:.3g}"
    # The reported distance is the chosen code's, computed directly in fp32.
    torch.testing.assert_close(sq_dist.double(), chosen, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k, d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_chooses_a_nearest_code(n, k, d, dtype, precision, device):
    x, codebook = _inputs(n, k, d, dtype, device)
    indices = torch.full((n,), -7, dtype=torch.int64, device=device)  # poison: every entry must be written
    sq_dist = torch.full((n,), float("nan"), device=device)
    kernels.nearest_code(x, codebook, precision, out=(indices, sq_dist))
    _assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("n, k, d", [(37, 5, 3), (1023, 37, 200), (64, 70, 300)])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_non_contiguous_inputs(n, k, d, precision, device):
    x, codebook = _inputs(n, k, d, torch.float32, device, contiguous=False)
    indices, sq_dist = kernels.nearest_code(x, codebook, precision)
    _assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_data_far_from_the_origin(precision, device):
    """An offset of 100 with unit spread: without centring, fp32 scores would cancel away the differences."""
    x, codebook = _inputs(300, 50, 64, torch.float32, device, offset=100.0)
    indices, sq_dist = kernels.nearest_code(x, codebook, precision)
    _assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_well_separated_codes_are_found_exactly(precision, device):
    """Rows that sit near one code each leave no room for rounding: the index must be that code."""
    codebook = torch.randn(97, 32, device=device) * 10
    truth = torch.randint(0, 97, (513,), device=device)
    x = codebook[truth] + 0.01 * torch.randn(513, 32, device=device)
    indices, _ = kernels.nearest_code(x, codebook, precision)
    torch.testing.assert_close(indices, truth, rtol=0, atol=0)
    ref_indices, _ = reference.nearest_code(x, codebook)
    torch.testing.assert_close(ref_indices, truth, rtol=0, atol=0)


def test_reference_chooses_a_nearest_code(device):
    x, codebook = _inputs(1023, 37, 200, torch.float32, device)
    indices, sq_dist = reference.nearest_code(x, codebook, chunk_rows=100)  # several chunks, a ragged last one
    _assert_nearest(x, codebook, indices, sq_dist, "exact")


def test_duplicated_codes(device):
    """Copies of a code tie up to the rounding of their dot products: any copy is right, nothing else is."""
    codebook = torch.randn(3, 8, device=device).repeat(50, 1)  # 150 codes, each vector 50 times
    x = codebook[:3] + 0.001 * torch.randn(3, 8, device=device)
    indices, _ = kernels.nearest_code(x, codebook)
    assert (indices % 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("impl", [kernels.nearest_code, reference.nearest_code], ids=["triton", "reference"])
def test_non_finite_rows_match_no_code(impl, device):
    x, codebook = _inputs(40, 9, 20, torch.float32, device)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[11, 19] = -float("inf")
    indices, sq_dist = impl(x, codebook)
    bad = torch.zeros(40, dtype=torch.bool, device=device)
    bad[[3, 7, 11]] = True
    assert (indices[bad] == -1).all() and sq_dist[bad].isnan().all()
    _assert_nearest(x[~bad], codebook, indices[~bad], sq_dist[~bad], "exact")


def test_bad_inputs_are_named(device):
    x, codebook = _inputs(10, 4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.nearest_code(x[None], codebook)
    with pytest.raises(ValueError, match="codebook has 7 columns, expected 8"):
        kernels.nearest_code(x, codebook[:, :7])
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but codebook has torch.float32"):
        kernels.nearest_code(x.bfloat16(), codebook)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        kernels.nearest_code(x.long(), codebook.long())
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        kernels.nearest_code(x.double(), codebook.double())
    with pytest.raises(ValueError, match="x is empty"):
        kernels.nearest_code(x[:0], codebook)
    with pytest.raises(ValueError, match="codebook is empty"):
        kernels.nearest_code(x, codebook[:0])
    with pytest.raises(ValueError, match="precision must be one of"):
        kernels.nearest_code(x, codebook, "approximate")
    with pytest.raises(ValueError, match="x is on meta; the Triton kernels need a CUDA tensor"):
        kernels.nearest_code(x.to("meta"), codebook.to("meta"))
    with pytest.raises(ValueError, match=r"out\[1\] \(sq_dist\) must be torch.float32 of shape \(10,\)"):
        kernels.nearest_code(x, codebook, out=(torch.empty(10, dtype=torch.int64), torch.empty(9)))
