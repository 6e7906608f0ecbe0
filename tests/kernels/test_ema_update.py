"""vq_kernels.code_stats / ema_blend_ / ema_update_ against the PyTorch reference run in fp64.

Tolerance: the kernel's error against fp64 may be at most twice that of the same computation in fp32 PyTorch
(plus a hair for sums that the fp32 reference happens to get exactly right).
"""

import pytest
import torch
import vq_kernels
from vq_kernels import reference

SHAPES = [(1, 1, 3), (37, 5, 3), (1023, 37, 200), (130, 300, 64), (64, 7, 300)]  # (N, K, D)


def _assert_as_close_as_fp32(got, ref32, ref64):
    err = (got.double() - ref64).abs().max().item()
    ref_err = (ref32.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * scale + 1e-12, f"error {err:.3g} vs fp32 reference {ref_err:.3g}"


def _batch(n, k, d, dtype, device, contiguous=True):
    x = torch.randn(n, d, device=device)
    if not contiguous:
        x = x.T.contiguous().T
    indices = torch.randint(-1, k, (n,), device=device)  # -1: rows to leave out
    return x.to(dtype), indices


def _state(k, d, device, dtype=torch.float32):
    codebook = torch.randn(k, d, device=device)
    cluster_size = torch.rand(k, device=device) * 5
    return cluster_size.to(dtype), (codebook * cluster_size[:, None]).to(dtype), codebook.to(dtype)


@pytest.mark.parametrize("n, k, d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_code_stats(n, k, d, dtype, deterministic, device):
    x, indices = _batch(n, k, d, dtype, device, contiguous=(n % 2 == 1))
    counts = torch.full((k,), float("nan"), device=device)  # poison
    sums = torch.full((k, d), float("nan"), device=device)
    vq_kernels.code_stats(x, indices, k, deterministic=deterministic, out=(counts, sums))
    ref_counts32, ref_sums32 = reference.code_stats(x, indices, k)
    ref_counts64, ref_sums64 = reference.code_stats(x.double(), indices, k)
    torch.testing.assert_close(counts.double(), ref_counts64, rtol=0, atol=0)
    _assert_as_close_as_fp32(sums, ref_sums32, ref_sums64)


@pytest.mark.parametrize("indices_dtype", [torch.int32, torch.int64])
def test_code_stats_takes_int32_indices(indices_dtype, device):
    x, indices = _batch(100, 9, 16, torch.float32, device)
    counts, sums = vq_kernels.code_stats(x, indices.to(indices_dtype), 9)
    ref_counts, ref_sums = reference.code_stats(x.double(), indices, 9)
    torch.testing.assert_close(counts.double(), ref_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)


def test_deterministic_mode_is_bit_identical(device):
    # Wide dynamic range and one crowded code: any change in summation order shows in the low bits.
    x = torch.randn(4099, 24, device=device) * torch.logspace(-3, 3, 4099, device=device)[:, None]
    indices = torch.randint(0, 5, (4099,), device=device)
    indices[::3] = 2
    first = vq_kernels.code_stats(x, indices, 5, deterministic=True)
    for _ in range(2):
        again = vq_kernels.code_stats(x, indices, 5, deterministic=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    state = [_state(5, 24, device) for _ in range(2)]
    state[1] = tuple(t.clone() for t in state[0])
    for s in state:
        vq_kernels.ema_update_(x, indices, *s, 0.99, 1e-5, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(*state))


def test_deterministic_mode_spreads_a_code_that_takes_almost_every_row(device):
    """A collapsing codebook: code 3 takes all but a few of 5000 rows. Its run is summed in chunks of 256 rows by
    separate programs and the chunk sums are added in chunk order: the same bits on every run, and as close to the
    fp64 sums as fp32 summation gets (the atomic mode, on the same rows, for comparison)."""
    x = torch.randn(5000, 40, device=device) * torch.logspace(-2, 2, 5000, device=device)[:, None]
    indices = torch.full((5000,), 3, dtype=torch.int64, device=device)
    indices[::97] = torch.randint(-1, 6, (52,), device=device)
    first = vq_kernels.code_stats(x, indices, 6, deterministic=True)
    for _ in range(2):
        again = vq_kernels.code_stats(x, indices, 6, deterministic=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ref_counts64, ref_sums64 = reference.code_stats(x.double(), indices, 6)
    torch.testing.assert_close(first[0].double(), ref_counts64, rtol=0, atol=0)
    _assert_as_close_as_fp32(first[1], reference.code_stats(x, indices, 6)[1], ref_sums64)
    _assert_as_close_as_fp32(vq_kernels.code_stats(x, indices, 6)[1], reference.code_stats(x, indices, 6)[1], ref_sums64)


@pytest.mark.parametrize("run", [1, 255, 256, 257, 513])
def test_deterministic_chunks_meet_exactly(run, device):
    """Runs just under, at and over the 256-row chunk: every row is summed once, in a fixed order."""
    indices = torch.cat([torch.full((run,), 1), torch.full((run + 7,), 0), torch.full((3,), 2)]).to(device)
    x = torch.randn(indices.shape[0], 9, device=device)
    counts, sums = vq_kernels.code_stats(x, indices, 3, deterministic=True)
    ref_counts64, ref_sums64 = reference.code_stats(x.double(), indices, 3)
    torch.testing.assert_close(counts.double(), ref_counts64, rtol=0, atol=0)
    _assert_as_close_as_fp32(sums, reference.code_stats(x, indices, 3)[1], ref_sums64)


@pytest.mark.parametrize("n, k, d", SHAPES)
def test_ema_blend(n, k, d, device):
    counts, sums = reference.code_stats(*_batch(n, k, d, torch.float32, device), k)
    state32 = _state(k, d, device)
    state64 = tuple(t.double() for t in state32)
    ref32 = tuple(t.clone() for t in state32)
    vq_kernels.ema_blend_(*state32, counts, sums, 0.95, 1e-5)
    reference.ema_blend_(*ref32, counts, sums, 0.95, 1e-5)
    reference.ema_blend_(*state64, counts.double(), sums.double(), 0.95, 1e-5)
    for got, r32, r64 in zip(state32, ref32, state64):
        _assert_as_close_as_fp32(got, r32, r64)


def test_ema_blend_on_strided_state(device):
    cluster_size, embed_sum, codebook = _state(33, 20, device)
    embed_sum_t = embed_sum.T.contiguous().T  # column-major state, updated in place through its strides
    codebook_t = codebook.T.contiguous().T
    counts, sums = reference.code_stats(*_batch(90, 33, 20, torch.float32, device), 33)
    expected = (cluster_size.clone(), embed_sum.clone(), codebook.clone())
    reference.ema_blend_(*expected, counts, sums, 0.9, 1e-5)
    vq_kernels.ema_blend_(cluster_size, embed_sum_t, codebook_t, counts, sums.T.contiguous().T, 0.9, 1e-5)
    for got, want in zip((cluster_size, embed_sum_t, codebook_t), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_matches_reference(deterministic, device):
    x, indices = _batch(1023, 37, 200, torch.bfloat16, device)
    state = _state(37, 200, device)
    ref32 = tuple(t.clone() for t in state)
    ref64 = tuple(t.double() for t in state)
    counts = vq_kernels.ema_update_(x, indices, *state, 0.99, 1e-5, deterministic=deterministic)
    reference.ema_update_(x, indices, *ref32, 0.99, 1e-5)
    ref_counts = reference.ema_update_(x.double(), indices, *ref64, 0.99, 1e-5)
    torch.testing.assert_close(counts.double(), ref_counts, rtol=0, atol=0)
    for got, r32, r64 in zip(state, ref32, ref64):
        _assert_as_close_as_fp32(got, r32, r64)


def test_codes_sitting_on_their_rows_do_not_move(device):
    """Counts equal to the state and rows equal to the codes: the blend is a fixed point (up to smoothing)."""
    cluster_size, embed_sum, codebook = _state(16, 8, device)
    cluster_size.fill_(3.0)
    embed_sum.copy_(codebook * 3.0)
    before = codebook.clone()
    x = codebook.repeat(3, 1)
    vq_kernels.ema_update_(x, torch.arange(16, device=device).repeat(3), cluster_size, embed_sum, codebook, 0.9, 1e-5)
    torch.testing.assert_close(codebook, before, rtol=1e-6, atol=1e-6)


def _rejects_without_touching_state(call, error, match, device):
    state = _state(6, 4, device)
    before = tuple(t.clone() for t in state)
    with pytest.raises(error, match=match):
        call(*state)
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "a rejected call changed the state"


def test_bad_inputs_are_named_and_leave_the_state_alone(device):
    x, indices = _batch(10, 6, 4, torch.float32, device)
    cases = [
        (lambda *s: vq_kernels.ema_update_(x[:, :3], indices, *s, 0.99, 1e-5), ValueError, "x has 3 columns, expected 4"),
        (lambda *s: vq_kernels.ema_update_(x, indices[:9], *s, 0.99, 1e-5), ValueError, r"indices must have shape \(10,\)"),
        (lambda *s: vq_kernels.ema_update_(x, indices.float(), *s, 0.99, 1e-5), TypeError, "indices must be an int64"),
        (lambda *s: vq_kernels.ema_update_(x, indices + 6, *s, 0.99, 1e-5), RuntimeError,  # a device-side assert
         "out of range for num_codes=6"),
        (lambda *s: vq_kernels.ema_update_(x, indices, *s, 1.5, 1e-5), ValueError, r"decay must be in \[0, 1\)"),
        (lambda *s: vq_kernels.ema_update_(x, indices, *s, 0.99, 0.0), ValueError, "eps must be positive"),
        (lambda *s: vq_kernels.ema_update_(x[:0], indices[:0], *s, 0.99, 1e-5), ValueError, "x is empty"),
        (lambda cs, es, cb: vq_kernels.ema_update_(x, indices, cs[:5], es, cb, 0.99, 1e-5), ValueError,
         r"cluster_size must have shape \(6,\)"),
        (lambda cs, es, cb: vq_kernels.ema_update_(x, indices, cs, es.double(), cb, 0.99, 1e-5), TypeError,
         "embed_sum has dtype torch.float64"),
        (lambda cs, es, cb: vq_kernels.ema_blend_(cs, es, cb, torch.ones(6), torch.ones(5, 4), 0.99, 1e-5),
         ValueError, "sums has 5 rows but codebook has 6"),
        (lambda *s: vq_kernels.code_stats(x.to("meta"), indices.to("meta"), 6), ValueError, "x is on meta"),
    ]
    for call, error, match in cases:
        _rejects_without_touching_state(call, error, match, device)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("blend", ["triton", "torch"])
def test_a_batch_without_rows_leaves_the_state_exactly_as_it_was(decay, blend, device):
    """Every row left out (masked, non-finite): nothing to learn from, so nothing changes, whatever the decay.
    With decay 0 this used to make every code NaN (0 / 0 in the Laplace smoothing)."""
    state = _state(7, 5, device)
    state[2].add_(0.25)  # a codebook that is not embed_sum / smoothed (as after a re-seed): it must not be rebuilt
    before = tuple(t.clone() for t in state)
    x = torch.randn(9, 5, device=device)
    nothing = torch.full((9,), -1, dtype=torch.int64, device=device)
    if blend == "triton":
        vq_kernels.ema_update_(x, nothing, *state, decay, 1e-5)
        counts, sums = vq_kernels.code_stats(x, nothing, 7)
        vq_kernels.ema_blend_(*state, counts, sums, decay, 1e-5)
    else:
        reference.ema_update_(x, nothing, *state, decay, 1e-5)
    for got, want in zip(state, before):
        assert torch.equal(got, want)


def test_decay_may_be_a_device_tensor(device):
    counts, sums = reference.code_stats(*_batch(50, 6, 4, torch.float32, device), 6)
    as_float, as_tensor, expected = (_state(6, 4, device) for _ in range(3))
    for state in (as_tensor, expected):
        for t, src in zip(state, as_float):
            t.copy_(src)
    vq_kernels.ema_blend_(*as_float, counts, sums, 0.75, 1e-5)
    vq_kernels.ema_blend_(*as_tensor, counts, sums, torch.tensor(0.75, device=device), 1e-5)
    reference.ema_blend_(*expected, counts, sums, torch.tensor(0.75, device=device), 1e-5)
    for a, b, c in zip(as_float, as_tensor, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="0-d float32 tensor"):
        vq_kernels.ema_blend_(*as_float, counts, sums, torch.tensor([0.5, 0.5], device=device), 1e-5)


# What makes the host wait for the device: reading a value back (item, bool, int, comparisons to Python), or
# copying a Python value to the device (torch.tensor / as_tensor of a number: lift_fresh). A Python number given
# to an op (torch.where(c, t, 3)) is not one: it is wrapped as a CPU scalar and passed by value.
HOST_WAITS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::lift_fresh",
              "aten::lift_fresh_copy")


def _host_waits(call) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().split(".")[0] in HOST_WAITS:
                seen.append(func.name())
            return func(*args, **(kwargs or {}))

    with Record():
        call()
    return seen


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_public_functions_with_a_float_decay_and_default_options_never_wait_on_the_device(deterministic, device):
    x, indices = _batch(37, 6, 5, torch.float32, device)
    state = _state(6, 5, device)
    assert _host_waits(lambda: vq_kernels.ema_update_(x, indices, *state, 0.99, 1e-5,
                                                      deterministic=deterministic)) == []
    assert _host_waits(lambda: vq_kernels.code_stats(x, indices, 6, deterministic=deterministic)) == []
    counts, sums = vq_kernels.code_stats(x, indices, 6)
    assert _host_waits(lambda: vq_kernels.ema_blend_(*state, counts, sums, 0.99, 1e-5)) == []
    assert _host_waits(lambda: float(counts.sum())) == ["aten::_local_scalar_dense"]  # the check can fail


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 0.1234567])
def test_a_float_decay_and_the_same_decay_as_a_device_tensor_give_the_same_bits(decay, device):
    x, indices = _batch(50, 7, 6, torch.float32, device)
    by_float, by_tensor = _state(7, 6, device), None
    by_tensor = tuple(t.clone() for t in by_float)
    vq_kernels.ema_update_(x, indices, *by_float, decay, 1e-5)
    vq_kernels.ema_update_(x, indices, *by_tensor, torch.tensor(decay, device=device), 1e-5)
    for a, b in zip(by_float, by_tensor):
        assert torch.equal(a, b)
