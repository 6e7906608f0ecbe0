"""VectorQuantizerEMA as a model sees it: shapes, gradients, losses, train/eval, state, backends, bad input."""

import pytest
import torch

from kernels import reference
from vqvae.quantizer import QuantizerOutput, VectorQuantizerEMA

BACKENDS = ["torch", "triton"]


def _clustered(batch, dim, height, width, centres, device, noise=0.05):
    """Channels-first features drawn near a few centres, so that nearest codes are unambiguous."""
    picks = torch.randint(0, centres.shape[0], (batch, height, width), device=device)
    rows = centres[picks] + noise * torch.randn(batch, height, width, dim, device=device)
    return rows.permute(0, 3, 1, 2).contiguous()


def _trained_quantizer(backend, device, num_codes=32, dim=8, **kwargs):
    """A quantizer initialised from one training batch, then put in eval mode."""
    quantizer = VectorQuantizerEMA(num_codes, dim, backend=backend, **kwargs).to(device)
    quantizer(torch.randn(4, dim, 6, 5, device=device))
    return quantizer.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_in_both_layouts(backend, device):
    quantizer = _trained_quantizer(backend, device)
    out = quantizer(torch.randn(2, 8, 5, 3, device=device))
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (2, 8, 5, 3) and out.indices.shape == (2, 5, 3)
    out = quantizer(torch.randn(2, 7, 8, device=device))  # channels-last sequence
    assert out.quantized.shape == (2, 7, 8) and out.indices.shape == (2, 7)
    out = quantizer(torch.randn(11, 8, device=device))
    assert out.quantized.shape == (11, 8) and out.indices.shape == (11,)
    assert out.indices.dtype == torch.int64 and out.loss.shape == out.perplexity.shape == out.usage.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_is_the_chosen_code_in_either_layout(backend, device):
    quantizer = _trained_quantizer(backend, device)
    x = torch.randn(3, 8, 4, 5, device=device)
    first = quantizer(x)
    last = quantizer(x.permute(0, 2, 3, 1))
    assert torch.equal(first.indices, last.indices)
    assert torch.equal(first.quantized, last.quantized.permute(0, 3, 1, 2))
    assert torch.equal(last.quantized, quantizer.codebook[last.indices])
    assert torch.equal(quantizer.lookup(first.indices), last.quantized)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    _, sq_dist = reference.nearest_code(rows.double(), quantizer.codebook.double())
    chosen = (rows.double() - quantizer.codebook.double()[first.indices.reshape(-1)]).square().sum(1)
    torch.testing.assert_close(chosen, sq_dist, rtol=1e-6, atol=1e-6)  # a nearest code (random data: no ties)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_and_commitment_loss(backend, device):
    quantizer = _trained_quantizer(backend, device, commitment_weight=0.3)
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    out = quantizer(x)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), x, retain_graph=True)
    assert torch.equal(grad, upstream), "the straight-through gradient must reach the input unchanged"
    codes = quantizer.codebook[out.indices].permute(0, 3, 1, 2).double()
    expected = 0.3 * (x.double() - codes).square().mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-9)
    (grad,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(grad.double(), 0.3 * 2 * (x.double() - codes) / x.numel(), rtol=1e-5, atol=1e-9)
    assert quantizer.codebook.grad is None and not quantizer.codebook.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_input_keeps_fp32_state(backend, device):
    quantizer = VectorQuantizerEMA(32, 8, backend=backend).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 8, 4, 4, device=device, dtype=dtype)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = quantizer(x)
        assert out.quantized.dtype == dtype and out.loss.dtype == torch.float32
        assert all(b.dtype == torch.float32 for b in (quantizer.codebook, quantizer.book.embed_sum, quantizer.book.cluster_size))
        assert torch.isfinite(quantizer.codebook).all()
    quantizer.eval()
    out = quantizer(x)
    # Exactly the fp32 code, rounded once (x + (q - x).detach() would round twice).
    assert torch.equal(out.quantized, quantizer.codebook[out.indices].permute(0, 3, 1, 2).to(x.dtype))


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_first_training_batch_initialises_the_codebook(init, device):
    # kmeans_iters=0: the seeds themselves (Lloyd iterations would move them to means of rows).
    quantizer = VectorQuantizerEMA(16, 4, backend="torch", init=init, kmeans_iters=0, dead_code_threshold=0.0
                                   ).to(device)
    assert not quantizer.book.initialized
    x = torch.randn(64, 4, device=device)
    quantizer.eval()(x)
    assert not quantizer.book.initialized, "eval mode must not initialise"
    seen = {}
    quantizer.book.initialise_ = _spy(quantizer.book.initialise_, lambda: seen.setdefault("codes", quantizer.codebook.clone()))
    quantizer.train()(x)
    assert quantizer.book.initialized and quantizer.book.ema_steps == 1
    # Every code started as a distinct row of the batch, and the EMA state as `seed` copies of it.
    is_row = (seen["codes"][:, None, :] == x[None]).all(dim=-1)
    assert is_row.any(dim=1).all() and len({int(i) for i in is_row.float().argmax(dim=1)}) == 16


def _spy(method, after):
    def wrapped(*args, **kwargs):
        method(*args, **kwargs)
        after()
    return wrapped


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_on_the_codes_leaves_the_codebook_unchanged(backend, device):
    quantizer = VectorQuantizerEMA(16, 4, backend=backend).to(device)
    quantizer(torch.randn(16, 4, device=device))  # initialise
    before = quantizer.codebook.clone()
    quantizer(before.repeat(2, 1))  # every input sits exactly on its code
    torch.testing.assert_close(quantizer.codebook, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_runs_in_training_and_never_in_eval(backend, device):
    quantizer = VectorQuantizerEMA(32, 8, backend=backend).to(device)
    x = torch.randn(4, 8, 6, 6, device=device)
    quantizer(x)
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer(torch.randn_like(x))
    assert not torch.equal(state["codebook"], quantizer.codebook)
    quantizer.eval()
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    with torch.no_grad():
        quantizer(torch.randn_like(x))
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_follows_the_reference_update(backend, device):
    # Sonnet's constant-decay maths: without the warm-up and the moving frame, which test_codebook.py checks.
    quantizer = VectorQuantizerEMA(32, 8, decay=0.9, backend=backend, dead_code_threshold=0.0,
                                   ema_warmup=False, affine_reparam=False).to(device)
    quantizer(torch.randn(4, 8, 6, 6, device=device))
    state = tuple(t.clone() for t in (quantizer.book.cluster_size, quantizer.book.embed_sum, quantizer.codebook))
    x = torch.randn(4, 8, 6, 6, device=device)
    out = quantizer(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    counts = reference.ema_update_(rows, out.indices.reshape(-1), *state, 0.9, 1e-5)
    for got, want in zip((quantizer.book.cluster_size, quantizer.book.embed_sum, quantizer.codebook), state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probs = counts / counts.sum()
    expected = torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    torch.testing.assert_close(out.perplexity, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.usage, (counts > 0).float().mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_codes_are_reseeded_from_the_batch(backend, device):
    quantizer = VectorQuantizerEMA(8, 4, backend=backend, dead_code_threshold=1.0).to(device)
    x = torch.randn(64, 4, device=device)
    quantizer(x)
    quantizer.book.recent_count[[2, 5]] = 0.01  # two codes long unused
    quantizer.book.cluster_size[[2, 5]] = 0.01
    quantizer.codebook[[2, 5]] = 1e3  # and far from everything, so the batch cannot revive them
    out = quantizer(x)
    assert out.dead_codes.item() == 2
    seeded = torch.zeros(2, dtype=torch.bool, device=device)
    for _ in range(4):  # both draws may pick one row: one code per row, the other takes a row of the next step
        seeded |= (quantizer.codebook[[2, 5]][:, None, :] == x[None]).all(dim=-1).any(dim=-1)
        if seeded.all():
            break
        quantizer(x)
    assert seeded.all(), "dead codes must be re-seeded from batch rows"
    assert (quantizer.book.cluster_size >= 1.0).all()
    torch.testing.assert_close(quantizer.book.embed_sum[[2, 5]], quantizer.codebook[[2, 5]] * quantizer.book.cluster_size[[2, 5], None])


def test_backends_agree_over_training_steps(device):
    """Convergence: a few training steps with each backend give the same indices, losses and codebooks.

    The codes start on well-separated centres (and 4 far-off spares), so no nearest-code decision is close
    enough to a tie for rounding to split the two backends.
    """
    centres = torch.randn(12, 16, device=device) * 3
    start = torch.cat([centres, 100 + torch.randn(4, 16, device=device)])
    batches = [_clustered(4, 16, 6, 6, centres, device) for _ in range(4)]
    runs = {}
    for backend in BACKENDS:
        quantizer = VectorQuantizerEMA(16, 16, backend=backend).to(device)
        quantizer.load_state_dict({"codebook": start, "cluster_size": torch.full((16,), 4.0, device=device),
                                   "embed_sum": start * 4.0, "initialized": torch.tensor(True)})
        runs[backend] = [quantizer(x) for x in batches], quantizer
    (outs_t, q_t), (outs_k, q_k) = runs["torch"], runs["triton"]
    for a, b in zip(outs_t, outs_k):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.perplexity, b.perplexity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_t.codebook, q_k.codebook, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_t.book.cluster_size, q_k.book.cluster_size, rtol=1e-5, atol=1e-5)
    assert outs_t[-1].perplexity > 11, "all 12 centres in use"


def test_deterministic_triton_training_is_bit_identical(device):
    x = torch.randn(4, 8, 6, 6, device=device)
    codebooks = []
    for _ in range(2):
        torch.manual_seed(7)
        quantizer = VectorQuantizerEMA(16, 8, backend="triton", deterministic=True).to(device)
        for _ in range(3):
            quantizer(x)
        codebooks.append(quantizer.codebook.clone())
    assert torch.equal(*codebooks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend, device):
    quantizer = _trained_quantizer(backend, device)
    clone = VectorQuantizerEMA(32, 8, backend=backend).to(device)
    clone.load_state_dict(quantizer.state_dict())
    assert clone.book.initialized and clone.book._initialized
    x = torch.randn(2, 8, 4, 4, device=device)
    assert torch.equal(quantizer(x).quantized, clone.eval()(x).quantized)
    # Already initialised: the clone trains on from the loaded state (warm-up clock included) exactly as the
    # original does, instead of re-seeding its codebook.
    for module in (quantizer, clone):
        torch.manual_seed(3)
        module.train()(x)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, clone.state_dict()[name]), name


def test_extra_repr_shows_the_configuration():
    text = repr(VectorQuantizerEMA(64, 16, decay=0.9, backend="torch", precision="fast"))
    for part in ("num_codes=64", "dim=16", "decay=0.9", "commitment_weight=0.25", "backend='torch'",
                 "precision='fast'", "dead_code_threshold=1.0"):
        assert part in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_match_no_code_and_spare_the_codebook(backend, device):
    quantizer = VectorQuantizerEMA(16, 4, backend=backend).to(device)
    quantizer(torch.randn(64, 4, device=device))
    x = torch.randn(64, 4, device=device)
    x[5, 1] = float("nan")
    x[9, 0] = float("inf")
    out = quantizer(x)
    finite = torch.ones(64, dtype=torch.bool, device=device)
    finite[[5, 9]] = False
    assert (out.indices[~finite] == -1).all() and (out.indices[finite] >= 0).all()
    assert out.quantized[[5, 9]].isnan().all() and out.loss.isnan()
    for buffer in (quantizer.codebook, quantizer.book.embed_sum, quantizer.book.cluster_size):
        assert torch.isfinite(buffer).all(), "non-finite rows leaked into the EMA state"


def test_first_batch_with_nan_is_rejected_before_initialising(device):
    quantizer = VectorQuantizerEMA(16, 4, backend="torch").to(device)
    x = torch.randn(64, 4, device=device)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="first training batch holds NaN or inf"):
        quantizer(x)
    assert not quantizer.book.initialized


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_named_and_leave_the_state_alone(backend, device):
    quantizer = _trained_quantizer(backend, device).train()
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    cases = [
        (torch.randn(8, device=device), ValueError, r"x must have shape \(\.\.\., 8\)"),
        (torch.randn(2, 7, 4, 4, device=device), ValueError, r"x must have shape \(B, 8, H, W\) or \(\.\.\., 8\)"),
        (torch.randn(5, 9, device=device), ValueError, r"got \(5, 9\)"),
        (torch.randn(2, 8, 3, 8, device=device), ValueError, "pass layout='channels_first' or 'channels_last'"),
        (torch.randn(0, 8, device=device), ValueError, "x is empty"),
        (torch.randn(5, 8, device=device).double(), TypeError, "x has dtype torch.float64"),
        (torch.ones(5, 8, dtype=torch.int64, device=device), TypeError, "x has dtype torch.int64"),
        (torch.randn(5, 8, device="meta"), ValueError, "x is on meta but the codebook is on"),
        ([[0.0] * 8], TypeError, "x must be a torch.Tensor"),
    ]
    for x, error, match in cases:
        with pytest.raises(error, match=match):
            quantizer(x)
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())


def test_explicit_layout_resolves_the_ambiguous_shape(device):
    x = torch.randn(2, 8, 3, 8, device=device)
    first = VectorQuantizerEMA(16, 8, layout="channels_first").to(device)(x)
    last = VectorQuantizerEMA(16, 8, layout="channels_last").to(device)(x)
    assert first.indices.shape == (2, 3, 8) and last.indices.shape == (2, 8, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_codes": 0}, "num_codes must be an int >= 1, got 0"),
    ({"num_codes": 8.0}, "num_codes must be int, got float"),
    ({"dim": 2.5}, "dim and codebook_dim must be positive ints"),
    ({"codebook_dim": -2}, "codebook_dim must be an int >= 1"),
    ({"codebook_dim": "8"}, "codebook_dim must be int or None, got str"),
    ({"init": "kmeans"}, "init must be one of"),
    ({"restart_count": 0.0}, r"restart_count must be a float > 0\.0"),
    ({"affine_reparam": True, "cosine": True}, "affine_reparam and cosine exclude each other"),
    ({"decay": 1.0}, r"decay must be a float in \[0\.0, 1\.0\)"),
    ({"eps": -1.0}, r"eps must be a float > 0\.0"),
    ({"ema_warmup": 1}, "ema_warmup must be bool, got int"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"precision": "tf32"}, "precision must be one of"),
    ({"layout": "nhwc"}, "layout must be one of"),
    ({"dead_code_threshold": float("nan")}, "dead_code_threshold must be finite"),
])
def test_bad_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizerEMA(**{"num_codes": 8, "dim": 4, **kwargs})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [0.0, 0.99])
@pytest.mark.parametrize("empty", ["masked", "nan"])
def test_a_batch_with_no_usable_rows_leaves_the_state_exactly_as_it_was(backend, decay, empty, device):
    """Every position masked out, or every vector NaN: nothing to learn from, so no buffer changes, whatever the
    decay. With decay 0 this used to turn every code into NaN (0 / 0 in the Laplace smoothing)."""
    quantizer = VectorQuantizerEMA(64, 16, decay=decay, backend=backend, dead_code_threshold=2.0).to(device)
    quantizer(torch.randn(3, 16, 5, 5, device=device))
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    x = torch.randn(3, 16, 5, 5, device=device)
    if empty == "masked":
        out = quantizer(x, mask=torch.zeros(3, 5, 5, dtype=torch.bool, device=device))
    else:
        out = quantizer(torch.full_like(x, float("nan")))
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, state[name]), name
    # the codes left dead by the first batch (its rows all held by codes: none to re-seed from) stay as they were
    assert out.dead_codes.item() == int(quantizer.book.dead_codes().sum())
    assert torch.isfinite(quantizer(x).loss), "the next batch trains as usual"


def test_eval_searches_reuse_the_prepared_codebook_until_it_changes(device, monkeypatch):
    import kernels

    quantizer = _trained_quantizer("triton", device)
    calls = []
    real = kernels.prepare_codebook_op
    monkeypatch.setattr(kernels, "prepare_codebook_op", lambda codebook: calls.append(1) or real(codebook))
    x = torch.randn(40, 8, device=device)
    first = quantizer(x).indices
    assert torch.equal(quantizer(x).indices, first) and len(calls) == 1, "prepared once for two eval searches"
    with torch.no_grad():
        quantizer.codebook[first[0]] += 100.0  # a write to the codebook: the next search must see it
    again = quantizer(x).indices
    assert len(calls) == 2 and again[0] != first[0]
