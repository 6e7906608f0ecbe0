"""`VectorQuantizer`: a drop-in vector quantizer on the fused kernels, whose codebook learns by exponential moving
averages (the default), by gradient, or as SimVQ's learned map of a frozen base (`learning`, see
`vqvae.quantizer.learning`).

Forward: each D-vector of the input is replaced by its nearest code; the gradient reaches the input through a
straight-through estimator (unchanged) or the rotation trick (`rotation_trick`), and the encoder is pulled towards
its codes by the commitment loss
    loss = commitment_weight * mean((x - sg[quantized])^2)   (+ codebook_weight * mean((sg[x] - quantized)^2)
                                                              for learned codes: their only gradient).
EMA codes get no gradient: in training mode they follow, by EMA, the mean of the vectors assigned to each; in eval
mode they never change. How the codebook is seeded, warmed up and kept alive is `vqvae.quantizer.codebook`'s part;
how the input is read, `vqvae.quantizer.layout`'s; how ranks agree, `vqvae.quantizer.sync`'s.

- Non-finite inputs: a vector holding NaN or inf matches no code. Its index is -1, its quantized vector is NaN
  (so the loss becomes NaN and the caller sees it), and it is left out of the EMA statistics and the restarts,
  so the codebook state stays intact.
- Masks: `forward(x, mask)` keeps padded positions out of the loss, the statistics and the restarts.
- Gradient accumulation: inside `with quantizer.accumulate():` the statistics of each micro-batch are summed,
  and the codebook takes one EMA step when the block ends (learned codes: one optimizer step, as usual).
- Backends: "triton" runs the fused kernels of `kernels`; "torch" runs `vq_kernels.reference`, chunked PyTorch in
  fp32; "auto" picks Triton for CUDA inputs and PyTorch otherwise. `precision` ("exact" or "fast", see
  `vq_kernels.nearest_code`) applies to the Triton search; the PyTorch search is always fp32.
- Codes: `encode(x)` gives the indices without moving the codebook, `decode(indices)` the vectors the quantizer
  outputs for them (as the residual stack's methods of the same names).
- Saving: `save_pretrained(folder)` / `VectorQuantizer.from_pretrained(folder or repo id)` write and read the
  constructor's arguments and the whole state (codes, EMA buffers, learned parameters) as config.json and
  model.safetensors (`vqvae.quantizer.hub`); `push_to_hub(repo_id)` uploads them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.quantizer.backend import full_precision
from vqvae.quantizer.codebook import Codebook
from vqvae.quantizer.hub import HubMixin
from vqvae.quantizer.layout import from_rows, grid_shape, mask_rows, to_rows
from vqvae.quantizer.metrics import code_counts, perplexity
from vqvae.quantizer.options import QuantizerOptions


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # same shape and dtype as the input; gradient flows straight through to the input
    indices: torch.Tensor  # int64 code grid: (B, *spatial) for channels-first input, (...) for channels-last
    loss: torch.Tensor  # commitment_weight * mean((x - sg[quantized])^2), fp32 scalar
    perplexity: torch.Tensor  # exp(entropy) of the batch's code usage, fp32 scalar
    usage: torch.Tensor  # fraction of codes that at least one vector of the batch chose, fp32 scalar
    dead_codes: torch.Tensor  # codes found dead (before their re-seeding), int64

    def as_layers(self) -> ResidualQuantizerOutput:
        """The same figures as a one-layer residual stack reports them, so callers need not ask which it is."""
        return ResidualQuantizerOutput(self.quantized, self.indices[..., None], self.loss, self.loss[None],
                                       self.perplexity[None], self.usage[None], self.dead_codes[None])


class ResidualQuantizerOutput(NamedTuple):
    """The outputs of a residual stack (`vqvae.quantizer.residual`): per-layer figures on a last axis."""

    quantized: torch.Tensor  # the sum of the layers' codes, the input's shape and dtype; straight-through gradient
    indices: torch.Tensor  # int64 (*code grid, num_quantizers): layer l's code at [..., l]; -1 = no code
    loss: torch.Tensor  # the sum of the layers' commitment losses (each weighted by commitment_weight), fp32
    losses: torch.Tensor  # [num_quantizers] each layer's commitment loss, fp32
    perplexity: torch.Tensor  # [num_quantizers] exp(entropy) of each layer's code usage in the batch
    usage: torch.Tensor  # [num_quantizers] fraction of each layer's codes that the batch chose
    dead_codes: torch.Tensor  # [num_quantizers] int64 codes found dead in each layer's codebook (the shared one's)

    def as_layers(self) -> ResidualQuantizerOutput:
        return self


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


ROTATION_EPS = 1e-6  # the rotation trick's floor of a norm


class _RotationTrick(torch.autograd.Function):
    """The rotation trick (Fifty et al. 2024, arXiv 2410.06424): forward returns the codes exactly; backward hands
    the input the gradient of q = s R x, where R rotates the input's direction onto the code's and s = |q| / |x|,
    both held constant:
        g_x = s (g - 2 (g.w) w + 2 (g.q^) x^),   x^ = x / |x|,  q^ = q / |q|,  w = (x^ + q^) / |x^ + q^|.
    So the gradient keeps the angle it makes with the input's direction, as it is carried onto the code. Norms are
    floored at 1e-6 (vector-quantize-pytorch's `rotate_to` does the same); a row without a code (NaN) gets the
    gradient unchanged."""

    @staticmethod
    def forward(ctx, inputs, codes):
        ctx.save_for_backward(inputs, codes)
        return codes

    @staticmethod
    def backward(ctx, grad):
        inputs, codes = ctx.saved_tensors
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32  # half precision: in fp32
        inputs, codes, g = inputs.to(dtype), codes.to(dtype), grad.to(dtype)
        x_norm = inputs.norm(dim=-1, keepdim=True).clamp(min=ROTATION_EPS)
        q_norm = codes.norm(dim=-1, keepdim=True).clamp(min=ROTATION_EPS)
        x_dir, q_dir = inputs / x_norm, codes / q_norm
        w = F.normalize(x_dir + q_dir, dim=-1, eps=ROTATION_EPS)
        along_w, along_q = (g * w).sum(dim=-1, keepdim=True), (g * q_dir).sum(dim=-1, keepdim=True)
        rotated = (q_norm / x_norm) * (g - 2 * along_w * w + 2 * along_q * x_dir)
        return torch.where(torch.isfinite(codes).all(dim=-1, keepdim=True), rotated, g).to(grad.dtype), None


class VectorQuantizer(nn.Module, HubMixin):
    """Quantize (B, dim, *spatial) or (..., dim) tensors against `num_codes` codes (learned by EMA, by gradient
    or as SimVQ's map: `learning`).

    Every keyword argument is a field of `vqvae.quantizer.options.QuantizerOptions` (its meaning and range are
    written there), and positional ones after `dim` are its first fields (decay, eps, commitment_weight). The
    codebook with its rules is `self.codebook` (`vqvae.quantizer.codebook.Codebook`); its codes, [K, D], are
    `self.codebook.codes`.

    Where the search happens: `codebook_dim` (an int below `dim`) quantizes a learned linear projection of the input
    to that many features, and maps the code back with a second one (ViT-VQGAN's factorised codes: low-dimensional
    codes are used far more evenly); `cosine` l2-normalises the vectors searched and the codes, so the nearest code is
    the most similar in direction. Both run on the same kernels; the commitment loss is taken where the search is.
    """

    def __init__(self, num_codes: int = 4096, dim: int = 256, *args, **kwargs):
        super().__init__()
        self.options = options = QuantizerOptions(num_codes, *args, **kwargs)
        self.dim = dim
        self.codebook = Codebook(options.codebook_dim or dim, options)
        if options.codebook_dim is not None:
            self.project_in = nn.Linear(dim, options.codebook_dim)
            self.project_out = nn.Linear(options.codebook_dim, dim)
        # config.json of save_pretrained: every option written out, not only those passed.
        self._hub_mixin_config = {"dim": dim, **options.as_dict()}

    @property
    def num_codes(self) -> int:
        return self.options.num_codes

    def extra_repr(self) -> str:
        return f"dim={self.dim}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize x, (B, dim, *spatial) or (..., dim). `mask` (bool, the shape of the code grid) marks the
        positions to learn from: False positions (padding) still get codes, but stay out of the commitment loss,
        the EMA statistics, the usage figures and the dead-code re-seeding."""
        rows, channels_first = to_rows(x, self.dim, self.options.layout, self.codebook.codes.device)
        grid = grid_shape(x.shape, channels_first)
        keep = None if mask is None else mask_rows(mask, grid, self.codebook.codes.device)
        # The codebook maths stays in fp32 whatever autocast says; the output takes the input's dtype.
        with full_precision(rows.device):
            z = self._to_code_space(rows)
            if self.training:
                self.codebook.before_search_(z.detach(), keep)
            all_codes = self.codebook.refresh_()  # learned codes: with their autograd graph
            indices = self.codebook.nearest(z.detach())
            matched = indices >= 0
            codes = F.embedding(indices.clamp(min=0), all_codes)
            codes = torch.where(matched[:, None], codes, float("nan"))
            loss = self._loss(z.float(), codes, keep)
            # -1 leaves a row out of the statistics: unmatched (non-finite) rows and masked-out positions.
            stats_indices = indices if keep is None else torch.where(keep, indices, -1)
            if self.training:
                counts, dead = self.codebook.learn_(z.detach(), stats_indices)
            else:
                counts, dead = code_counts(stats_indices, self.num_codes), self.codebook.dead_codes()
            through = _RotationTrick if self.options.rotation_trick else _StraightThrough
            quantized = through.apply(z, codes.detach().to(z.dtype))
            if self.options.codebook_dim is not None:
                quantized = self.project_out(quantized)
        return QuantizerOutput(
            quantized=from_rows(quantized.to(rows.dtype), x.shape, channels_first),
            indices=indices.reshape(grid),
            loss=loss,
            perplexity=perplexity(counts),
            usage=(counts > 0).float().mean(),
            dead_codes=dead.sum(),
        )

    def _loss(self, z: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """commitment_weight * mean((z - sg[q])^2), plus, for learned codes, codebook_weight * mean((sg[z] - q)^2):
        the codes' only gradient."""
        loss = self.options.commitment_weight * _masked_mse(z, codes.detach(), keep)
        if self.codebook.learning.learned:
            loss = loss + self.options.codebook_weight * _masked_mse(z.detach(), codes, keep)
        return loss

    def _to_code_space(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors searched: the rows as given, their projection to codebook_dim (fp32), l2-normalised for
        cosine codes."""
        z = rows if self.options.codebook_dim is None else self.project_in(rows.float())
        return F.normalize(z.float(), dim=-1) if self.options.cosine else z

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The indices of x's nearest codes (int64, the code grid's shape); never moves the codebook."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(x).indices
        finally:
            self.train(was_training)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The vectors the quantizer outputs for a grid of code indices: float32, shape (*indices.shape, dim),
        channels-last (the codes themselves, or their projection back to dim)."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        codes = F.embedding(indices.long(), self.codebook.refresh_())
        return codes if self.options.codebook_dim is None else self.project_out(codes)

    def accumulate(self):
        """Gradient accumulation: see `vqvae.quantizer.codebook.Codebook.accumulate`."""
        return self.codebook.accumulate()

    def dead_codes(self) -> torch.Tensor:
        """Bool [K]: the codes whose EMA activity is under the dead threshold."""
        return self.codebook.dead_codes()

    def codebooks(self) -> list[Codebook]:
        """Every codebook, as a residual stack lists its own: this one's."""
        return [self.codebook]


def _masked_mse(rows: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return F.mse_loss(rows, codes)
    # where, not a product: masked-out padding may hold anything, NaN included.
    squared = torch.where(keep[:, None], (rows - codes).square(), 0.0)
    return squared.sum() / (keep.sum() * rows.shape[1]).clamp(min=1)

