"""The codebook's figures (vqvae/quantizer/metrics.py): per-layer code counts without host syncs, perplexity, and
the usage window over the last steps."""

import math

import pytest
import torch

from vqvae.quantizer.metrics import (
    CodeUsage,
    code_counts,
    layer_code_counts,
    perplexity,
)


def test_layer_code_counts():
    indices = torch.tensor([[0, 2], [0, -1], [3, 2]])
    counts = layer_code_counts(indices, 4)
    assert torch.equal(counts, torch.tensor([[2.0, 0, 0, 1], [0, 0, 2, 0]]))


def test_window_figures_count_the_codes_of_the_last_steps_only():
    usage = CodeUsage(num_codes=6, window=3, device=torch.device("cpu"))
    steps = [[0, 0, 1], [2, -1], [3, 3, 3, 3], [4]]  # -1: a non-finite vector, no code
    seen = []
    for codes in steps:
        usage.update(torch.tensor(codes))
        seen.append((usage.totals().tolist(), usage.fraction().item(), usage.perplexity().item()))
        usage.advance()
    assert seen[2][0] == [2, 1, 1, 4, 0, 0]  # the first three steps
    assert seen[3][0] == [0, 0, 1, 4, 1, 0]  # the first step has left the window
    assert abs(seen[3][1] - 3 / 6) < 1e-7
    probs = torch.tensor([1, 4, 1]) / 6
    assert abs(seen[3][2] - torch.exp(-(probs * probs.log()).sum()).item()) < 1e-5


@pytest.mark.parametrize("k", [1, 7, 4096])
def test_perplexity_is_the_number_of_codes_used_evenly_and_one_for_a_single_code_or_none(k):
    assert math.isclose(perplexity(torch.full((k,), 3.0)).item(), k, rel_tol=1e-5)
    one = torch.zeros(k)
    one[k // 2] = 10.0
    assert perplexity(one).item() == pytest.approx(1.0)
    assert perplexity(torch.zeros(k)).item() == pytest.approx(1.0)
    batched = perplexity(torch.stack([torch.full((k,), 2.0), one]))  # one figure per row: per layer
    assert batched.shape == (2,) and batched[0].item() == pytest.approx(k, rel=1e-5)


def test_code_counts_leave_out_negative_indices_whatever_the_grid_shape():
    indices = torch.randint(-1, 5, (3, 4, 7))
    expected = torch.stack([(indices == c).sum() for c in range(5)]).float()
    assert torch.equal(code_counts(indices, 5), expected)
    assert code_counts(indices, 5, torch.int32).dtype == torch.int32
