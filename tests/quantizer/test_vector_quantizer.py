"""VectorQuantizer as a model sees it: shapes, gradients, losses, train/eval, state, backends, bad input."""

import pytest
import torch
from vq_kernels import reference

from vqvae.quantizer import QuantizerOutput, VectorQuantizer

K, D = 24, 8


def _batch(step, rank, rows=40):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1000 * step + rank))


BACKENDS = ["torch", "triton"]


def _clustered(batch, dim, height, width, centres, device, noise=0.05):
    """Channels-first features drawn near a few centres, so that nearest codes are unambiguous."""
    picks = torch.randint(0, centres.shape[0], (batch, height, width), device=device)
    rows = centres[picks] + noise * torch.randn(batch, height, width, dim, device=device)
    return rows.permute(0, 3, 1, 2).contiguous()


def _trained_quantizer(backend, device, num_codes=32, dim=8, **kwargs):
    """A quantizer initialised from one training batch, then put in eval mode."""
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, **kwargs).to(device)
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
    assert torch.equal(last.quantized, quantizer.codebook.codes[last.indices])
    assert torch.equal(quantizer.decode(first.indices), last.quantized)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    _, sq_dist = reference.nearest_code(rows.double(), quantizer.codebook.codes.double())
    chosen = (rows.double() - quantizer.codebook.codes.double()[first.indices.reshape(-1)]).square().sum(1)
    torch.testing.assert_close(chosen, sq_dist, rtol=1e-6, atol=1e-6)  # a nearest code (random data: no ties)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_and_commitment_loss(backend, device):
    quantizer = _trained_quantizer(backend, device, commitment_weight=0.3)
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    out = quantizer(x)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), x, retain_graph=True)
    assert torch.equal(grad, upstream), "the straight-through gradient must reach the input unchanged"
    codes = quantizer.codebook.codes[out.indices].permute(0, 3, 1, 2).double()
    expected = 0.3 * (x.double() - codes).square().mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-9)
    (grad,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(grad.double(), 0.3 * 2 * (x.double() - codes) / x.numel(), rtol=1e-5, atol=1e-9)
    assert quantizer.codebook.codes.grad is None and not quantizer.codebook.codes.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_input_keeps_fp32_state(backend, device):
    quantizer = VectorQuantizer(32, 8, backend=backend).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 8, 4, 4, device=device, dtype=dtype)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = quantizer(x)
        assert out.quantized.dtype == dtype and out.loss.dtype == torch.float32
        assert all(b.dtype == torch.float32 for b in (quantizer.codebook.codes, quantizer.codebook.embed_sum, quantizer.codebook.cluster_size))
        assert torch.isfinite(quantizer.codebook.codes).all()
    quantizer.eval()
    out = quantizer(x)
    # Exactly the fp32 code, rounded once (x + (q - x).detach() would round twice).
    assert torch.equal(out.quantized, quantizer.codebook.codes[out.indices].permute(0, 3, 1, 2).to(x.dtype))


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_first_training_batch_initialises_the_codebook(init, device):
    # kmeans_init_iters=0: the seeds themselves (Lloyd iterations would move them to means of rows).
    quantizer = VectorQuantizer(16, 4, backend="torch", init=init, kmeans_init_iters=0, dead_code_threshold=0.0
                                   ).to(device)
    assert not quantizer.codebook.initialized
    x = torch.randn(64, 4, device=device)
    quantizer.eval()(x)
    assert not quantizer.codebook.initialized, "eval mode must not initialise"
    seen = {}
    quantizer.codebook.initialise_ = _spy(quantizer.codebook.initialise_, lambda: seen.setdefault("codes", quantizer.codebook.codes.clone()))
    quantizer.train()(x)
    assert quantizer.codebook.initialized and quantizer.codebook.ema_steps == 1
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
    quantizer = VectorQuantizer(16, 4, backend=backend).to(device)
    quantizer(torch.randn(16, 4, device=device))  # initialise
    before = quantizer.codebook.codes.clone()
    quantizer(before.repeat(2, 1))  # every input sits exactly on its code
    torch.testing.assert_close(quantizer.codebook.codes, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_runs_in_training_and_never_in_eval(backend, device):
    quantizer = VectorQuantizer(32, 8, backend=backend).to(device)
    x = torch.randn(4, 8, 6, 6, device=device)
    quantizer(x)
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer(torch.randn_like(x))
    assert not torch.equal(state["codebook.codes"], quantizer.codebook.codes)
    quantizer.eval()
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    with torch.no_grad():
        quantizer(torch.randn_like(x))
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_follows_the_reference_update(backend, device):
    # Sonnet's constant-decay maths: without the warm-up and the affine re-parameterisation (test_health.py).
    quantizer = VectorQuantizer(32, 8, decay=0.9, backend=backend, dead_code_threshold=0.0,
                                   ema_warmup=False, affine_reparam=False).to(device)
    quantizer(torch.randn(4, 8, 6, 6, device=device))
    state = tuple(t.clone() for t in (quantizer.codebook.cluster_size, quantizer.codebook.embed_sum, quantizer.codebook.codes))
    x = torch.randn(4, 8, 6, 6, device=device)
    out = quantizer(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    counts = reference.ema_update_(rows, out.indices.reshape(-1), *state, 0.9, 1e-5)
    for got, want in zip((quantizer.codebook.cluster_size, quantizer.codebook.embed_sum, quantizer.codebook.codes), state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probs = counts / counts.sum()
    expected = torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    torch.testing.assert_close(out.perplexity, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.usage, (counts > 0).float().mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_codes_are_reseeded_from_the_batch(backend, device):
    quantizer = VectorQuantizer(8, 4, backend=backend, dead_code_threshold=1.0).to(device)
    x = torch.randn(64, 4, device=device)
    quantizer(x)
    quantizer.codebook.recent_count[[2, 5]] = 0.01  # two codes long unused
    quantizer.codebook.cluster_size[[2, 5]] = 0.01
    quantizer.codebook.codes[[2, 5]] = 1e3  # and far from everything, so the batch cannot revive them
    out = quantizer(x)
    assert out.dead_codes.item() == 2
    seeded = torch.zeros(2, dtype=torch.bool, device=device)
    for _ in range(4):  # both draws may pick one row: one code per row, the other takes a row of the next step
        seeded |= (quantizer.codebook.codes[[2, 5]][:, None, :] == x[None]).all(dim=-1).any(dim=-1)
        if seeded.all():
            break
        quantizer(x)
    assert seeded.all(), "dead codes must be re-seeded from batch rows"
    assert (quantizer.codebook.cluster_size >= 1.0).all()
    torch.testing.assert_close(quantizer.codebook.embed_sum[[2, 5]], quantizer.codebook.codes[[2, 5]] * quantizer.codebook.cluster_size[[2, 5], None])


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
        quantizer = VectorQuantizer(16, 16, backend=backend).to(device)
        quantizer.codebook.take_over_({"codes": start, "cluster_size": torch.full((16,), 4.0, device=device),
                                       "embed_sum": start * 4.0, "initialized": torch.tensor(True)})
        runs[backend] = [quantizer(x) for x in batches], quantizer
    (outs_t, q_t), (outs_k, q_k) = runs["torch"], runs["triton"]
    for a, b in zip(outs_t, outs_k):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.perplexity, b.perplexity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_t.codebook.codes, q_k.codebook.codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_t.codebook.cluster_size, q_k.codebook.cluster_size, rtol=1e-5, atol=1e-5)
    # All 12 centres in use, each on a code of its own (the batch's perplexity over them is a draw: <= 11 in ~2.5% of
    # batches of 144 rows, where a centre is left out of one in ~25,000)
    assert len(set(outs_t[-1].indices.reshape(-1).tolist())) == 12


def test_deterministic_triton_training_is_bit_identical(device):
    x = torch.randn(4, 8, 6, 6, device=device)
    codebooks = []
    for _ in range(2):
        torch.manual_seed(7)
        quantizer = VectorQuantizer(16, 8, backend="triton", deterministic=True).to(device)
        for _ in range(3):
            quantizer(x)
        codebooks.append(quantizer.codebook.codes.clone())
    assert torch.equal(*codebooks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend, device):
    quantizer = _trained_quantizer(backend, device)
    clone = VectorQuantizer(32, 8, backend=backend).to(device)
    clone.load_state_dict(quantizer.state_dict())
    assert clone.codebook.initialized and clone.codebook._initialized
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
    text = repr(VectorQuantizer(64, 16, decay=0.9, backend="torch", precision="fast"))
    for part in ("num_codes=64", "dim=16", "decay=0.9", "commitment_weight=0.25", "backend='torch'",
                 "precision='fast'", "dead_code_threshold=1.0"):
        assert part in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_match_no_code_and_spare_the_codebook(backend, device):
    quantizer = VectorQuantizer(16, 4, backend=backend).to(device)
    quantizer(torch.randn(64, 4, device=device))
    x = torch.randn(64, 4, device=device)
    x[5, 1] = float("nan")
    x[9, 0] = float("inf")
    out = quantizer(x)
    finite = torch.ones(64, dtype=torch.bool, device=device)
    finite[[5, 9]] = False
    assert (out.indices[~finite] == -1).all() and (out.indices[finite] >= 0).all()
    assert out.quantized[[5, 9]].isnan().all() and out.loss.isnan()
    for buffer in (quantizer.codebook.codes, quantizer.codebook.embed_sum, quantizer.codebook.cluster_size):
        assert torch.isfinite(buffer).all(), "non-finite rows leaked into the EMA state"


def test_first_batch_with_nan_is_rejected_before_initialising(device):
    quantizer = VectorQuantizer(16, 4, backend="torch").to(device)
    x = torch.randn(64, 4, device=device)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="first training batch holds NaN or inf"):
        quantizer(x)
    assert not quantizer.codebook.initialized


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
    first = VectorQuantizer(16, 8, layout="channels_first").to(device)(x)
    last = VectorQuantizer(16, 8, layout="channels_last").to(device)(x)
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
        VectorQuantizer(**{"num_codes": 8, "dim": 4, **kwargs})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [0.0, 0.99])
@pytest.mark.parametrize("empty", ["masked", "nan"])
def test_a_batch_with_no_usable_rows_leaves_the_state_exactly_as_it_was(backend, decay, empty, device):
    """Every position masked out, or every vector NaN: nothing to learn from, so no buffer changes, whatever the
    decay. With decay 0 this used to turn every code into NaN (0 / 0 in the Laplace smoothing)."""
    quantizer = VectorQuantizer(64, 16, decay=decay, backend=backend, dead_code_threshold=2.0).to(device)
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
    assert out.dead_codes.item() == int(quantizer.codebook.dead_codes().sum())
    assert torch.isfinite(quantizer(x).loss), "the next batch trains as usual"


def test_eval_searches_reuse_the_prepared_codebook_until_it_changes(device, monkeypatch):
    import vq_kernels

    quantizer = _trained_quantizer("triton", device)
    calls = []
    real = vq_kernels.prepare_codebook_op
    monkeypatch.setattr(vq_kernels, "prepare_codebook_op", lambda codebook: calls.append(1) or real(codebook))
    x = torch.randn(40, 8, device=device)
    first = quantizer(x).indices
    assert torch.equal(quantizer(x).indices, first) and len(calls) == 1, "prepared once for two eval searches"
    with torch.no_grad():
        quantizer.codebook.codes[first[0]] += 100.0  # a write to the codebook: the next search must see it
    again = quantizer(x).indices
    assert len(calls) == 2 and again[0] != first[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_codes_stay_unit_and_the_nearest_is_the_most_similar(backend, device):
    quantizer = VectorQuantizer(32, 8, backend=backend, cosine=True).to(device)
    for _ in range(3):
        quantizer(torch.randn(40, 8, device=device) * 3 + 1)
    torch.testing.assert_close(quantizer.codebook.codes.norm(dim=1), torch.ones(32, device=device), rtol=1e-5, atol=1e-5)
    x = torch.randn(200, 8, device=device) * 5
    out = quantizer.eval()(x)
    cosine = torch.nn.functional.normalize(x.double(), dim=1) @ quantizer.codebook.codes.double().T
    chosen = cosine.gather(1, out.indices[:, None]).squeeze(1)
    assert (chosen >= cosine.max(dim=1).values - 1e-6).all()
    torch.testing.assert_close(out.quantized, quantizer.codebook.codes[out.indices])


@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_dim_quantizes_a_learned_projection(backend, device):
    quantizer = VectorQuantizer(16, 12, backend=backend, codebook_dim=3).to(device)
    x = torch.randn(2, 12, 5, 7, device=device, requires_grad=True)
    out = quantizer(x)
    assert quantizer.codebook.codes.shape == (16, 3) and out.quantized.shape == x.shape
    (out.quantized.square().sum() + out.loss).backward()
    for name in ("project_in.weight", "project_out.weight"):
        grad = dict(quantizer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        out = quantizer.eval()(x)  # eval: the codes the output came from are the codebook's current ones
        torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1), quantizer.decode(out.indices))
        z = quantizer.project_in(x.detach().permute(0, 2, 3, 1).reshape(-1, 12))
        _, sq_dist = reference.nearest_code(z.double(), quantizer.codebook.codes.double())
        chosen = (z.double() - quantizer.codebook.codes.double()[out.indices.reshape(-1)]).square().sum(dim=1)
    torch.testing.assert_close(chosen, sq_dist, rtol=1e-5, atol=1e-6)  # the search ran on the projection


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_positions_stay_out_of_loss_and_statistics(backend, device, fixed_start):
    x = torch.randn(3, D, 4, 5, device=device)
    mask = torch.rand(3, 4, 5, device=device) > 0.4
    padded = torch.where(mask[:, None], x, torch.full_like(x, float("nan")))  # padding may hold anything
    q_masked = fixed_start(VectorQuantizer(K, D, backend=backend, dead_code_threshold=0.0).to(device))
    q_kept = fixed_start(VectorQuantizer(K, D, backend=backend, dead_code_threshold=0.0).to(device))
    out = q_masked(padded, mask=mask)
    kept_rows = x.permute(0, 2, 3, 1)[mask]  # only the real positions, as one batch
    ref = q_kept(kept_rows)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.perplexity, ref.perplexity)
    assert torch.equal(out.indices[mask], ref.indices)
    for name in ("codes", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(q_masked.codebook, name), getattr(q_kept.codebook, name), rtol=1e-6, atol=1e-6)


def test_bad_mask_is_named(fixed_start):
    quantizer = fixed_start(VectorQuantizer(K, D))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        quantizer(torch.randn(2, 5, D), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); it must match the code grid \(2, 5\)"):
        quantizer(torch.randn(2, 5, D), mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_model_with_the_quantizer_compiles_without_graph_breaks(backend, device):
    """The torch backend on the CPU; the Triton backend on the GPU when there is one (else the interpreter)."""
    torch._dynamo.reset()
    device = device if backend == "triton" else "cpu"
    encoder = torch.nn.Conv2d(3, D, 3, padding=1).to(device)
    quantizer = VectorQuantizer(K, D, backend=backend).to(device)
    images = torch.randn(2, 3, 6, 5, device=device)

    def step(images):
        out = quantizer(encoder(images))
        return out.quantized.square().mean() + out.loss, out.indices

    step(images)  # the first training batch initialises the codebook (a one-off host read, kept eager)
    explanation = torch._dynamo.explain(step)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    eager_loss, eager_indices = step(images)
    quantizer.load_state_dict(state)
    compiled_loss, compiled_indices = torch.compile(step, fullgraph=True)(images)
    assert torch.equal(compiled_indices, eager_indices)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    compiled_loss.backward()
    assert encoder.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA notion; needs a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_training_step_never_waits_on_the_device(backend):
    """After the first batch (a one-off read), forward, EMA, re-seeding and backward make no host sync."""
    quantizer = VectorQuantizer(K, D, backend=backend).cuda()
    x = torch.randn(4, D, 6, 5, device="cuda", requires_grad=True)
    for _ in range(2):  # initialisation, and the autotuner's first run, may synchronise
        quantizer(x).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = quantizer(x)
        (out.quantized.square().mean() + out.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
