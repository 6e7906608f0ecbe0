"""The figures of a codebook: code counts, perplexity, and the usage window.

Every count here is a fixed-size index_add into an extra bin that is then dropped (the bin of index -1, "no code"):
torch.bincount sizes its output from the data, and filtering by a mask reads the device; both are host syncs on
CUDA, which a training step must not make.
"""

from __future__ import annotations

import torch


def code_counts(indices: torch.Tensor, num_codes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How often each code occurs in `indices` (any shape), [num_codes]; negative indices count for none."""
    return layer_code_counts(indices.reshape(-1, 1), num_codes, dtype)[0]


def layer_code_counts(indices: torch.Tensor, num_codes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How often each layer chose each code: [layers, num_codes] from indices (..., layers); -1 counts for none."""
    layers = indices.shape[-1]
    flat = indices.reshape(-1, layers)
    offsets = torch.arange(layers, device=indices.device) * (num_codes + 1)
    bins = torch.where(flat >= 0, flat, num_codes) + offsets  # each layer's row has a last, dropped bin
    counts = torch.zeros(layers * (num_codes + 1), dtype=dtype, device=indices.device)
    counts.index_add_(0, bins.reshape(-1), torch.ones(bins.numel(), dtype=dtype, device=indices.device))
    return counts.view(layers, num_codes + 1)[:, :num_codes]


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution that `counts` ([..., K]) describes, over the last axis; 1 for no
    counts at all."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1))


class CodeUsage:
    """How often each code was chosen in each of the last ``window`` steps (a ring of per-step counts on the
    device), for the windowed figures: the perplexity and the fraction of codes used over the window.

    The batch perplexity of one step can hide a slow collapse (or exaggerate one bad batch); the windowed one, over
    ``window`` x batch vectors, is the codebook's usage as a downstream model will see it.
    """

    def __init__(self, num_codes: int, window: int, device: torch.device):
        self.num_codes, self.window, self.step = num_codes, window, 0
        # int32: a step's count of a code is at most its rows (far under 2**31), and at 2**18 codes a window of 100
        # steps takes 100 MB, not 200.
        self.counts = torch.zeros(window, num_codes, dtype=torch.int32, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """Add a micro-batch's codes to the current step (-1, a non-finite vector, counts for no code)."""
        self.counts[self.step % self.window] += code_counts(indices, self.num_codes, torch.int32)

    def advance(self) -> None:
        self.step += 1
        self.counts[self.step % self.window].zero_()

    def totals(self) -> torch.Tensor:
        return self.counts.sum(dim=0)

    def fraction(self) -> torch.Tensor:
        return (self.totals() > 0).float().mean()

    def perplexity(self) -> torch.Tensor:
        return perplexity(self.totals().float())


def blend_counts_(running: torch.Tensor, counts: torch.Tensor, decay) -> None:
    """running <- decay * running + (1 - decay) * counts, in place: the EMA of per-code counts that the learning modes
    and the health rules keep. A batch without rows leaves it as it was (blending in nothing would only shrink it)."""
    running.copy_(torch.where(counts.sum() > 0, decay * running + (1.0 - decay) * counts, running))
