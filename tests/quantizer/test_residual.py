"""ResidualVectorQuantizer: what each layer quantizes, the gradients, the shared codebook's one EMA step,
quantizer dropout, codes at any depth, masks, accumulation, several processes, non-finite input and bad
arguments."""

import faulthandler

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vq_kernels import reference

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.residual import ResidualQuantizerOutput, ResidualVectorQuantizer

BACKENDS = ["torch", "triton"]
DIM, CODES = 12, 24


def _stack(num_quantizers, backend="torch", device="cpu", **kwargs):
    """A stack initialised from one training batch, in eval mode."""
    stack = ResidualVectorQuantizer(num_quantizers, CODES, DIM, backend=backend, **kwargs).to(device)
    stack(torch.randn(5, 31, DIM, device=device))
    return stack.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_layer_takes_the_nearest_code_to_the_residual_the_layers_before_left(backend, device):
    stack = _stack(4, backend, device)
    x = torch.randn(3, DIM, 5, 7, device=device)
    out = stack(x)
    assert isinstance(out, ResidualQuantizerOutput)
    assert out.quantized.shape == x.shape and out.indices.shape == (3, 5, 7, 4) and out.indices.dtype == torch.int64
    assert out.losses.shape == out.perplexity.shape == out.usage.shape == out.dead_codes.shape == (4,)
    residual = x.permute(0, 2, 3, 1).double()
    for layer in range(4):
        codebook = stack.layer(layer).codebook.codes.double()
        _, best = reference.nearest_code(residual.reshape(-1, DIM), codebook)
        chosen = codebook[out.indices[..., layer]]
        chosen_dist = (residual - chosen).square().sum(-1).reshape(-1)
        torch.testing.assert_close(chosen_dist, best, rtol=1e-5, atol=1e-6)  # a nearest code (random data)
        torch.testing.assert_close(out.losses[layer].double(), 0.25 * (residual - chosen).square().mean(),
                                   rtol=1e-5, atol=1e-7)
        residual = residual - chosen
    total = sum(stack.layer(i).codebook.codes[out.indices[..., i]] for i in range(4))
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1), total, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, out.losses.sum())


def test_one_layer_is_the_single_quantizer():
    """The same RNG stream, the same data: a one-layer stack and VectorQuantizer keep the same state."""
    single, stack = VectorQuantizer(CODES, DIM, backend="torch"), ResidualVectorQuantizer(1, CODES, DIM,
                                                                                               backend="torch")
    seed = int(torch.randint(0, 2 ** 31, ()))
    for step in range(4):
        x = torch.randn(2, DIM, 3, 9)
        torch.manual_seed(seed + step)
        a = single(x)
        torch.manual_seed(seed + step)
        b = stack(x)
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices[..., 0])
        assert torch.equal(a.loss, b.loss) and torch.equal(a.perplexity, b.perplexity[0])
    for key, value in single.state_dict().items():
        assert torch.equal(value, stack.state_dict()[f"layers.0.{key}"]), key


def test_the_sum_passes_the_gradient_through_and_only_layer_one_commitment_reaches_the_input():
    stack = _stack(3, commitment_weight=0.3)
    x = torch.randn(4, 9, DIM, requires_grad=True)
    out = stack(x)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out.quantized * upstream).sum(), x, retain_graph=True)
    assert torch.equal(grad, upstream), "the summed output must hand the gradient to the input unchanged"
    (grad,) = torch.autograd.grad(out.loss, x)
    first = stack.layer(0).codebook.codes[out.indices[..., 0]]
    torch.testing.assert_close(grad, 0.3 * 2 * (x - first).detach() / x.numel(), rtol=1e-5, atol=1e-9)


def test_projected_layers_compose_their_jacobians_and_learn_from_the_output_gradient():
    """With projections layer l's straight-through Jacobian is A_l = W_out W_in, and the output's is
    I - (I - A_L)...(I - A_1): each residual is r - q, gradient included."""
    stack = _stack(3, codebook_dim=5).train()
    x = torch.randn(2, 7, DIM, requires_grad=True)
    upstream = torch.randn_like(x)
    (stack(x).quantized * upstream).sum().backward()
    through = torch.eye(DIM, dtype=torch.float64)
    for layer in stack.layers:
        jacobian = layer.project_out.weight.double() @ layer.project_in.weight.double()
        through = (torch.eye(DIM, dtype=torch.float64) - jacobian) @ through
        assert layer.project_out.weight.grad.abs().sum() > 0 and layer.project_in.weight.grad.abs().sum() > 0
    expected = upstream.double() @ (torch.eye(DIM, dtype=torch.float64) - through)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_codebook_takes_one_ema_step_with_every_layers_statistics(backend, device):
    stack = _stack(3, backend, device, shared_codebook=True, ema_warmup=False, affine_reparam=False,
                   dead_code_threshold=0.0, decay=0.8)
    assert len(stack.layers) == 1
    x = torch.randn(3, 11, DIM, device=device)
    found = stack(x)  # eval: the codes every layer finds against the codebook as it is
    shared = stack.layers[0]
    cluster_size, embed_sum, codebook = (t.clone() for t in (shared.codebook.cluster_size, shared.codebook.embed_sum, shared.codebook.codes))
    steps_before = int(shared.codebook.ema_steps)
    rows, indices = [], []
    residual = x.reshape(-1, DIM)
    for layer in range(3):
        picked = found.indices[..., layer].reshape(-1)
        rows.append(residual)
        indices.append(picked)
        residual = residual - codebook[picked]
    counts, sums = reference.code_stats(torch.cat(rows), torch.cat(indices), CODES)
    reference.ema_blend_(cluster_size, embed_sum, codebook, counts, sums, 0.8, shared.options.eps)
    out = stack.train()(x)
    assert torch.equal(out.indices, found.indices)
    assert int(shared.codebook.ema_steps) == steps_before + 1, "one EMA step for the three layers"
    torch.testing.assert_close(shared.codebook.cluster_size, cluster_size, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.codebook.codes, codebook, rtol=1e-5, atol=1e-5)
    assert out.dead_codes.shape == (3,) and bool((out.dead_codes == out.dead_codes[0]).all())


def test_layer_dropout_uses_a_prefix_of_the_layers_and_leaves_the_rest_alone():
    stack = _stack(5, layer_dropout=True, min_layers=2, dead_code_threshold=0.0).train()
    seen = set()
    for _ in range(40):
        before = [layer.codebook.codes.clone() for layer in stack.layers]
        out = stack(torch.randn(2, 13, DIM))
        used = int((out.indices[0, 0] >= 0).sum())
        seen.add(used)
        assert bool((out.indices[..., :used] >= 0).all()) and bool((out.indices[..., used:] == -1).all())
        assert bool((out.losses[used:] == 0).all()) and bool((out.losses[:used] > 0).all())
        assert bool((out.usage[used:] == 0).all()) and bool((out.perplexity[used:] == 1).all())
        for layer in range(5):
            moved = not torch.equal(before[layer], stack.layers[layer].codebook.codes)
            assert moved == (layer < used), (layer, used)
    assert seen == {2, 3, 4, 5}
    assert int((stack.eval()(torch.randn(3, DIM)).indices >= 0).sum()) == 15, "no dropout in eval mode"


def test_layer_dropout_draws_continue_from_a_saved_state():
    """A resumed run (or another process) draws the same numbers of layers as the uninterrupted one."""
    stack = ResidualVectorQuantizer(6, CODES, DIM, backend="torch", layer_dropout=True).train()
    for _ in range(int(torch.randint(1, 9, ()))):
        stack(torch.randn(7, DIM))
    copy = ResidualVectorQuantizer(6, CODES, DIM, backend="torch", layer_dropout=True).train()
    copy.load_state_dict(stack.state_dict())

    def layers_used(module):
        return [int((module(torch.randn(7, DIM)).indices[0] >= 0).sum()) for _ in range(12)]

    assert layers_used(copy) == layers_used(stack)


def test_encode_and_decode_at_any_depth():
    stack = _stack(4, codebook_dim=7)
    x = torch.randn(2, 5, 3, DIM)
    full = stack(x)
    for depth in range(1, 5):
        codes = stack.encode(x, depth)
        assert codes.shape == (2, 5, 3, depth) and torch.equal(codes, full.indices[..., :depth])
        expected = sum(stack.layer(i).decode(codes[..., i]) for i in range(depth))
        torch.testing.assert_close(stack.decode(codes), expected)
    torch.testing.assert_close(stack.decode(full.indices), full.quantized)
    dropped = full.indices.clone()
    dropped[..., 2:] = -1
    torch.testing.assert_close(stack.decode(dropped), stack.decode(full.indices[..., :2]))
    with pytest.raises(ValueError, match="5 layers on its last axis"):
        stack.decode(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[1, 4\]"):
        stack.encode(x, 0)


def test_masked_positions_stay_out_of_every_layers_statistics():
    kwargs = dict(dead_code_threshold=0.0, backend="torch")
    stack = ResidualVectorQuantizer(3, CODES, DIM, **kwargs).train()
    stack(torch.randn(60, DIM))
    twin = ResidualVectorQuantizer(3, CODES, DIM, **kwargs).train()
    twin.load_state_dict(stack.state_dict())
    x = torch.randn(4, 9, DIM)
    mask = torch.rand(4, 9) < 0.6
    x[~mask] = float("nan")  # padding may hold anything
    masked = stack(x, mask)
    kept = twin(x[mask])
    assert torch.equal(masked.indices[mask], kept.indices)
    torch.testing.assert_close(masked.losses, kept.losses)
    for a, b in zip(stack.layers, twin.layers):
        torch.testing.assert_close(a.codebook.codes, b.codebook.codes)
        assert torch.isfinite(a.codebook.codes).all()


@pytest.mark.parametrize("shared", [False, True])
def test_accumulate_takes_one_step_as_for_the_whole_batch(shared):
    # the frame (affine_reparam) follows each micro-batch on its own, so equality needs it off
    kwargs = dict(dead_code_threshold=0.0, backend="torch", shared_codebook=shared, affine_reparam=False)
    stack = ResidualVectorQuantizer(3, CODES, DIM, **kwargs).train()
    stack(torch.randn(50, DIM))
    twin = ResidualVectorQuantizer(3, CODES, DIM, **kwargs).train()
    twin.load_state_dict(stack.state_dict())
    first, second = torch.randn(17, DIM), torch.randn(6, DIM)
    with stack.accumulate() as step:
        a, b = stack(first), stack(second)
    whole = twin(torch.cat([first, second]))
    assert torch.equal(torch.cat([a.indices, b.indices]), whole.indices)
    for x, y in zip(stack.layers, twin.layers):
        torch.testing.assert_close(x.codebook.codes, y.codebook.codes)
        assert int(x.codebook.ema_steps) == int(y.codebook.ema_steps)
    assert step.dead_codes.shape == (3,)
    with pytest.raises(RuntimeError, match="cannot be nested"), stack.accumulate(), stack.accumulate():
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_vector_gets_no_code_at_any_layer(backend, device):
    stack = _stack(3, backend, device).train()
    x = torch.randn(2, 7, DIM, device=device)
    x[1, 3, 4] = float("nan")
    out = stack(x)
    assert bool((out.indices[1, 3] == -1).all()) and torch.isnan(out.quantized[1, 3]).all()
    assert bool((out.indices[0] >= 0).all()) and torch.isfinite(out.quantized[0]).all()
    assert all(torch.isfinite(layer.codebook.codes).all() for layer in stack.layers)


def test_half_precision_input_gives_half_precision_output_from_fp32_residuals():
    stack = _stack(3)
    x = torch.randn(3, 5, DIM).bfloat16()
    out = stack(x)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.quantized, stack.decode(out.indices).bfloat16())
    assert torch.equal(out.indices, stack(x.float()).indices)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_quantizers=0), "num_quantizers must be an int >= 1"),
    (dict(num_quantizers=3, min_layers=4), r"min_layers must be at most num_quantizers=3"),
    (dict(num_quantizers=2, layout="nchw"), "layout must be one of"),
    (dict(num_quantizers=2, decay=1.5), r"decay must be a float in \[0\.0, 1\.0\)"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualVectorQuantizer(num_codes=CODES, dim=DIM, **kwargs)


DIST_STEPS = 6  # dropout's draws use 2, 1, 1, 1, 1, 3 layers: the third layer starts at the last step


def _rank_batch(step, rank, rows=30):
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(1000 * step + rank))


def _distributed_worker(rank, init_file, out_dir):
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test instead of the CI run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        start = torch.load(f"{out_dir}/start.pt")
        torch.manual_seed(100 + rank)  # each rank draws its own restart candidates and first-batch picks
        stacks = {
            "restarting": ResidualVectorQuantizer(3, CODES, DIM, backend="torch", dead_code_threshold=2.0,
                                                     layer_dropout=True),
            "shared": ResidualVectorQuantizer(3, CODES, DIM, backend="torch", shared_codebook=True),
            "plain": ResidualVectorQuantizer(3, CODES, DIM, backend="torch", dead_code_threshold=0.0),
        }
        stacks["plain"].load_state_dict(start)
        for step in range(DIST_STEPS):
            for stack in stacks.values():
                stack(_rank_batch(step, rank) * (rank + 1))
        torch.save({name: stack.state_dict() for name, stack in stacks.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_keep_identical_codebooks_in_every_layer(tmp_path):
    """Each layer all-reduces its own statistics; dropout draws the same layers on every rank."""
    start = ResidualVectorQuantizer(3, CODES, DIM, backend="torch", dead_code_threshold=0.0)
    start(torch.randn(60, DIM))
    torch.save(start.state_dict(), tmp_path / "start.pt")
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, state in states[0].items():
        for key, value in state.items():
            assert torch.equal(value, states[1][name][key]), f"{name}.{key} differs between ranks"
    # (a layer that dropout has not reached yet keeps its placeholder codes, which differ: the steps reach all)
    assert int(states[0]["restarting"]["dropout_draws"]) == DIST_STEPS
    assert all(bool(states[0]["restarting"][f"layers.{layer}.codebook.initialized"]) for layer in range(3))
    # From one state and without restarts, the two ranks make the steps of one process that sees both batches.
    single = ResidualVectorQuantizer(3, CODES, DIM, backend="torch", dead_code_threshold=0.0)
    single.load_state_dict(start.state_dict())
    for step in range(DIST_STEPS):
        single(torch.cat([_rank_batch(step, rank) * (rank + 1) for rank in range(2)]))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0]["plain"][key], value, rtol=1e-5, atol=1e-5, msg=key)
