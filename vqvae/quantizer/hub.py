"""Save and load like the models of the Hugging Face Hub.

`module.save_pretrained(folder)` writes every parameter and buffer (a quantizer's codebook and EMA state included) to
`model.safetensors` and the constructor's arguments to `config.json`; `Class.from_pretrained(folder_or_repo_id)`
builds the module from `config.json` and loads the weights into it, in eval mode; `module.push_to_hub(repo_id)`
uploads both. huggingface_hub's `PyTorchModelHubMixin` does that work. What `HubMixin` adds:

- weights are read from safetensors only, never from a pickle (`pytorch_model.bin`, which the mixin falls back to);
- strictly by default: the file must hold every tensor of the module built from `config.json`, no other, each of
  its shape. Before anything is loaded the file's header is checked against the module, and a mismatch, a missing
  file or a file that is not safetensors is a `PretrainedError` that names the file and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"
CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
SHOWN = 6  # names listed per kind of mismatch before "and N more"
# What fetching from the Hub raises when the repo id is malformed, or the repo, the file or the network is missing
# (HTTP errors and a missing cached file are OSErrors).
HUB_ERRORS = (OSError, HFValidationError, EntryNotFoundError)


class PretrainedError(ValueError):
    pass


class HubMixin(PyTorchModelHubMixin, library_name="vqvae-triton", tags=["vector-quantization", "vq-vae"]):
    """`save_pretrained`, `from_pretrained` and `push_to_hub` for an nn.Module (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """Build the module from a folder written by `save_pretrained`, or from a Hub repo id; eval mode.
        Keyword arguments: those of huggingface_hub's `from_pretrained` (revision, cache_dir, token, ...),
        `map_location` ("cpu"), `strict` (True), and constructor arguments that override config.json's."""
        source = str(pretrained_model_name_or_path)
        if os.path.isfile(source):
            raise PretrainedError(f"{source} is a file; from_pretrained takes the folder that holds {CONFIG_NAME} "
                                  f"and {WEIGHTS_NAME} (as save_pretrained writes them), or a Hub repo id")
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, CONFIG_NAME)):
            raise PretrainedError(f"{os.path.join(source, CONFIG_NAME)} not found: a pretrained folder holds "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME}, as save_pretrained writes them")
        if os.path.isdir(source):
            return super().from_pretrained(source, **kwargs)
        try:
            return super().from_pretrained(source, **kwargs)
        except HUB_ERRORS as error:
            raise PretrainedError(f"{source!r} is no local folder, and the Hub gave no {CONFIG_NAME} and "
                                  f"{WEIGHTS_NAME} for it: {type(error).__name__}: {error}") from error

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download: bool, local_files_only: bool,
                         token, map_location: str = "cpu", strict: bool = True, **model_kwargs):
        config_file, weights_file = _locate(model_id, CONFIG_NAME), _locate(model_id, WEIGHTS_NAME)
        if not os.path.isdir(model_id):
            weights_file = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download, token=token,
                                           local_files_only=local_files_only)
        try:
            model = cls(**cls._constructor_arguments(model_kwargs, config_file))
        except (TypeError, ValueError) as error:
            raise PretrainedError(f"cannot build {cls.__name__} from {config_file}: {error}") from error
        load_weights(model, weights_file, config_file, strict)
        return model.to(map_location).eval()

    @classmethod
    def _constructor_arguments(cls, kwargs: dict, config_file: str) -> dict:
        """The constructor's arguments as read from config.json; a class whose arguments are not plain JSON
        values turns them back into their types here."""
        return kwargs


def _locate(model_id: str, filename: str) -> str:
    """The file's path in a local folder, or its name in a Hub repo (for messages)."""
    if os.path.isdir(model_id):
        return os.path.join(model_id, filename)
    return f"{filename} of Hub repo {model_id!r}"


def load_weights(model, weights_file: str, config_file: str = CONFIG_NAME, strict: bool = True) -> None:
    """Load a safetensors file into `model`, after checking its header against the model's tensors."""
    if not os.path.isfile(weights_file):
        raise PretrainedError(f"{weights_file} not found: save_pretrained writes the weights there")
    try:
        with safe_open(weights_file, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise PretrainedError(f"{weights_file} is not a safetensors file ({error})") from error
    problems = state_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, strict)
    if problems:
        raise PretrainedError(f"{weights_file} does not match the {type(model).__name__} that {config_file} "
                              f"describes: " + "; ".join(problems))
    safetensors.torch.load_model(model, weights_file, strict=strict)


def state_mismatches(expected: dict, found: dict, strict: bool = True) -> list[str]:
    """What differs between the tensor shapes a model expects and those a file holds, in words."""
    problems = [f"{key} is {list(found[key])} in the file but {list(shape)} in the model"
                for key, shape in expected.items() if key in found and found[key] != shape]
    if strict:
        missing = [key for key in expected if key not in found]
        unexpected = [key for key in found if key not in expected]
        if missing:
            problems.append(f"missing from the file: {_listing(missing)}")
        if unexpected:
            problems.append(f"in the file but not in the model: {_listing(unexpected)}")
    return problems


def _listing(names: list[str]) -> str:
    more = len(names) - SHOWN
    return ", ".join(names[:SHOWN]) + (f" and {more} more" if more > 0 else "")
