"""vq_kernels.nearest_code against fp64: the chosen code must be a nearest one within a justified tolerance.

Index equality is the wrong test (near-ties may resolve either way); instead, for each row, the fp64 distance of
the chosen code may exceed the fp64 minimum by at most twice the worst score error that the same arithmetic makes
in plain PyTorch: fp32 scores for `exact` (its promise: nearest up to fp32 rounding), scores of the fp16-rounded
operands for `fast`. A kernel that picks a code for any other reason lands far outside that.
"""

from pathlib import Path

import pytest
import torch
import vq_kernels
from vq_kernels import reference

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


@pytest.mark.parametrize("n, k, d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_chooses_a_nearest_code(n, k, d, dtype, precision, device, assert_nearest):
    x, codebook = _inputs(n, k, d, dtype, device)
    indices = torch.full((n,), -7, dtype=torch.int64, device=device)  # poison: every entry must be written
    sq_dist = torch.full((n,), float("nan"), device=device)
    vq_kernels.nearest_code(x, codebook, precision, out=(indices, sq_dist))
    assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("n, k, d", [(37, 5, 3), (1023, 37, 200), (64, 70, 300)])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_non_contiguous_inputs(n, k, d, precision, device, assert_nearest):
    x, codebook = _inputs(n, k, d, torch.float32, device, contiguous=False)
    indices, sq_dist = vq_kernels.nearest_code(x, codebook, precision)
    assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("offset", [4.0, 50.0, 100.0])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_data_far_from_the_origin(offset, precision, device, assert_nearest):
    """Offsets up to 100 with unit spread: without centring, the scores would cancel away the differences."""
    x, codebook = _inputs(300, 50, 64, torch.float32, device, offset=offset)
    indices, sq_dist = vq_kernels.nearest_code(x, codebook, precision)
    assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_well_separated_codes_are_found_exactly(precision, device):
    """Rows that sit near one code each leave no room for rounding: the index must be that code."""
    codebook = torch.randn(97, 32, device=device) * 10
    truth = torch.randint(0, 97, (513,), device=device)
    x = codebook[truth] + 0.01 * torch.randn(513, 32, device=device)
    indices, _ = vq_kernels.nearest_code(x, codebook, precision)
    torch.testing.assert_close(indices, truth, rtol=0, atol=0)
    ref_indices, _ = reference.nearest_code(x, codebook)
    torch.testing.assert_close(ref_indices, truth, rtol=0, atol=0)


def test_reference_chooses_a_nearest_code(device, assert_nearest):
    x, codebook = _inputs(1023, 37, 200, torch.float32, device)
    indices, sq_dist = reference.nearest_code(x, codebook, chunk_rows=100)  # several chunks, a ragged last one
    assert_nearest(x, codebook, indices, sq_dist, "exact")
    # Chunks of codes too (ragged: 37 = 4 x 8 + 5), with a running minimum: the same answer as one chunk.
    tiled, tiled_dist = reference.nearest_code(x, codebook, chunk_rows=100, chunk_codes=8)
    assert_nearest(x, codebook, tiled, tiled_dist, "exact")


def test_reference_across_chunks_of_codes_gives_ties_to_the_lower_index(device):
    codebook = torch.randn(5, 8, device=device).repeat(7, 1)  # 35 codes, copies in every chunk of 3
    x = torch.cat([codebook[:5] + 0.001 * torch.randn(5, 8, device=device),
                   torch.tensor([[float("nan")] * 8], device=device)])
    indices, sq_dist = reference.nearest_code(x, codebook, chunk_codes=3)
    assert indices.tolist() == [0, 1, 2, 3, 4, -1]
    assert torch.isnan(sq_dist[-1])


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_duplicated_codes(precision, device):
    """50 copies of each code: `exact` settles the tie by fp32 distance, which is the same for every copy, and so
    returns the first copy; `fast` may return any copy (module docstring), but nothing else."""
    codebook = torch.randn(3, 8, device=device).repeat(50, 1)  # 150 codes, each vector 50 times
    x = codebook[:3] + 0.001 * torch.randn(3, 8, device=device)
    indices, _ = vq_kernels.nearest_code(x, codebook, precision)
    assert (indices if precision == "exact" else indices % 3).tolist() == [0, 1, 2]


def _duplicated_codebook(device, d=48):
    """Codes 0..39 have exact copies at i + 80 and i + 120 (in other code tiles); rows near them, and random rows."""
    base = torch.randn(40, d, device=device)
    codebook = torch.cat([base, torch.randn(40, d, device=device), base, base])
    near = base[torch.randint(0, 40, (600,), device=device)] + 0.05 * torch.randn(600, d, device=device)
    return torch.cat([near, torch.randn(400, d, device=device)]), codebook


def _lowest_copy(codebook, indices):
    """For each chosen code, the lowest index holding the same vector."""
    return (codebook[indices][:, None, :] == codebook[None]).all(dim=-1).int().argmax(dim=1)


def test_exact_resolves_duplicated_codes_to_the_lowest_index(device, assert_nearest):
    """Issue 11, item 5: the docstring promised the lower index on ties, but the 3xTF32 search returned a later copy
    for 40-60 of these 1000 rows (the fp32 dot products of identical columns differed in their last bits)."""
    x, codebook = _duplicated_codebook(device)
    indices, sq_dist = vq_kernels.nearest_code(x, codebook, "exact")
    assert_nearest(x, codebook, indices, sq_dist, "exact")
    torch.testing.assert_close(indices, _lowest_copy(codebook, indices), rtol=0, atol=0)


def test_fast_returns_a_copy_of_a_nearest_code(device, assert_nearest):
    x, codebook = _duplicated_codebook(device)
    indices, sq_dist = vq_kernels.nearest_code(x, codebook, "fast")
    assert_nearest(x, codebook, indices, sq_dist, "fast")


def test_levels_say_how_each_row_was_settled(device, assert_nearest):
    """Rows near a well-separated code are certified by the fp16 pass (level 0); a code with copies elsewhere leaves
    its rows to the kept candidates (1) or, with the copies in one tile, to the fallback (2); so does a code with
    six copies, more than the kept minima. Every row still gets the first copy of its nearest code."""
    codebook = 4 * torch.randn(130, 24, device=device)
    codebook[100] = codebook[5]  # one copy, in another tile for BLOCK_K <= 64
    codebook[10:16] = codebook[3]  # six copies of code 3, some in code 3's own tile
    truth = torch.randint(0, 130, (400,), device=device)
    truth[:40], truth[40:80] = 3, 5
    x = codebook[truth] + 0.01 * torch.randn(400, 24, device=device)
    levels = torch.full((400,), -1, dtype=torch.int8, device=device)  # poison
    indices, sq_dist = vq_kernels.nearest_code(x, codebook, "exact", levels=levels)
    assert_nearest(x, codebook, indices, sq_dist, "exact")
    torch.testing.assert_close(indices, _lowest_copy(codebook, truth), rtol=0, atol=0)
    assert (levels[:40] == 2).all() and (levels[40:80] >= 1).all()
    alone = (truth != 3) & (truth != 5) & ((truth < 10) | (truth >= 16)) & (truth != 100)
    assert (levels[alone] == 0).all()


def test_prepared_codebook_is_what_its_docstring_says(device):
    codebook = (3 * torch.randn(74, 20, device=device) + 1)[::2]  # strided, 37 codes
    prepared = vq_kernels.prepare_codebook(codebook)
    center = codebook.mean(dim=0)
    torch.testing.assert_close(prepared.center, center, rtol=1e-6, atol=1e-6)
    scale = 1 / prepared.stats[0]
    assert torch.log2(scale) == torch.round(torch.log2(scale)), "the scale must be a power of two"
    assert 2**12 <= prepared.operand.abs().max() < 2**14
    # Zero-padded to whole tiles of codes (and a spare one) and features; padding codes can never win.
    assert prepared.operand.shape == (256, 32) and prepared.sqnorm.shape == (256,)
    operand, padding = prepared.operand[:37, :20], prepared.operand.clone()
    padding[:37, :20] = 0
    assert not padding.any() and (prepared.sqnorm[37:] == float("inf")).all()
    centred = codebook - prepared.center
    torch.testing.assert_close(operand, (centred * scale).half(), rtol=0, atol=0)
    c64 = codebook.double() - codebook.double().mean(dim=0)
    torch.testing.assert_close(prepared.sqnorm[:37].double(), c64.square().sum(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prepared.stats[1].double(), c64.norm(dim=1).max(), rtol=1e-5, atol=0)
    rounding = (operand.double() / scale.double() - centred.double()).norm(dim=1).max()
    torch.testing.assert_close(prepared.stats[2].double(), rounding, rtol=1e-3, atol=0)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_prepared_codebook_gives_the_same_search(precision, device):
    x, codebook = _inputs(300, 70, 40, torch.float32, device)
    prepared = vq_kernels.prepare_codebook(codebook)
    once = vq_kernels.nearest_code(x, codebook, precision)
    for _ in range(2):
        again = vq_kernels.nearest_code(x, prepared, precision)
        assert torch.equal(once[0], again[0]) and torch.equal(once[1], again[1])


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_x_in_its_own_dtype_against_an_fp32_codebook(x_dtype, precision, device, assert_nearest):
    """What the quantizer does: x as the encoder made it, the codebook in fp32; nothing is copied to fp32."""
    x, codebook = _inputs(200, 129, 17, torch.float32, device)
    x = x.to(x_dtype)
    indices, sq_dist = vq_kernels.nearest_code(x, vq_kernels.prepare_codebook(codebook), precision)
    assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_custom_ops_for_torch_compile(precision, device):
    """The ops a compiled quantizer calls: schema, fake (meta) implementations and results, checked by opcheck."""
    x, codebook = _inputs(50, 9, 20, torch.float32, device)
    prepared = vq_kernels.prepare_codebook_op(codebook)
    torch.library.opcheck(vq_kernels.prepare_codebook_op, (codebook,))
    torch.library.opcheck(vq_kernels.nearest_code_prepared_op, (x, codebook, *prepared, precision))
    indices, sq_dist = vq_kernels.nearest_code_prepared_op(x, codebook, *prepared, precision)
    expected = vq_kernels.nearest_code(x, codebook, precision)
    assert torch.equal(indices, expected[0]) and torch.equal(sq_dist, expected[1])


def test_real_encoder_outputs(device, assert_nearest):
    """Rows and codebook of a trained quick-start model (tests/kernels/data, made by bench/exact_levels.py): the codes
    sit close to the data, where fp16 scores cannot separate them and the fp32 stages do the work."""
    x, codebook = (t.to(device) for t in torch.load(Path(__file__).with_name("data") / "quickstart_rows.pt"))
    for precision in ("exact", "fast"):
        indices, sq_dist = vq_kernels.nearest_code(x, codebook, precision)
        assert_nearest(x, codebook, indices, sq_dist, precision)


@pytest.mark.parametrize("impl", [vq_kernels.nearest_code, reference.nearest_code], ids=["triton", "reference"])
def test_non_finite_rows_match_no_code(impl, device, assert_nearest):
    x, codebook = _inputs(40, 9, 20, torch.float32, device)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[11, 19] = -float("inf")
    indices, sq_dist = impl(x, codebook)
    bad = torch.zeros(40, dtype=torch.bool, device=device)
    bad[[3, 7, 11]] = True
    assert (indices[bad] == -1).all() and sq_dist[bad].isnan().all()
    assert_nearest(x[~bad], codebook, indices[~bad], sq_dist[~bad], "exact")


def test_bad_inputs_are_named(device):
    x, codebook = _inputs(10, 4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="x must be 2-D"):
        vq_kernels.nearest_code(x[None], codebook)
    with pytest.raises(ValueError, match="codebook has 7 columns, expected 8"):
        vq_kernels.nearest_code(x, codebook[:, :7])
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        vq_kernels.nearest_code(x.long(), codebook.long())
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        vq_kernels.nearest_code(x.double(), codebook.double())
    with pytest.raises(ValueError, match="x is empty"):
        vq_kernels.nearest_code(x[:0], codebook)
    with pytest.raises(ValueError, match="codebook is empty"):
        vq_kernels.nearest_code(x, codebook[:0])
    with pytest.raises(ValueError, match="precision must be one of"):
        vq_kernels.nearest_code(x, codebook, "approximate")
    with pytest.raises(ValueError, match="x is on meta; the Triton kernels need a CUDA tensor"):
        vq_kernels.nearest_code(x.to("meta"), codebook.to("meta"))
    with pytest.raises(ValueError, match=r"out\[1\] \(sq_dist\) must be torch.float32 of shape \(10,\)"):
        out = (torch.empty(10, dtype=torch.int64, device=device), torch.empty(9, device=device))
        vq_kernels.nearest_code(x, codebook, out=out)
    prepared = vq_kernels.prepare_codebook(codebook)
    with pytest.raises(ValueError, match="prepared.operand must be a contiguous torch.float16 tensor"):
        vq_kernels.nearest_code(x, prepared._replace(operand=prepared.operand.float()))
    with pytest.raises(ValueError, match="levels= is only filled by precision='exact'"):
        vq_kernels.nearest_code(x, prepared, "fast", levels=torch.empty(10, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match=r"levels must be torch.int8 of shape \(10,\)"):
        vq_kernels.nearest_code(x, prepared, levels=torch.empty(10, device=device))


# -- few rows, many codes: each block of rows swept by several programs over ranges of the codes ----------------


@pytest.mark.parametrize("n, k, sms, splits", [
    (16384, 262144, 132, 1),  # 128 row blocks fill 132 SMs: no split
    (1024, 262144, 132, 16),  # 8 row blocks x 16
    (1, 262147, 132, 121),  # one row: 128 splits wanted (2,048 codes or more each), 121 of 17 tiles
    (37, 4097, 132, 2),
    (37, 4095, 132, 1),  # too few codes to be worth a split
    (37, 6149, 4, 3),  # the test below, under the interpreter's pretend 4 SMs
])
def test_search_splits_cover_every_code_once(n, k, sms, splits):
    from vq_kernels.nearest_pass import MAX_BLOCK_K, MIN_SPLIT_CODES, search_splits

    got, codes = search_splits(n, k, sms)
    assert got == splits
    assert codes % MAX_BLOCK_K == 0  # a whole number of tiles for every BLOCK_K
    padded = -(-k // MAX_BLOCK_K) * MAX_BLOCK_K
    assert (got - 1) * codes < padded <= got * codes  # the ranges cover the codes, and none is empty
    assert got == 1 or codes >= MIN_SPLIT_CODES


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_split_codes_give_the_unsplit_answer(precision, device, monkeypatch, assert_nearest):
    """40 rows against 6,149 codes in 3 splits (`vq_kernels.nearest_pass.search_splits`): codes 0..39 have exact copies
    in each later split, a code has six copies in one tile (its rows go to the fallback), two rows are NaN. The
    answers are nearest in fp64; `exact` returns the first copy, as the unsplit search does, and both modes give the
    same indices as with one program per block of rows."""
    import vq_kernels._common
    import vq_kernels.nearest_exact
    import vq_kernels.nearest_pass

    k, d = 6149, 12
    splits, split = vq_kernels.nearest_pass.search_splits(40, k, vq_kernels._common.multiprocessors(device))
    assert splits == 3  # on a GPU too: one block of rows, fewer than its SMs
    codebook = 2 * torch.randn(k, d, device=device)
    for copy in (split + 7, 2 * split + 11):
        codebook[copy:copy + 40] = codebook[:40]
    codebook[1000:1006] = codebook[5000]
    truth = torch.cat([torch.arange(0, 40, 2), torch.tensor([5000] * 4 + [k - 1, split - 1, split]),
                       torch.randint(0, k, (9,))]).to(device)
    x = codebook[truth] + 0.01 * torch.randn(truth.numel(), d, device=device)
    x[-2, 3], x[-1, 0] = float("nan"), float("inf")

    sweep = vq_kernels.nearest_pass.Sweep(x, vq_kernels.prepare_codebook(codebook))
    assert sweep.splits == 3 and sweep.split_codes == split
    levels = torch.full((x.shape[0],), -1, dtype=torch.int8, device=device)  # poison
    indices = torch.full((x.shape[0],), -7, dtype=torch.int64, device=device)
    sq_dist = torch.full((x.shape[0],), 123.0, device=device)
    kwargs = {"levels": levels} if precision == "exact" else {}
    vq_kernels.nearest_code(x, codebook, precision, out=(indices, sq_dist), **kwargs)
    finite = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    finite[-2:] = False
    assert (indices[~finite] == -1).all() and sq_dist[~finite].isnan().all()
    assert_nearest(x[finite], codebook, indices[finite], sq_dist[finite], precision)
    if precision == "exact":
        torch.testing.assert_close(indices[finite], _lowest_copy(codebook, indices[finite]), rtol=0, atol=0)
        assert (levels >= 0).all() and (levels[20:24] == 2).all()  # the six copies: settled by the fallback

    for module in (vq_kernels.nearest_pass, vq_kernels.nearest_exact):
        monkeypatch.setattr(module, "multiprocessors", lambda device: 1)  # one row block fills "the GPU": no split
    assert vq_kernels.nearest_pass.Sweep(x, vq_kernels.prepare_codebook(codebook)).splits == 1
    unsplit, unsplit_dist = vq_kernels.nearest_code(x, codebook, precision)
    if precision == "exact":
        torch.testing.assert_close(indices, unsplit, rtol=0, atol=0)
    else:  # fast picks any copy of a duplicated code (module docstring): compare what the copies stand for
        torch.testing.assert_close(_lowest_copy(codebook, indices[finite]),
                                   _lowest_copy(codebook, unsplit[finite]), rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, unsplit_dist, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n, k, d, dtype, contiguous", [
    (3, 4200, 300, torch.float32, True),  # D past the on-chip limit: the rows are re-read in slices every tile
    (70, 4500, 19, torch.bfloat16, False),  # column-major bf16 x, every other row of a larger codebook
])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_split_searches_at_odd_shapes(n, k, d, dtype, contiguous, precision, device, assert_nearest):
    import vq_kernels._common
    import vq_kernels.nearest_pass

    assert vq_kernels.nearest_pass.search_splits(n, k, vq_kernels._common.multiprocessors(device))[0] == 2
    x, codebook = _inputs(n, k, d, dtype, device, contiguous=contiguous)
    indices = torch.full((n,), -7, dtype=torch.int64, device=device)  # poison: every entry must be written
    sq_dist = torch.full((n,), float("nan"), device=device)
    vq_kernels.nearest_code(x, codebook, precision, out=(indices, sq_dist))
    assert_nearest(x, codebook, indices, sq_dist, precision)
