"""Where new codes come from (vqvae/quantizer/seeding.py): k-means++ seeding and draws in proportion to weights."""

import torch
from vq_kernels import reference

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.seeding import draw_in_proportion, kmeans_plus_plus


def _clusters(num, dim, separation, device, generator=None):
    return torch.randn(num, dim, device=device, generator=generator) * separation


def test_kmeans_plus_plus_spreads_codes_over_separated_clusters(device):
    """16 far-apart clusters, one of them holding 80% of the rows: random rows put most codes in that one cluster;
    k-means++ puts one code in each."""
    centres = _clusters(16, 8, 50.0, device)
    counts = [400] + [7] * 15
    # Tight clusters: at a spread of 0.1 the covered clusters' D^2 weight left a cluster out in 12 of 4,000 draws
    # (k-means++ is a draw, not a guarantee); at 0.01, in none of 4,000.
    rows = torch.cat([centres[i] + 0.01 * torch.randn(n, 8, device=device) for i, n in enumerate(counts)])
    picks = kmeans_plus_plus(rows, 16)
    assert picks.shape == (16,) and len(set(picks.tolist())) == 16
    covered = reference.nearest_code(rows[picks], centres)[0]
    assert sorted(covered.tolist()) == list(range(16))
    for init, want_all in (("kmeans++", True), ("random", False)):
        quantizer = VectorQuantizer(16, 8, backend="torch", init=init).to(device)
        quantizer.codebook.initialise_(rows)
        reached = set(reference.nearest_code(quantizer.codebook.codes, centres)[0].tolist())
        assert (len(reached) == 16) == want_all, (init, len(reached))


def test_draws_in_proportion_never_pick_a_weightless_row(device):
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0], device=device)
    picks = draw_in_proportion(weights, 40000)
    share = torch.bincount(picks, minlength=5).float() / 40000
    assert share[[0, 2, 4]].sum().item() == 0.0
    assert abs(share[3].item() - 0.75) < 0.02, share
    assert draw_in_proportion(torch.zeros(7, device=device), 3).tolist() == [6, 6, 6]  # nothing to draw from


def test_kmeans_plus_plus_in_rounds_never_picks_a_row_twice(device):
    rows = torch.randn(1023, 5, device=device)
    picks = kmeans_plus_plus(rows, 300, rounds=7)
    assert len(set(picks.tolist())) == 300
    few = kmeans_plus_plus(rows[:37], 64)  # fewer rows than codes: every row, then repeats
    assert set(few.tolist()) == set(range(37)) and few.shape == (64,)
