"""`VectorQuantizerEMA`: a drop-in vector quantizer whose codebook learns by exponential moving averages.

Forward: each D-vector of the input is replaced by its nearest code (a straight-through estimator carries the
gradient to the input unchanged), and the encoder is pulled towards its codes by the commitment loss
    loss = commitment_weight * mean((x - sg[quantized])^2).
The codebook gets no gradient. In training mode it follows, by EMA, the mean of the vectors assigned to each code;
in eval mode it never changes. How it is seeded, warmed up and kept alive is `vqvae.codebook`'s part; how the input
is read, `vqvae.layout`'s; how ranks agree, `vqvae.sync`'s.

- Non-finite inputs: a vector holding NaN or inf matches no code. Its index is -1, its quantized vector is NaN
  (so the loss becomes NaN and the caller sees it), and it is left out of the EMA statistics and the restarts,
  so the codebook state stays intact.
- Masks: `forward(x, mask)` keeps padded positions out of the loss, the statistics and the restarts.
- Gradient accumulation: inside `with quantizer.accumulate():` the statistics of each micro-batch are summed,
  and the codebook takes one EMA step when the block ends.
- Backends: "triton" runs the fused kernels of `kernels`; "torch" runs `kernels.reference`, chunked PyTorch in
  fp32; "auto" picks Triton for CUDA inputs and PyTorch otherwise. `precision` ("exact" or "fast", see
  `kernels.nearest_code`) applies to the Triton search; the PyTorch search is always fp32.
- Saving: `save_pretrained(folder)` / `VectorQuantizerEMA.from_pretrained(folder or repo id)` write and read the
  constructor's arguments and the whole state (codebook and EMA buffers) as config.json and model.safetensors
  (`vqvae.hub`); `push_to_hub(repo_id)` uploads them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.codebook import BACKENDS, INITS, EMACodebook  # noqa: F401  (re-exported: the options' values)
from vqvae.hub import HubMixin
from vqvae.layout import LAYOUTS, from_rows, grid_shape, mask_rows, to_rows


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # same shape and dtype as the input; gradient flows straight through to the input
    indices: torch.Tensor  # int64 code grid: (B, *spatial) for channels-first input, (...) for channels-last
    loss: torch.Tensor  # commitment_weight * mean((x - sg[quantized])^2), fp32 scalar
    perplexity: torch.Tensor  # exp(entropy) of the batch's code usage, fp32 scalar
    usage: torch.Tensor  # fraction of codes that at least one vector of the batch chose, fp32 scalar
    dead_codes: torch.Tensor  # codes found dead (before their re-seeding), int64


class _StraightThrough(torch.autograd.Function):
    """Forward returns the codes exactly; backward hands the gradient to the input unchanged.

    (`x + (q - x).detach()` does the same with two roundings, which in half precision need not give back q.)
    """

    @staticmethod
    def forward(ctx, inputs, codes):
        return codes

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class VectorQuantizerEMA(EMACodebook, HubMixin):
    """Quantize (B, dim, *spatial) or (..., dim) tensors against `num_codes` EMA codes.

    The codebook options (see `vqvae.codebook`): `ema_warmup` (a decay that starts near 0 and reaches `decay`;
    `ema_warmup_steps` sets how slowly), `init` ("random" rows of the first training batch, or "kmeans++") and
    `kmeans_iters` (Lloyd iterations on that batch after the seeding), `affine_reparam` (codes kept in the frame of
    the data's running moments, so they follow its shifts and growth; None = on unless `cosine`),
    `dead_code_threshold` (EMA count, in rows per step, under which a code is dead and re-seeded; 0 = off),
    `restart_count` (the EMA count a re-seeded code starts with; None = its share of a step's rows).

    Where the search happens: `codebook_dim` (an int below `dim`) quantizes a learned linear projection of the input
    to that many features, and maps the code back with a second one (ViT-VQGAN's factorised codes: low-dimensional
    codes are used far more evenly); `cosine` l2-normalises the vectors searched and the codes, so the nearest code is
    the most similar in direction. Both run on the same kernels; the commitment loss is taken where the search is.
    """

    def __init__(self, num_codes: int = 4096, dim: int = 256, decay: float = 0.99, eps: float = 1e-5,
                 commitment_weight: float = 0.25, *, backend: str = "auto", precision: str = "exact",
                 ema_warmup: bool = True, ema_warmup_steps: int = 200, init: str = "random",
                 kmeans_iters: int = 10, affine_reparam: bool | None = None,
                 dead_code_threshold: float = 1.0, restart_count: float | None = None,
                 codebook_dim: int | None = None, cosine: bool = False, deterministic: bool = False,
                 layout: str = "auto"):
        if not (commitment_weight >= 0.0 and math.isfinite(commitment_weight)):
            raise ValueError(f"commitment_weight must be finite and >= 0, got {commitment_weight}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if codebook_dim is not None and not (isinstance(codebook_dim, int) and 1 <= codebook_dim):
            raise ValueError(f"codebook_dim must be a positive int or None, got {codebook_dim!r}")
        if affine_reparam is None:  # on, except for cosine codes, whose frame is the unit sphere
            affine_reparam = not cosine
        super().__init__(num_codes, codebook_dim or dim, decay=decay, eps=eps, ema_warmup=ema_warmup,
                         ema_warmup_steps=ema_warmup_steps, init=init, kmeans_iters=kmeans_iters,
                         affine_reparam=affine_reparam, cosine=cosine, dead_code_threshold=dead_code_threshold,
                         restart_count=restart_count, backend=backend,
                         precision=precision, deterministic=deterministic)
        self.dim, self.codebook_dim = dim, codebook_dim
        self.commitment_weight, self.layout = commitment_weight, layout
        if codebook_dim is not None:
            self.project_in = nn.Linear(dim, codebook_dim)
            self.project_out = nn.Linear(codebook_dim, dim)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, codebook_dim={self.codebook_dim}, "
                f"cosine={self.cosine}, decay={self.decay}, eps={self.eps}, "
                f"commitment_weight={self.commitment_weight}, backend={self.backend!r}, "
                f"precision={self.precision!r}, ema_warmup={self.ema_warmup}, "
                f"ema_warmup_steps={self.ema_warmup_steps}, init={self.init!r}, kmeans_iters={self.kmeans_iters}, "
                f"affine_reparam={self.affine_reparam}, dead_code_threshold={self.dead_code_threshold}, "
                f"restart_count={self.restart_count}, "
                f"deterministic={self.deterministic}, layout={self.layout!r}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize x, (B, dim, *spatial) or (..., dim). `mask` (bool, the shape of the code grid) marks the
        positions to learn from: False positions (padding) still get codes, but stay out of the commitment loss,
        the EMA statistics, the usage figures and the dead-code re-seeding."""
        rows, channels_first = to_rows(x, self.dim, self.layout, self.codebook.device)
        grid = grid_shape(x.shape, channels_first)
        keep = None if mask is None else mask_rows(mask, grid, self.codebook.device)
        # The codebook maths stays in fp32 whatever autocast says; the output takes the input's dtype.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            z = self._to_code_space(rows)
            if self.training and not self._initialized:
                self.initialise_(z.detach() if keep is None else z.detach()[keep])
            elif self.training and self.affine_reparam:
                self.follow_batch_(z.detach(), keep)
            indices = self.nearest(z.detach())
            matched = indices >= 0
            codes = F.embedding(indices.clamp(min=0), self.codebook)
            codes = torch.where(matched[:, None], codes, float("nan"))
            loss = self.commitment_weight * _masked_mse(z.float(), codes, keep)
            # -1 leaves a row out of the statistics: unmatched (non-finite) rows and masked-out positions.
            learn = matched if keep is None else matched & keep
            stats_indices = torch.where(learn, indices, -1)
            if self.training:
                counts, dead = self.learn_(z.detach(), stats_indices, learn)
            else:
                counts, dead = _bincount(stats_indices, self.num_codes), self.dead_codes()
            quantized = _StraightThrough.apply(z, codes.to(z.dtype))
            if self.codebook_dim is not None:
                quantized = self.project_out(quantized)
        return QuantizerOutput(
            quantized=from_rows(quantized.to(rows.dtype), x.shape, channels_first),
            indices=indices.reshape(grid),
            loss=loss,
            perplexity=perplexity(counts),
            usage=(counts > 0).float().mean(),
            dead_codes=dead.sum(),
        )

    def _to_code_space(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors searched: the rows as given, their projection to codebook_dim (fp32), l2-normalised for
        cosine codes."""
        z = rows if self.codebook_dim is None else self.project_in(rows.float())
        return F.normalize(z.float(), dim=-1) if self.cosine else z

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The vectors the quantizer outputs for a grid of code indices: float32, shape (*indices.shape, dim),
        channels-last (the codes themselves, or their projection back to dim)."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        codes = F.embedding(indices.long(), self.codebook)
        return codes if self.codebook_dim is None else self.project_out(codes)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution that `counts` (float [K]) describes; 1 for no counts at all."""
    probs = counts / counts.sum().clamp(min=1.0)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())


def _bincount(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-code counts (float32) of indices, leaving out negative ones. (torch.bincount sizes its output from
    the data, which costs a host sync on CUDA; a fixed-size index_add does not.)"""
    bins = torch.where(indices >= 0, indices, num_codes)
    counts = torch.zeros(num_codes + 1, dtype=torch.float32, device=indices.device)
    return counts.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float32))[:num_codes]


def _masked_mse(rows: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return F.mse_loss(rows, codes)
    # where, not a product: masked-out padding may hold anything, NaN included.
    squared = torch.where(keep[:, None], (rows - codes).square(), 0.0)
    return squared.sum() / (keep.sum() * rows.shape[1]).clamp(min=1)
