"""`bench.step_budget`: the quantizer's training step counted on the CPU (launches; bytes from the shapes alone on
the meta device). The issue of the step at device speed sets the budgets (<= 15 launches, <= 0.7 GB at the seed
shape); until they are met, today's counts are ratchets: a change may lower them, never raise them."""

import pytest
import torch

from bench import step_budget
from vqvae.quantizer.learning import LEARNING_MODES

# Today's counts (bench/RESULTS.md, "The quantizer's step, counted"); the budget in the comment.
LAUNCHES_TODAY = {"default": 170, "fast": 167, "deterministic": 187, "gradient": 119, "simvq": 128}  # budget 15
SEED_BYTES_TODAY = 2.41e9  # budget 0.7e9
OPTION_SETS = {"default": {}, "fast": {"precision": "fast"}, "deterministic": {"deterministic": True},
               "gradient": {"learning": "gradient"}, "simvq": {"learning": "simvq"}}


def test_the_launch_count_does_not_depend_on_the_shape_and_repeats_step_after_step():
    module = step_budget.warmed_up(37, 24, rows=300)
    x = torch.randn(1, 300, 24)
    upstream = torch.randn_like(x)
    first = step_budget.launches(lambda: step_budget.quantizer_step(module, x, upstream))
    second = step_budget.launches(lambda: step_budget.quantizer_step(module, x, upstream))
    assert first == second  # the same ops in the same order: what a CUDA graph would replay
    assert step_budget.count_launches(shape=(256, 64, 16)) == first
    # the codebook prepared, the exact search (pass, fallback, finish), the statistics, the EMA blend
    assert [op for op in first if op.endswith("(triton)")] == [
        "_prepare_kernel (triton)", "_exact_kernel (triton)", "_fallback_kernel (triton)", "_finish_kernel (triton)",
        "_code_stats_atomic_kernel (triton)", "_ema_blend_kernel (triton)"]


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_launches_a_step_never_grow(name):
    ops = step_budget.count_launches(**OPTION_SETS[name])
    assert len(ops) <= LAUNCHES_TODAY[name], ops


def test_views_allocations_and_copies_that_copy_nothing_are_not_launches():
    x = torch.randn(8, 4)
    ops = step_budget.launches(lambda: (x.view(4, 8).t().contiguous().to(torch.float32).reshape(-1) + 1).sum())
    assert ops == ["aten::clone", "aten::add", "aten::sum"]  # contiguous of a transposed view copies: one clone


def test_bytes_count_each_operand_and_result_once_and_views_not_at_all():
    a, b = torch.empty(1000, device="meta"), torch.empty(1000, device="meta")
    counter = step_budget.ByteCounter()
    with counter:
        c = a.view(10, 100).t() + b.view(100, 10)
        c.sum()
    assert counter.by_op == {"aten.add": 3 * 4000, "aten.sum": 4000 + 4}


def test_the_bytes_of_a_seed_shape_step_never_grow():
    counter = step_budget.bytes_moved(4096, 256, 65536)
    total = sum(counter.by_op.values())
    assert 0.3e9 < total <= SEED_BYTES_TODAY * 1.001, counter.by_op
    # the search's own operands, once: x (64 MiB) and the codebook's operand form, in; indices and distances out
    assert counter.by_op["vq_kernels.nearest_code_prepared"] >= 65536 * 256 * 4


@pytest.mark.parametrize("learning", LEARNING_MODES)
@pytest.mark.parametrize("options", [{}, {"precision": "fast", "deterministic": True}], ids=["default", "fast-det"])
def test_a_step_runs_on_the_meta_device_so_it_reads_nothing_back_and_has_no_data_dependent_shape(learning, options):
    counter = step_budget.bytes_moved(64, 16, 65536, learning=learning, **options)
    assert sum(counter.by_op.values()) > 65536 * 16 * 4


def test_a_residual_stack_runs_on_the_meta_device_too():
    counter = step_budget.bytes_moved(64, 16, 4096, layers=3)
    assert sum(counter.by_op.values()) > 3 * 4096 * 16 * 4
