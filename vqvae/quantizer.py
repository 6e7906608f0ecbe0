"""`VectorQuantizerEMA`: a drop-in vector quantizer whose codebook learns by exponential moving averages.

Forward: each D-vector of the input is replaced by its nearest code (a straight-through estimator carries the
gradient to the input unchanged), and the encoder is pulled towards its codes by the commitment loss
    loss = commitment_weight * mean((x - sg[quantized])^2).
The codebook gets no gradient. In training mode it follows, by EMA, the mean of the vectors assigned to each code
(Sonnet's VectorQuantizerEMA maths, `kernels.reference.ema_blend_`); in eval mode it never changes.

- Initialisation: the first training batch seeds the codebook with randomly chosen input vectors, and the EMA
  state as if each code had already averaged `seed_count` copies of itself, so the first EMA steps move codes
  towards their data rather than shrinking them towards zero.
- Dead codes: a code whose EMA count falls below `dead_code_threshold` is re-seeded from a random input vector
  of the batch, with the same seed count. This runs on the device every step, with no host synchronisation.
- Non-finite inputs: a vector holding NaN or inf matches no code. Its index is -1, its quantized vector is NaN
  (so the loss becomes NaN and the caller sees it), and it is left out of the EMA statistics and the restarts,
  so the codebook state stays intact.
- Backends: "triton" runs the fused kernels of `kernels`; "torch" runs `kernels.reference`, chunked PyTorch in
  fp32; "auto" picks Triton for CUDA inputs and PyTorch otherwise. `precision` ("exact" or "fast", see
  `kernels.nearest_code`) applies to the Triton search; the PyTorch search is always fp32.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference

BACKENDS = ("auto", "triton", "torch")
LAYOUTS = ("auto", "channels_first", "channels_last")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # same shape and dtype as the input; gradient flows straight through to the input
    indices: torch.Tensor  # int64 code grid: (B, *spatial) for channels-first input, (...) for channels-last
    loss: torch.Tensor  # commitment_weight * mean((x - sg[quantized])^2), fp32 scalar
    perplexity: torch.Tensor  # exp(entropy) of the batch's code usage, fp32 scalar
    usage: torch.Tensor  # fraction of codes that at least one vector of the batch chose, fp32 scalar
    dead_codes: torch.Tensor  # codes whose EMA count is under dead_code_threshold (before re-seeding), int64


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


class VectorQuantizerEMA(nn.Module):
    def __init__(self, num_codes: int = 4096, dim: int = 256, decay: float = 0.99, eps: float = 1e-5,
                 commitment_weight: float = 0.25, *, backend: str = "auto", precision: str = "exact",
                 dead_code_threshold: float = 1.0, deterministic: bool = False, layout: str = "auto"):
        super().__init__()
        _check_config(num_codes, dim, decay, eps, commitment_weight, backend, precision, dead_code_threshold, layout)
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.eps, self.commitment_weight = decay, eps, commitment_weight
        self.backend, self.precision, self.layout = backend, precision, layout
        self.dead_code_threshold, self.deterministic = dead_code_threshold, deterministic
        # Placeholder codes until the first training batch replaces them (see _init_from_batch).
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialized", torch.tensor(False))
        # A host-side copy of `initialized`, so that the common path never reads a device flag.
        self._initialized = False
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_initialized_flag())

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, eps={self.eps}, "
                f"commitment_weight={self.commitment_weight}, backend={self.backend!r}, "
                f"precision={self.precision!r}, dead_code_threshold={self.dead_code_threshold}, "
                f"deterministic={self.deterministic}, layout={self.layout!r}")

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        rows, channels_first = self._to_rows(x)
        # The codebook maths stays in fp32 whatever autocast says; the output takes the input's dtype.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            if self.training and not self._initialized:
                self._init_from_batch(rows.detach())
            indices, _ = self._search(rows.detach())
            matched = indices >= 0
            codes = F.embedding(indices.clamp(min=0), self.codebook)
            codes = torch.where(matched[:, None], codes, float("nan"))
            loss = self.commitment_weight * F.mse_loss(rows.float(), codes)
            if self.training:
                counts = self._ema_step(rows.detach(), indices)
                dead = self._restart_dead_codes(rows.detach(), matched)
            else:
                counts = _bincount(indices, self.num_codes)
                dead = self.cluster_size < self.dead_code_threshold
        quantized = _StraightThrough.apply(rows, codes.to(rows.dtype))
        return QuantizerOutput(
            quantized=_from_rows(quantized, x.shape, channels_first),
            indices=indices.reshape(_grid_shape(x.shape, channels_first)),
            loss=loss,
            perplexity=_perplexity(counts),
            usage=(counts > 0).float().mean(),
            dead_codes=dead.sum(),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (float32, shape (*indices.shape, dim), channels-last) for a grid of code indices."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        return F.embedding(indices.long(), self.codebook)

    # -- input layout --------------------------------------------------------------------------------------

    def _to_rows(self, x: torch.Tensor):
        """(N, D) rows of x and whether x was channels-first; every check on x happens here."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != self.codebook.device:
            raise ValueError(f"x is on {x.device} but the codebook is on {self.codebook.device}; "
                             "move the quantizer or the input with .to()")
        if x.numel() == 0:
            raise ValueError(f"x is empty (shape {tuple(x.shape)})")
        channels_first = self._is_channels_first(x)
        if channels_first:
            return x.movedim(1, -1).reshape(-1, self.dim), True
        return x.reshape(-1, self.dim), False

    def _is_channels_first(self, x: torch.Tensor) -> bool:
        first = x.ndim >= 3 and x.shape[1] == self.dim
        last = x.ndim >= 2 and x.shape[-1] == self.dim
        if self.layout == "channels_first":
            if not first:
                raise ValueError(f"layout='channels_first' needs x of shape (B, {self.dim}, ...), "
                                 f"got {tuple(x.shape)}")
            return True
        if self.layout == "channels_last" or x.ndim != 4:
            if not last:
                raise ValueError(f"x must have shape (..., {self.dim}) or (B, {self.dim}, H, W), "
                                 f"got {tuple(x.shape)}")
            return False
        if first and last:
            raise ValueError(f"x of shape {tuple(x.shape)} has dim={self.dim} both at position 1 and last; "
                             "pass layout='channels_first' or 'channels_last' to the quantizer")
        if not (first or last):
            raise ValueError(f"x must have shape (B, {self.dim}, H, W) or (..., {self.dim}), got {tuple(x.shape)}")
        return first

    # -- the three steps ------------------------------------------------------------------------------------

    def _use_triton(self, rows: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and rows.is_cuda)

    def _search(self, rows: torch.Tensor):
        if not self._use_triton(rows):
            return reference.nearest_code(rows, self.codebook)
        if self.precision == "exact":  # exact against the fp32 codebook, so the rows come up to fp32
            return kernels.nearest_code(rows.float(), self.codebook, "exact")
        return kernels.nearest_code(rows, self.codebook.to(rows.dtype), "fast")

    @torch.no_grad()
    def _ema_step(self, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        state = (self.cluster_size, self.embed_sum, self.codebook)
        if not self._use_triton(rows):
            return reference.ema_update_(rows, indices, *state, self.decay, self.eps)
        return kernels.ema_update_(rows, indices, *state, self.decay, self.eps,
                                   deterministic=self.deterministic, validate_indices=False)

    @torch.no_grad()
    def _restart_dead_codes(self, rows: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        """Re-seed codes whose EMA count is under the threshold from random rows; returns the dead-code mask."""
        dead = self.cluster_size < self.dead_code_threshold
        if self.dead_code_threshold <= 0:
            return dead
        picks = torch.randint(rows.shape[0], (self.num_codes,), device=rows.device)
        reseed = dead & matched[picks]  # never from a non-finite row
        fresh = rows[picks].float()
        seed = self._seed_count(rows.shape[0])
        self.codebook.copy_(torch.where(reseed[:, None], fresh, self.codebook))
        self.embed_sum.copy_(torch.where(reseed[:, None], fresh * seed, self.embed_sum))
        self.cluster_size.copy_(torch.where(reseed, seed, self.cluster_size))
        return dead

    # -- initialisation -------------------------------------------------------------------------------------

    def _seed_count(self, batch_rows: int) -> float:
        """EMA count given to a fresh code: a batch's average share, and at least twice the dead threshold (so a
        fresh code is not dead on arrival) and 1 (so Laplace smoothing, eps-sized, does not shrink it)."""
        return max(batch_rows / self.num_codes, 2.0 * self.dead_code_threshold, 1.0)

    @torch.no_grad()
    def _init_from_batch(self, rows: torch.Tensor) -> None:
        # A one-off host read: seeding the codebook from NaN would corrupt it for good.
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("the first training batch holds NaN or inf; the codebook is initialised from it")
        n = rows.shape[0]
        if n >= self.num_codes:
            picks = torch.randperm(n, device=rows.device)[: self.num_codes]
        else:  # fewer vectors than codes: repeats are unavoidable; the duplicates die and are re-seeded later
            picks = torch.randint(n, (self.num_codes,), device=rows.device)
        codes = rows[picks].float()
        seed = self._seed_count(n)
        self.codebook.copy_(codes)
        self.cluster_size.fill_(seed)
        self.embed_sum.copy_(codes * seed)
        self.initialized.fill_(True)
        self._initialized = True

    def _sync_initialized_flag(self) -> None:
        self._initialized = bool(self.initialized)


def _check_config(num_codes, dim, decay, eps, commitment_weight, backend, precision, dead_code_threshold, layout):
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not eps > 0.0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not (commitment_weight >= 0.0 and math.isfinite(commitment_weight)):
        raise ValueError(f"commitment_weight must be finite and >= 0, got {commitment_weight}")
    if not (dead_code_threshold >= 0.0 and math.isfinite(dead_code_threshold)):
        raise ValueError(f"dead_code_threshold must be finite and >= 0, got {dead_code_threshold}")
    for name, value, allowed in (("backend", backend, BACKENDS), ("precision", precision, kernels.PRECISIONS),
                                 ("layout", layout, LAYOUTS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _grid_shape(shape: torch.Size, channels_first: bool) -> tuple[int, ...]:
    return (shape[0], *shape[2:]) if channels_first else tuple(shape[:-1])


def _from_rows(rows: torch.Tensor, shape: torch.Size, channels_first: bool) -> torch.Tensor:
    if channels_first:
        return rows.reshape(*_grid_shape(shape, True), shape[1]).movedim(-1, 1)
    return rows.reshape(shape)


def _bincount(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-code counts (float32) of indices, leaving out the -1 of non-finite rows without a host sync."""
    bins = torch.where(indices >= 0, indices, num_codes)
    return torch.bincount(bins, minlength=num_codes + 1)[:num_codes].float()


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    probs = counts / counts.sum().clamp(min=1.0)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
