"""The quantizer beyond one plain batch: masks, gradient accumulation, several processes, torch.compile."""

import faulthandler

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqvae.quantizer import VectorQuantizerEMA

K, D, STEPS, WORLD = 24, 8, 4, 2


def _fixed_start(quantizer, seed=0):
    """The same initialised state everywhere, so that runs differ only in how the data reaches the codebook."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=g)
    quantizer.load_state_dict({"codebook": codebook, "cluster_size": torch.full((K,), 3.0),
                               "embed_sum": codebook * 3.0, "initialized": torch.tensor(True)})
    return quantizer


def _batch(step, rank, rows=40):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1000 * step + rank))


# -- masks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_positions_stay_out_of_loss_and_statistics(backend, device):
    x = torch.randn(3, D, 4, 5, device=device)
    mask = torch.rand(3, 4, 5, device=device) > 0.4
    padded = torch.where(mask[:, None], x, torch.full_like(x, float("nan")))  # padding may hold anything
    q_masked = _fixed_start(VectorQuantizerEMA(K, D, backend=backend, dead_code_threshold=0.0).to(device))
    q_kept = _fixed_start(VectorQuantizerEMA(K, D, backend=backend, dead_code_threshold=0.0).to(device))
    out = q_masked(padded, mask=mask)
    kept_rows = x.permute(0, 2, 3, 1)[mask]  # only the real positions, as one batch
    ref = q_kept(kept_rows)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.perplexity, ref.perplexity)
    assert torch.equal(out.indices[mask], ref.indices)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(q_masked.book, name), getattr(q_kept.book, name), rtol=1e-6, atol=1e-6)


def test_bad_mask_is_named():
    quantizer = _fixed_start(VectorQuantizerEMA(K, D))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        quantizer(torch.randn(2, 5, D), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); it must match the code grid \(2, 5\)"):
        quantizer(torch.randn(2, 5, D), mask=torch.ones(2, 4, dtype=torch.bool))


# -- gradient accumulation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulated_micro_batches_make_one_ema_step(backend, device):
    # without the moving frame, which follows each micro-batch as it comes (the next test)
    micro = [_batch(0, r).to(device) for r in range(3)]
    options = dict(backend=backend, dead_code_threshold=0.0, affine_reparam=False)
    accumulated = _fixed_start(VectorQuantizerEMA(K, D, **options).to(device))
    whole = _fixed_start(VectorQuantizerEMA(K, D, **options).to(device))
    before = accumulated.codebook.clone()
    with accumulated.accumulate() as step:
        outs = [accumulated(x) for x in micro]
        assert torch.equal(accumulated.codebook, before), "the codebook must wait for the end of the block"
    ref = whole(torch.cat(micro))
    assert step.dead_codes == ref.dead_codes
    assert torch.equal(torch.cat([o.indices for o in outs]), ref.indices)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(accumulated.book, name), getattr(whole.book, name), rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_move_the_frame_each_but_average_once(device):
    """With affine_reparam the frame follows every micro-batch before it is searched (the codes move with it), but
    the EMA counts and sums take one step, when the block ends."""
    quantizer = _fixed_start(VectorQuantizerEMA(K, D, dead_code_threshold=0.0).to(device))
    quantizer(_batch(0, 0).to(device))  # measures the moments once
    sizes, steps = quantizer.book.cluster_size.clone(), quantizer.book.ema_steps.clone()
    with quantizer.accumulate():
        for rank in range(3):
            codes = quantizer.codebook.clone()
            quantizer(_batch(1, rank).to(device) * (2 + rank))
            assert not torch.equal(quantizer.codebook, codes), "the frame follows each micro-batch"
            assert torch.equal(quantizer.book.cluster_size, sizes) and torch.equal(quantizer.book.ema_steps, steps)
    assert quantizer.book.ema_steps == steps + 1 and not torch.equal(quantizer.book.cluster_size, sizes)


def test_accumulate_blocks_do_not_nest():
    quantizer = VectorQuantizerEMA(K, D)
    with quantizer.accumulate(), pytest.raises(RuntimeError, match="cannot be nested"):
        with quantizer.accumulate():
            pass


# -- several processes (gloo on the CPU) ---------------------------------------------------------------------

def _distributed_worker(rank, init_file, out_dir):
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test instead of the CI run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Re-seeding on: the restarts must agree across ranks too.
        torch.manual_seed(100 + rank)  # different random picks on each rank
        restarting = _fixed_start(VectorQuantizerEMA(K, D, backend="torch", dead_code_threshold=2.5))
        # Re-seeding off: must equal one process that sees both ranks' batches.
        plain = _fixed_start(VectorQuantizerEMA(K, D, backend="torch", dead_code_threshold=0.0))
        # Initialisation from data: every rank must end up with rank 0's codebook.
        fresh = VectorQuantizerEMA(K, D, backend="torch")
        for step in range(STEPS):
            restarting(_batch(step, rank))
            plain(_batch(step, rank))
            fresh(_batch(step, rank) * (rank + 1))
        torch.save({name: module.state_dict() for name, module in
                    (("restarting", restarting), ("plain", plain), ("fresh", fresh))}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("restarting", "plain", "fresh"):
        for key, value in states[0][name].items():
            assert torch.equal(value, states[1][name][key]), f"{name}.{key} differs between ranks"
    assert (states[0]["restarting"]["cluster_size"] >= 2.5).all(), "dead codes were re-seeded"

    single = _fixed_start(VectorQuantizerEMA(K, D, backend="torch", dead_code_threshold=0.0))
    for step in range(STEPS):
        single(torch.cat([_batch(step, r) for r in range(WORLD)]))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0]["plain"][key], value, rtol=1e-5, atol=1e-6)


def test_without_torch_distributed_nothing_is_synchronised():
    assert not dist.is_initialized()
    quantizer = _fixed_start(VectorQuantizerEMA(K, D, backend="torch"))
    quantizer(_batch(0, 0))  # would raise if it tried to all-reduce


# -- torch.compile -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_model_with_the_quantizer_compiles_without_graph_breaks(backend, device):
    """The torch backend on the CPU; the Triton backend on the GPU when there is one (else the interpreter)."""
    torch._dynamo.reset()
    device = device if backend == "triton" else "cpu"
    encoder = torch.nn.Conv2d(3, D, 3, padding=1).to(device)
    quantizer = VectorQuantizerEMA(K, D, backend=backend).to(device)
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
    quantizer = VectorQuantizerEMA(K, D, backend=backend).cuda()
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
