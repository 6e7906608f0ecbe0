"""LPIPS-VGG (vqvae/lpips.py): the weight files' layouts, the distance against an independent float64 formula, and
parity with lpips 0.1.4's own code on the same random weights."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vqvae.lpips import heads_file, load_lpips
from vqvae.weights import WeightsError, read_state

# torchvision's vgg16().features: the module indices of its 13 convolutions, and their widths
VGG16_CONVOLUTIONS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512,
                      26: 512, 28: 512}
RELU_AFTER = (2, 7, 14, 21, 28)  # the convolutions whose ReLUs LPIPS compares: relu1_2 ... relu5_3


def _images(n, height, width):
    """Smooth random images in [-1, 1] (noise averaged over 5 x 5), so that every layer sees structure."""
    noise = torch.rand(n, 3, height + 4, width + 4) * 2 - 1
    return (F.avg_pool2d(noise, 5, stride=1) * 2.5).clamp(-1, 1)


def test_the_trunk_reads_torchvisions_vgg16_keys_and_the_heads_ship_with_the_eval_extra(stand_in_weights):
    state = read_state(stand_in_weights["lpips"])
    expected = {f"features.{i}.{p}" for i in VGG16_CONVOLUTIONS for p in ("weight", "bias")}
    assert {k for k in state if k.startswith("features.")} == expected
    lpips = load_lpips(stand_in_weights["lpips"], heads_file())
    for i, width in VGG16_CONVOLUTIONS.items():
        assert torch.equal(lpips.features[i].weight, state[f"features.{i}.weight"]), i
        assert lpips.features[i].weight.shape[0] == width
    heads = read_state(heads_file())  # LPIPS v0.1's vgg.pth as torchmetrics ships it (CUDA tensors in the file)
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    for i in range(5):
        assert torch.equal(getattr(lpips, f"head{i}"), heads[f"lin{i}.model.1.weight"])
        assert (heads[f"lin{i}.model.1.weight"] >= 0).all()  # LPIPS's heads are non-negative


def test_the_heads_are_found_without_importing_torchmetrics_or_lpips():
    script = ("import sys; from vqvae.lpips import heads_file; path = heads_file(); "
              "assert path is not None and path.is_file(), path; "
              "assert 'torchmetrics' not in sys.modules and 'lpips' not in sys.modules; print(path)")
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().endswith("vgg.pth")


def test_a_renamed_missing_or_misshapen_key_is_an_error_naming_it_and_the_file(stand_in_weights, tmp_path):
    state = read_state(stand_in_weights["lpips"])
    renamed = dict(state)
    renamed["features.0.kernel"] = renamed.pop("features.0.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(WeightsError, match=r"renamed.pth: missing key\(s\) features.0.weight; unexpected key\(s\) "
                                           r"features.0.kernel"):
        load_lpips(tmp_path / "renamed.pth", heads_file())
    state["features.28.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "misshapen.pth")
    with pytest.raises(WeightsError, match=r"features.28.bias has shape \(7,\), expected \(512,\)"):
        load_lpips(tmp_path / "misshapen.pth", heads_file())
    heads = read_state(heads_file())
    heads["lin4.weight"] = heads.pop("lin4.model.1.weight")
    torch.save(heads, tmp_path / "heads.pth")
    with pytest.raises(WeightsError, match=r"heads.pth: missing key\(s\) lin4.model.1.weight"):
        load_lpips(stand_in_weights["lpips"], tmp_path / "heads.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="text.pth: not a state dict of tensors"):
        load_lpips(tmp_path / "text.pth", heads_file())


def _lpips_in_float64(state, heads, a, b):
    """LPIPS from its definition: scale the inputs, run the convolutions, at each tap divide every position's
    feature vector by its length (+1e-10), weight the squared differences per channel, average over positions,
    sum over taps."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(x):
        x, out = (x.double() - shift) / scale, []
        for i in range(29):
            if i in VGG16_CONVOLUTIONS:
                x = torch.relu(F.conv2d(x, state[f"features.{i}.weight"].double(), state[f"features.{i}.bias"].double(),
                                        padding=1))
                if i in RELU_AFTER:
                    out.append(x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + 1e-10))
            elif i in (4, 9, 16, 23):
                x = F.max_pool2d(x, 2)
        return out

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        weights = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += (weights * (fa - fb) ** 2).sum(dim=1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("height, width", [(32, 32), (37, 45)])
def test_lpips_equals_its_definition_in_float64(stand_in_weights, height, width):
    lpips = load_lpips(stand_in_weights["lpips"], heads_file())
    a, b = _images(3, height, width), _images(3, height, width)
    b[0] = a[0]  # an image against itself: 0
    ours = lpips(a, b)
    expected = _lpips_in_float64(read_state(stand_in_weights["lpips"]), read_state(heads_file()), a, b)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert ours[0] == 0 and (expected[1:] > 0).all()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"LPIPS compares two batches .* got \(3, 3, \d+, \d+\) and \(2, 3"):
        lpips(a, b[:2])


def test_lpips_equals_lpips_0_1_4_on_the_same_weights(stand_in_weights, reference_lpips):
    reference = reference_lpips.LPIPS(net="vgg", model_path=str(heads_file()), verbose=False)
    reference.net.load_vgg_features(read_state(stand_in_weights["lpips"]))
    ours = load_lpips(stand_in_weights["lpips"], heads_file())
    for height, width in ((64, 64), (33, 51)):
        a, b = _images(4, height, width), _images(4, height, width)
        with torch.no_grad():
            expected = reference(a, b).reshape(-1)
        assert (expected > 0).all()
        torch.testing.assert_close(ours(a, b), expected, rtol=0, atol=1e-6)
