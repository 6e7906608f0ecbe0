"""Pretrained weight files read strictly: a key that is missing, renamed, unexpected or of the wrong shape is an
error naming the key and the file. (The reference libraries load LPIPS's heads with `strict=False`, so a renamed key
there silently leaves a head at its random start; here it stops the evaluation.)"""

from __future__ import annotations

from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weights file that is not the network's."""


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save`d state dict, on the CPU (LPIPS's heads file holds CUDA tensors)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, a truncated one, or pickled objects beyond tensors
        raise WeightsError(f"{path}: not a state dict of tensors ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def check_keys(state: dict, expected: dict[str, torch.Size], path, unused_prefixes: tuple[str, ...] = ()) -> None:
    """`state` holds exactly the `expected` keys with their shapes, besides keys under `unused_prefixes` (parts of
    the published network that the metric does not run, e.g. VGG's classifier)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(unused_prefixes))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    problems = ([f"missing key(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
        ([f"unexpected key(s) {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"] if unexpected
         else []) + \
        [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k])}" for k in wrong[:6]]
    if problems:
        raise WeightsError(f"{path}: {'; '.join(problems)}")


def load_strictly(module: torch.nn.Module, path, unused_prefixes: tuple[str, ...] = (), prefix: str = "") -> None:
    """Load the file's tensors into `module`, whose keys are the file's less `prefix` (`check_keys`)."""
    state = read_state(path)
    own = {prefix + k: v for k, v in module.state_dict().items()}
    # BatchNorm's step counter is training bookkeeping that some converted files leave out
    expected = {k: v.shape for k, v in own.items() if not (k.endswith("num_batches_tracked") and k not in state)}
    check_keys(state, expected, path, unused_prefixes)
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k in own}, strict=False)
