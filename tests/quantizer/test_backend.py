"""Where the codebook's arithmetic runs (vqvae/quantizer/backend.py): the backend each name means on each device, and
the two backends keeping one contract (the kernels themselves: tests/kernels)."""

import pytest
import torch

from vqvae.quantizer.backend import TORCH, TritonBackend, pick_backend

BACKENDS = [TORCH, TritonBackend("exact", deterministic=True), TritonBackend("fast", deterministic=False)]


@pytest.mark.parametrize("name, device, expected", [
    ("auto", "cpu", "torch"), ("auto", "cuda", "triton"), ("torch", "cuda", "torch"), ("triton", "cpu", "triton"),
])
def test_each_name_means_one_backend_on_each_device(name, device, expected):
    backend = pick_backend(name, torch.device(device), "fast", True)
    assert backend.name == expected
    if expected == "triton":
        assert (backend.precision, backend.deterministic) == ("fast", True)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: getattr(b, "precision", b.name))
def test_every_backend_keeps_the_same_contract(backend, device):
    """On codes far apart (no near-ties), both give the same nearest codes, -1 for a non-finite row, statistics that
    leave index -1 out, and the same EMA step."""
    k, d = 11, 6
    codebook = torch.randn(k, d, device=device) * 4
    picks = torch.randint(0, k, (37,), device=device)
    rows = codebook[picks] + 0.05 * torch.randn(37, d, device=device)
    rows[5] = float("nan")
    indices = backend.nearest(rows, codebook, backend.prepare(codebook))
    assert indices.dtype == torch.int64 and indices[5] == -1
    keep = torch.arange(37, device=device) != 5
    assert torch.equal(indices[keep], picks[keep])
    counts, sums = backend.stats(rows, indices, k)
    ref_counts, ref_sums = TORCH.stats(rows[keep], picks[keep], k)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    state = [torch.rand(k, device=device) * 3, torch.randn(k, d, device=device), codebook.clone()]
    expected = [t.clone() for t in state]
    decay = torch.tensor(0.9, device=device)  # as the codebook passes it: a device scalar, no host read
    backend.blend_(*state, counts, sums, decay, 1e-5)
    TORCH.blend_(*expected, ref_counts, ref_sums, decay, 1e-5)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
