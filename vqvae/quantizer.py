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
- Masks: `forward(x, mask)` keeps padded positions out of the loss, the statistics and the restarts.
- Gradient accumulation: inside `with quantizer.accumulate():` the statistics of each micro-batch are summed,
  and the codebook takes one EMA step when the block ends.
- Several processes (torch.distributed initialised): every step all-reduces the per-code counts and sums (and
  the re-seed candidates) before the blend, so every rank keeps the same codebook; the first batch's
  initialisation is broadcast from rank 0. With torch.distributed not initialised nothing of this runs.
- Backends: "triton" runs the fused kernels of `kernels`; "torch" runs `kernels.reference`, chunked PyTorch in
  fp32; "auto" picks Triton for CUDA inputs and PyTorch otherwise. `precision` ("exact" or "fast", see
  `kernels.nearest_code`) applies to the Triton search; the PyTorch search is always fp32.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
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


@dataclass
class _PendingStats:
    """EMA statistics summed over the micro-batches of one optimizer step."""

    counts: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    candidate_ok: torch.Tensor | None = None
    dead_codes: torch.Tensor | None = None  # set when the block ends: codes found dead by its EMA step

    def add(self, counts, sums, candidates, candidate_ok) -> None:
        if self.counts is None:
            self.counts, self.sums, self.candidates, self.candidate_ok = counts, sums, candidates, candidate_ok
            return
        self.counts = self.counts + counts
        self.sums = self.sums + sums
        if candidates is not None:
            self.candidates = torch.where(candidate_ok[:, None], candidates, self.candidates)
            self.candidate_ok = self.candidate_ok | candidate_ok


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
        self._pending: _PendingStats | None = None  # statistics gathered inside accumulate()
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_initialized_flag())

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, eps={self.eps}, "
                f"commitment_weight={self.commitment_weight}, backend={self.backend!r}, "
                f"precision={self.precision!r}, dead_code_threshold={self.dead_code_threshold}, "
                f"deterministic={self.deterministic}, layout={self.layout!r}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize x, (B, dim, *spatial) or (..., dim). `mask` (bool, the shape of the code grid) marks the
        positions to learn from: False positions (padding) still get codes, but stay out of the commitment loss,
        the EMA statistics, the usage figures and the dead-code re-seeding."""
        rows, channels_first = self._to_rows(x)
        grid_shape = _grid_shape(x.shape, channels_first)
        keep = None if mask is None else self._mask_rows(mask, grid_shape)
        # The codebook maths stays in fp32 whatever autocast says; the output takes the input's dtype.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            if self.training and not self._initialized:
                self._init_from_batch(rows.detach() if keep is None else rows.detach()[keep])
            indices = self._search(rows.detach())
            matched = indices >= 0
            codes = F.embedding(indices.clamp(min=0), self.codebook)
            codes = torch.where(matched[:, None], codes, float("nan"))
            loss = self.commitment_weight * _masked_mse(rows.float(), codes, keep)
            # -1 leaves a row out of the statistics: unmatched (non-finite) rows and masked-out positions.
            learn = matched if keep is None else matched & keep
            stats_indices = torch.where(learn, indices, -1)
            if self.training:
                counts, dead = self._learn(rows.detach(), stats_indices, learn)
            else:
                counts, dead = _bincount(stats_indices, self.num_codes), self._dead_codes()
        quantized = _StraightThrough.apply(rows, codes.to(rows.dtype))
        return QuantizerOutput(
            quantized=_from_rows(quantized, x.shape, channels_first),
            indices=indices.reshape(grid_shape),
            loss=loss,
            perplexity=_perplexity(counts),
            usage=(counts > 0).float().mean(),
            dead_codes=dead.sum(),
        )

    @contextlib.contextmanager
    def accumulate(self):
        """Gradient accumulation: inside the block, training forwards only gather EMA statistics; on leaving it,
        the codebook takes one EMA step with the statistics of every micro-batch, as if they were one batch.

            with quantizer.accumulate() as step:
                for micro_batch in chunks:
                    model(micro_batch).loss.backward()
            optimizer.step()
            step.dead_codes   # codes found dead (and re-seeded) by that EMA step
        """
        if self._pending is not None:
            raise RuntimeError("quantizer.accumulate() blocks cannot be nested")
        pending = self._pending = _PendingStats()
        try:
            yield pending
        finally:
            self._pending = None
        if pending.counts is not None:
            with torch.no_grad(), torch.autocast(device_type=pending.counts.device.type, enabled=False):
                dead = self._commit(pending.counts, pending.sums, pending.candidates, pending.candidate_ok)
            pending.dead_codes = dead.sum()

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

    def _mask_rows(self, mask: torch.Tensor, grid_shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor, got {got}")
        if tuple(mask.shape) != tuple(grid_shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; it must match the code grid {tuple(grid_shape)}")
        if mask.device != self.codebook.device:
            raise ValueError(f"mask is on {mask.device} but the codebook is on {self.codebook.device}")
        return mask.reshape(-1)

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

    def _search(self, rows: torch.Tensor) -> torch.Tensor:
        if not self._use_triton(rows):
            return reference.nearest_code(rows, self.codebook)[0]
        if self.precision == "exact":  # exact against the fp32 codebook, so the rows come up to fp32
            return kernels.nearest_code_op(rows.float(), self.codebook, "exact")[0]
        return kernels.nearest_code_op(rows, self.codebook.to(rows.dtype), "fast")[0]

    @torch.no_grad()
    def _learn(self, rows: torch.Tensor, stats_indices: torch.Tensor, learn: torch.Tensor) -> torch.Tensor:
        """Gather this batch's statistics and re-seed candidates; blend them now or, inside accumulate(), later.
        Returns this batch's per-code counts and the codes found dead (before their re-seeding)."""
        if self._use_triton(rows):
            counts, sums = kernels.code_stats_op(rows, stats_indices, self.num_codes, self.deterministic)
        else:
            counts, sums = reference.code_stats(rows, stats_indices, self.num_codes)
        candidates, candidate_ok = self._reseed_candidates(rows, learn)
        if self._pending is not None:
            self._pending.add(counts, sums, candidates, candidate_ok)
            return counts, self._dead_codes()
        return counts, self._commit(counts, sums, candidates, candidate_ok)

    def _reseed_candidates(self, rows: torch.Tensor, learn: torch.Tensor):
        """One random row of the batch per code, and whether it may seed a code (finite and not masked out);
        (None, None) when re-seeding is off."""
        if self.dead_code_threshold <= 0:
            return None, None
        picks = torch.randint(rows.shape[0], (self.num_codes,), device=rows.device)
        return rows[picks].float(), learn[picks]

    def _dead_codes(self) -> torch.Tensor:
        return self.cluster_size < self.dead_code_threshold

    def _commit(self, counts, sums, candidates, candidate_ok) -> torch.Tensor:
        """One EMA step from summed statistics, then re-seed the dead codes. Across processes, the statistics and
        the candidates are summed first, so that every rank makes the same step and the same re-seeds.
        Returns the dead-code mask found before re-seeding."""
        counts, sums, candidates, candidate_ok = _sync_across_ranks(counts, sums, candidates, candidate_ok)
        state = (self.cluster_size, self.embed_sum, self.codebook)
        if self._use_triton(self.codebook):
            kernels.ema_blend_op(*state, counts, sums, torch.tensor(self.decay, device=counts.device), self.eps)
        else:
            reference.ema_blend_(*state, counts, sums, self.decay, self.eps)
        dead = self._dead_codes()
        self._restart_dead_codes(dead, candidates, candidate_ok, counts.sum())
        return dead

    def _restart_dead_codes(self, dead, candidates, candidate_ok, rows_in_step: torch.Tensor) -> None:
        """Re-seed dead codes from their candidate rows, on the device."""
        if candidates is None:
            return
        reseed = dead & candidate_ok
        seed = (rows_in_step / self.num_codes).clamp(min=self._seed_floor())  # a device scalar: no host sync
        self.codebook.copy_(torch.where(reseed[:, None], candidates, self.codebook))
        self.embed_sum.copy_(torch.where(reseed[:, None], candidates * seed, self.embed_sum))
        self.cluster_size.copy_(torch.where(reseed, seed, self.cluster_size))

    # -- initialisation -------------------------------------------------------------------------------------

    def _seed_floor(self) -> float:
        # At least twice the dead threshold, so a fresh code is not dead on arrival, and at least 1, so that Laplace
        # smoothing (eps-sized) does not shrink it.
        return max(2.0 * self.dead_code_threshold, 1.0)

    # A one-off step with a host read: left to eager mode, so torch.compile neither breaks its graph here nor
    # compiles code that runs once (inductor in torch 2.13 also fails on this graph when N == num_codes).
    @torch.compiler.disable
    @torch.no_grad()
    def _init_from_batch(self, rows: torch.Tensor) -> None:
        """Seed every code with a random input vector, and the EMA state as if each code had already averaged
        `seed` copies of itself: a step whose inputs sit on their codes then leaves the codebook unchanged."""
        # A one-off host read: seeding the codebook from NaN would corrupt it for good.
        if rows.shape[0] == 0 or not bool(torch.isfinite(rows).all()):
            raise ValueError("the first training batch holds NaN or inf (or masks out every position); "
                             "the codebook is initialised from it")
        n = rows.shape[0]
        if n >= self.num_codes:
            picks = torch.randperm(n, device=rows.device)[: self.num_codes]
        else:  # fewer vectors than codes: repeats are unavoidable; the duplicates die and are re-seeded later
            picks = torch.randint(n, (self.num_codes,), device=rows.device)
        codes = rows[picks].float()
        # A code's EMA count tends to its share of the rows of one step (all ranks together).
        seed = max(n * _world_size() / self.num_codes, self._seed_floor())
        self.codebook.copy_(codes)
        self.cluster_size.fill_(seed)
        self.embed_sum.copy_(codes * seed)
        _broadcast_from_rank0(self.codebook, self.cluster_size, self.embed_sum)
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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    if _world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def _sync_across_ranks(counts, sums, candidates, candidate_ok):
    """Sum the statistics over all processes in one all-reduce of K + KD numbers, never the N rows (2K + 2KD
    with the re-seed candidates).

    Rank r contributes the re-seed candidates of the codes k with k % world == r, so after the sum every rank
    holds the same candidates: restarts agree everywhere, and draw on every rank's data.
    """
    world = _world_size()
    if world == 1:
        return counts, sums, candidates, candidate_ok
    num_codes, dim = sums.shape
    parts = [counts, sums.reshape(-1)]
    if candidates is not None:
        mine = torch.arange(num_codes, device=counts.device) % world == dist.get_rank()
        parts += [torch.where(mine[:, None], candidates, 0.0).reshape(-1), (mine & candidate_ok).float()]
    bucket = torch.cat(parts)
    dist.all_reduce(bucket)
    counts, sums, *rest = bucket.split([p.numel() for p in parts])
    if candidates is not None:
        candidates, candidate_ok = rest[0].view(num_codes, dim), rest[1] > 0.5
    return counts, sums.view(num_codes, dim), candidates, candidate_ok


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    probs = counts / counts.sum().clamp(min=1.0)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
