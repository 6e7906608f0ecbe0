"""Saving and loading like Hub models: save_pretrained -> from_pretrained gives the same module bit for bit (the
VQ-VAE and the quantizers on their own), a folder whose weights do not fit its config or a file that is not
safetensors is refused by name, and `python -m vqvae.export` / `python -m vqvae.encode` work with such folders."""

import json

import numpy as np
import pytest
import torch

from vqvae.checkpoint import save_checkpoint
from vqvae.config import config_to_dict
from vqvae.encode import encode
from vqvae.export import main as export_main
from vqvae.model import VQVAE, build_model
from vqvae.quantizer.hub import PretrainedError


def _tiny_vqvae(tiny_config, tmp_path, layers=1, **quantizer):
    cfg = tiny_config(tmp_path / "run")
    cfg.quantizer.num_quantizers = layers
    for key, value in quantizer.items():
        setattr(cfg.quantizer, key, value)
    return build_model(cfg)


@pytest.mark.parametrize("layers, quantizer", [(1, {}), (3, {"shared_codebook": True}), (4, {"layer_dropout": True})])
def test_vqvae_round_trip_is_bit_identical(tmp_path, layers, quantizer, tiny_config, train_a_few_steps, assert_same_state):
    model = _tiny_vqvae(tiny_config, tmp_path, layers, **quantizer)
    images = torch.rand(3, 3, 24, 36) * 2 - 1  # odd batch, a non-square image
    train_a_few_steps(model, images)
    model.save_pretrained(tmp_path / "pretrained")
    assert {p.name for p in (tmp_path / "pretrained").iterdir()} >= {"model.safetensors", "config.json"}
    loaded = VQVAE.from_pretrained(tmp_path / "pretrained")
    assert not loaded.training and config_to_dict(loaded.config) == config_to_dict(model.config)
    assert_same_state(model, loaded)
    (recon, q), (recon2, q2) = model(images), loaded(images)
    assert torch.equal(recon, recon2) and torch.equal(q.indices, q2.indices) and torch.equal(q.loss, q2.loss)
    codes = model.encode(images)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    # the training state came along too: a training step from either gives the same codebook
    torch.manual_seed(5)
    model.train()(images)
    torch.manual_seed(5)
    loaded.train()(images)
    assert_same_state(model, loaded)


def test_weights_that_do_not_match_the_config_are_refused_by_name(tmp_path, tiny_config):
    folder = tmp_path / "pretrained"
    _tiny_vqvae(tiny_config, tmp_path).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantizer"]["num_codes"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError) as error:
        VQVAE.from_pretrained(folder)
    message = str(error.value)
    assert str(folder / "model.safetensors") in message and str(folder / "config.json") in message
    assert "quantizer.codebook.codes is [64, 16] in the file but [32, 16] in the model" in message

    config["quantizer"]["num_codes"], config["quantizer"]["num_quantizers"] = 64, 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"missing from the file: .*quantizer\.layers\.0\.codebook.* and \d+ "
                                              r"more; in the file but not in the model: .*quantizer\.codebook"):
        VQVAE.from_pretrained(folder)


def test_a_file_that_is_not_safetensors_is_refused_by_name(tmp_path, tiny_config):
    folder = tmp_path / "pretrained"
    model = _tiny_vqvae(tiny_config, tmp_path)
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "model.safetensors")  # a pickle under the safetensors name
    with pytest.raises(PretrainedError, match=f"{folder / 'model.safetensors'} is not a safetensors file"):
        VQVAE.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match=f"{folder / 'model.safetensors'} not found"):
        VQVAE.from_pretrained(folder)


def test_a_bad_config_or_source_is_refused_by_name(tmp_path, monkeypatch, tiny_config):
    folder = tmp_path / "pretrained"
    _tiny_vqvae(tiny_config, tmp_path).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantizer"]["decay"] = 2.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=f"cannot build VQVAE from {folder / 'config.json'}: "
                                              r"quantizer.decay must be a float in \[0\.0, 1\.0\)"):
        VQVAE.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(PretrainedError, match=f"{folder / 'config.json'} not found"):
        VQVAE.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="is a file; from_pretrained takes the folder"):
        VQVAE.from_pretrained(folder / "model.safetensors")
    import huggingface_hub.constants  # noqa: PLC0415
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    with pytest.raises(PretrainedError, match="'someone/no-such-tokenizer' is no local folder"):
        VQVAE.from_pretrained("someone/no-such-tokenizer")


def test_export_then_encode_from_the_folder_gives_the_checkpoints_codes(tmp_path, tiny_config, train_a_few_steps, assert_same_state):
    cfg = tiny_config(tmp_path / "run")
    cfg.quantizer.num_quantizers = 2
    model = build_model(cfg)
    train_a_few_steps(model, torch.rand(4, 3, 32, 32) * 2 - 1)
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config_to_dict(cfg), "step": 7})
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "pretrained")])
    assert_same_state(model, VQVAE.from_pretrained(tmp_path / "pretrained"))

    from_checkpoint = encode(checkpoint, tmp_path / "a", batch_size=5, num_recon=2)
    from_folder = encode(tmp_path / "pretrained", tmp_path / "b", batch_size=5, num_recon=2)
    assert from_checkpoint["step"] == 7 and from_folder["step"] is None
    assert np.array_equal(np.load(tmp_path / "a" / "codes_val.npy"), np.load(tmp_path / "b" / "codes_val.npy"))
    with pytest.raises(Exception, match=r"model\.\* cannot be overridden for the pretrained model"):
        encode(tmp_path / "pretrained", tmp_path / "c", overrides=["model.embedding_dim=8"])

