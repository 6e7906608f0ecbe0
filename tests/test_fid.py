"""rFID (vqvae/fid.py): TensorFlow 1's resize, the Frechet distance against scipy, the Inception's key layout and
features against torch-fidelity 0.4.0's own code on the same random weights, and the distance end to end."""

import numpy as np
import pytest
import scipy.linalg
import torch

from vqvae.fid import (
    FEATURES,
    FeatureMoments,
    FIDInception,
    FrechetMeter,
    frechet_distance,
    load_inception,
    resize_like_tf1,
)
from vqvae.weights import WeightsError, read_state


def _resize_by_loops(image: np.ndarray, size: int) -> np.ndarray:
    """TF 1's resize_bilinear (align_corners=False, no half-pixel centres) pixel by pixel in float64: output (i, j)
    samples the input at (i * H / size, j * W / size), the neighbour below and to the right clamped to the edge."""
    height, width = image.shape[-2:]
    out = np.zeros(image.shape[:-2] + (size, size))
    for i in range(size):
        y = i * height / size
        y0, fy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, height - 1)
        for j in range(size):
            x = j * width / size
            x0, fx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, width - 1)
            top = image[..., y0, x0] * (1 - fx) + image[..., y0, x1] * fx
            bottom = image[..., y1, x0] * (1 - fx) + image[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("height, width, size", [(5, 7, 11), (13, 3, 4), (1, 1, 3), (6, 6, 6)])
def test_the_resize_is_tensorflow_1s(height, width, size):
    images = torch.randint(0, 256, (2, 3, height, width)).float()
    ours = resize_like_tf1(images, size)
    expected = _resize_by_loops(images.double().numpy(), size)
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=0, atol=1e-3)
    if size == height == width:
        assert torch.equal(ours, images)


def test_the_resize_is_not_pytorchs_bilinear():
    # 2 -> 4 pixels: TF 1 samples 0, 0.5, 1, 1.5 (clamped); PyTorch samples -0.25, 0.25, 0.75, 1.25
    row = torch.tensor([[[[0.0, 4.0]]]])
    assert resize_like_tf1(row.expand(1, 1, 2, 2), 4)[0, 0, 0].tolist() == [0.0, 2.0, 4.0, 4.0]
    torch_bilinear = torch.nn.functional.interpolate(row.expand(1, 1, 2, 2), size=4, mode="bilinear")
    assert torch_bilinear[0, 0, 0].tolist() == [0.0, 1.0, 3.0, 4.0]


def test_the_resize_equals_torch_fidelitys(reference_inception_module):
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as theirs,
    )

    for height, width in ((64, 64), (37, 53), (300, 310)):
        images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8).float()
        expected = theirs(images, size=(299, 299), align_corners=False)
        torch.testing.assert_close(resize_like_tf1(images, 299), expected, rtol=0, atol=1e-4)


def _random_covariance(dim, rank, generator):
    factor = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    return factor @ factor.T / rank


@pytest.mark.parametrize("dim, rank", [(1, 1), (7, 7), (16, 5), (37, 37)])
def test_the_frechet_distance_equals_scipys_sqrtm(dim, rank):
    generator = torch.Generator().manual_seed(dim * 100 + rank)
    m1, m2 = torch.randn(dim, generator=generator, dtype=torch.float64), torch.randn(dim, generator=generator,
                                                                                         dtype=torch.float64)
    c1, c2 = _random_covariance(dim, rank, generator), _random_covariance(dim, dim, generator)
    root = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    expected = float(((m1 - m2) ** 2).sum() + c1.trace() + c2.trace() - 2 * np.trace(root).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0, abs=1e-8 * float(c1.trace()))


def test_the_moments_are_the_sets_mean_and_unbiased_covariance():
    features = torch.randn(41, 6, dtype=torch.float64) * 3 + 5
    moments = FeatureMoments(6)
    for chunk in features.split(10):
        moments.add(chunk.float())
    mean, cov = moments.mean_cov()
    torch.testing.assert_close(mean, features.float().double().mean(dim=0))
    torch.testing.assert_close(cov, torch.cov(features.float().double().T))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        one = FeatureMoments(6)
        one.add(features[:1])
        one.mean_cov()


def test_the_network_reads_torch_fidelitys_keys_and_equals_its_features(stand_in_weights, reference_inception_module):
    # torch-fidelity loads the file with strict=True into torchvision's key names: the file is laid out as theirs
    reference = reference_inception_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(stand_in_weights["rfid"]))
    ours = load_inception(stand_in_weights["rfid"])
    theirs_keys = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs_keys
    for height, width in ((64, 64), (37, 53)):
        images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8)
        with torch.no_grad():
            (expected,) = reference(images)
            features = ours(images)
        assert features.shape == (3, FEATURES) and features.std() > 0.01  # order one, as the file was drawn
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_the_network_takes_uint8_pixels_and_a_wrong_file_is_named(stand_in_weights, tmp_path):
    network = FIDInception()
    with pytest.raises(ValueError, match=r"uint8 RGB images .* got torch.float32 \(2, 3, 8, 8\)"):
        network(torch.zeros(2, 3, 8, 8))
    state = read_state(stand_in_weights["rfid"])
    state["Mixed_7c.branch_pool.conv.weight_renamed"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "inception.pth")
    with pytest.raises(WeightsError, match=r"inception.pth: missing key\(s\) Mixed_7c.branch_pool.conv.weight; "
                                           r"unexpected key\(s\) Mixed_7c.branch_pool.conv.weight_renamed"):
        load_inception(tmp_path / "inception.pth")


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(stand_in_weights):
    meter = FrechetMeter(load_inception(stand_in_weights["rfid"]))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    distances = []
    for noise in (0, 24, 96):
        meter.reset()
        noisy = (images.float() + noise * torch.randn(images.shape)).round().clamp(0, 255).to(torch.uint8)
        meter.update(images, noisy)
        distances.append(meter.compute())
    assert abs(distances[0]) < 1e-6 * distances[1]
    assert 0 < distances[1] < distances[2], distances
