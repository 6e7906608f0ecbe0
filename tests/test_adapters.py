"""The drop-in adapters, and parity with the real `vector-quantize-pytorch` package given the same state."""

import pytest
import torch

from vqvae.adapters import SonnetVectorQuantizerEMA, TamingVectorQuantizer, VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")

DIM, CODES = 16, 32


def _separated_codes():
    """Codes far apart, and inputs near them: no nearest-code decision is close to a tie."""
    return torch.randn(CODES, DIM) * 3


def _near(codes, *shape):
    picks = torch.randint(0, CODES, shape)
    return codes[picks] + 0.1 * torch.randn(*shape, DIM)


def _peer(codes, decay):
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=CODES, decay=decay, commitment_weight=0.25,
                              threshold_ema_dead_code=0, rotation_trick=False)
    with torch.no_grad():
        peer._codebook.embed.copy_(codes[None])
        peer._codebook.embed_avg.copy_(codes[None] * 2.0)
        peer._codebook.cluster_size.fill_(2.0)
    return peer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_with_vector_quantize_pytorch_over_training_steps(backend, device):
    codes = _separated_codes()
    peer = _peer(codes, decay=0.9).to(device).train()
    ours = VectorQuantize(DIM, CODES, decay=0.9, commitment_weight=0.25, backend=backend).to(device).train()
    ours.load_vector_quantize_pytorch_state(peer.state_dict())
    for _ in range(3):
        x = _near(codes, 4, 50).to(device)
        peer_quantized, peer_indices, peer_loss = peer(x)
        quantized, indices, loss = ours(x)
        assert torch.equal(indices, peer_indices)
        torch.testing.assert_close(quantized, peer_quantized, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.reshape(()), peer_loss.reshape(()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.codebook, peer._codebook.embed[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.quantizer.cluster_size, peer._codebook.cluster_size[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_with_vector_quantize_pytorch_when_dead_codes_restart(backend, device):
    """threshold_ema_dead_code=2: the same codes die at the same steps, restart with the package's count (the
    threshold), and the two stay in step afterwards. The restart vectors are random draws in both packages, so
    each step hands the package's draws to ours before comparing the next."""
    codes = _separated_codes()
    codes[20:] += 40.0  # 12 codes far from every input: they starve, die and restart
    peer = _peer(codes, decay=0.8)
    peer._codebook.threshold_ema_dead_code = 2.0
    peer._codebook.has_dead_code_replacement = True
    peer._codebook.reset_cluster_size = 2.0
    peer = peer.to(device).train()
    ours = VectorQuantize(DIM, CODES, decay=0.8, commitment_weight=0.25, threshold_ema_dead_code=2.0,
                          backend=backend).to(device).train()
    ours.load_vector_quantize_pytorch_state(peer.state_dict())
    restarted_any = False
    for _ in range(6):
        x = (codes[torch.randint(0, 20, (4, 60))] + 0.1 * torch.randn(4, 60, DIM)).to(device)
        size_before = peer._codebook.cluster_size[0].clone()
        peer_quantized, peer_indices, peer_loss = peer(x)
        quantized, indices, loss = ours(x)
        assert torch.equal(indices, peer_indices)
        torch.testing.assert_close(quantized, peer_quantized, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.reshape(()), peer_loss.reshape(()), rtol=1e-5, atol=1e-6)
        # Every count matches, the restarted codes' included (the package restarts a code with the threshold as
        # its count). The restarted codes, those whose blended count fell under 2, lie on batch rows in both.
        torch.testing.assert_close(ours.quantizer.cluster_size, peer._codebook.cluster_size[0], rtol=1e-5, atol=1e-5)
        counts = torch.bincount(peer_indices.reshape(-1), minlength=CODES).float()
        restarted = 0.8 * size_before + 0.2 * counts < 2.0
        restarted_any |= bool(restarted.any())
        on_rows = (ours.codebook[restarted][:, None] == x.reshape(-1, DIM)[None]).all(dim=-1).any(dim=1)
        assert on_rows.all() and bool((ours.quantizer.cluster_size[restarted] == 2.0).all())
        kept = ~restarted
        torch.testing.assert_close(ours.codebook[kept], peer._codebook.embed[0][kept], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.quantizer.embed_sum[kept], peer._codebook.embed_avg[0][kept], rtol=1e-5,
                                   atol=1e-5)
        with torch.no_grad():  # hand over the package's random draws, so the next step starts from one state
            ours.quantizer.codebook.copy_(peer._codebook.embed[0])
            ours.quantizer.embed_sum.copy_(peer._codebook.embed_avg[0])
    assert restarted_any, "the test should exercise restarts"


def test_parity_in_eval_and_with_image_feature_maps():
    codes = _separated_codes()
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=CODES, accept_image_fmap=True, rotation_trick=False)
    with torch.no_grad():
        peer._codebook.embed.copy_(codes[None])
    peer.eval()
    ours = VectorQuantize(DIM, CODES, accept_image_fmap=True).eval()
    ours.load_vector_quantize_pytorch_state(peer.state_dict())
    fmap = _near(codes, 2, 5, 6).permute(0, 3, 1, 2)
    peer_quantized, peer_indices, _ = peer(fmap)
    quantized, indices, _ = ours(fmap)
    assert indices.shape == (2, 5, 6) and torch.equal(indices, peer_indices)
    torch.testing.assert_close(quantized, peer_quantized)


def test_vector_quantize_masks_padding_like_the_package():
    codes = _separated_codes()
    ours = VectorQuantize(DIM, CODES)
    ours.load_vector_quantize_pytorch_state(_peer(codes, 0.8).state_dict())
    x = _near(codes, 2, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    quantized, indices, _ = ours(x, mask=mask)
    assert (indices[1, 4:] == -1).all() and (quantized[1, 4:] == 0).all() and (indices[mask] >= 0).all()


def test_taming_style_outputs():
    quantizer = TamingVectorQuantizer(n_e=CODES, e_dim=DIM, beta=0.25)
    z = torch.randn(2, DIM, 4, 3, requires_grad=True)
    z_q, loss, (perplexity, min_encodings, indices) = quantizer(z)
    assert z_q.shape == z.shape and indices.shape == (2 * 4 * 3,) and min_encodings is None
    assert loss.shape == () and perplexity > 1
    z_q, _, (_, _, indices) = quantizer.eval()(z)  # in eval the codebook holds still
    entry = quantizer.get_codebook_entry(indices, shape=(2, 4, 3, DIM))
    assert torch.equal(entry, z_q.detach())
    sane = TamingVectorQuantizer(n_e=CODES, e_dim=DIM, sane_index_shape=True)
    assert sane(z)[2][2].shape == (2, 4, 3)


def test_sonnet_style_outputs_and_is_training():
    quantizer = SonnetVectorQuantizerEMA(embedding_dim=DIM, num_embeddings=CODES, commitment_cost=0.25, decay=0.99)
    inputs = torch.randn(2, 4, 3, DIM)
    out = quantizer(inputs, is_training=True)
    assert set(out) == {"quantize", "loss", "perplexity", "encoding_indices"}
    assert out["quantize"].shape == inputs.shape and out["encoding_indices"].shape == (2, 4, 3)
    codebook = quantizer.quantizer.codebook.clone()
    quantizer(inputs, is_training=False)
    assert torch.equal(codebook, quantizer.quantizer.codebook), "is_training=False must not update the EMA"
    assert quantizer.training, "the module's own mode is restored after the call"


def test_foreign_state_with_several_codebooks_is_refused():
    ours = VectorQuantize(DIM, CODES)
    state = {"_codebook.embed": torch.zeros(2, CODES, DIM)}
    with pytest.raises(ValueError, match="single-codebook state"):
        ours.load_vector_quantize_pytorch_state(state)
