"""The EMA codebook: its state, and the rules that seed it, move it and revive its dead codes.

State (buffers, so they follow `.to()` and the state dict):
  codebook [K, D]    the codes
  cluster_size [K]   EMA of the rows each code receives per step (with `ema_warmup`, starting from the k-means
                     counts times INIT_STEPS)
  recent_count [K]   the same EMA started from the k-means counts themselves: what decides that a code is dead
  embed_sum [K, D]   EMA of the sum of those rows; codebook = embed_sum / (Laplace-smoothed cluster_size)
  initialized        whether the first training batch has seeded the codes
  ema_steps          EMA steps taken since then: the warm-up's clock
  data_mean [D], data_sq_mean [D]   EMA of the data's first and second moments per feature (`affine_reparam`)

Why these rules: at initialisation a VQ-VAE's encoder outputs are tiny, and over the first hundred steps the
optimizer moves them by as much as their spread, which then grows ~50-fold, almost all along one direction. A
codebook that averages over 100 steps (decay 0.99 from the start) lags behind them; the codes left behind stop
receiving rows and the few at the leading edge take them all: the seed configuration collapsed from perplexity
2435 to 9 within 54 steps. Each rule below is measured in bench/RESULTS.md ("Codebook health").

Rules:
- Initialisation, from the first training batch (`initialise_`). `init="kmeans++"`: k-means++ seeding; `"random"`:
  distinct random rows (`vqvae.seeding`). Then `kmeans_iters` Lloyd iterations on the same batch; between them a
  code left with fewer rows than the dead threshold moves onto a row drawn as the re-seeds draw theirs, so the next
  iteration splits the most used codes instead of the first step finding it dead. The EMA state starts as if each
  code had already averaged its rows of the last iteration (with `kmeans_iters=0`: `seed` copies of itself, its
  share of one step's rows), so the first steps move codes towards their data rather than shrinking them towards
  zero. With `ema_warmup` that fit weighs as INIT_STEPS steps of its rows: at small batches, where the decay is
  floored (below), the codes hold the fit instead of following each small batch's draw of images, while
  `recent_count`, which decides deadness, starts from the fit's own counts, so an unused code dies as soon as it
  would without the weight. At the seed configuration's batch the first step's decay (0.005) spends the weight.
- The EMA step: Sonnet's VectorQuantizerEMA maths (`kernels.reference.ema_blend_`). With `ema_warmup`, step t
  (from 0) uses the decay min(decay, (1 + t) / (W + t)), W = `ema_warmup_steps` (200): the codebook averages over
  about 1 + t / W steps, so it starts as a k-means step on each batch and lengthens its memory as training settles
  (0.5 at step 200, 0.75 at 600, 0.9 at 1800, 0.99 from step ~19700). On recorded encoder outputs of a seed run the
  lowest perplexity of steps 1-160 was 611 with W = 10 and 1457 with W = 200. At small batches the decay is raised
  so that the average holds at least MEMORY_ROWS rows per code. The decay is a device tensor: no host read.
- Affine re-parameterisation (`affine_reparam`, after Huh et al. 2023, "Straightening out the straight-through
  estimator"): the codes live in the frame of the data's running per-feature mean and standard deviation. Before
  each training batch is searched the frame follows its moments and every code moves with it,
  c -> mean' + std' / std * (c - mean), so when the encoder's outputs shift or grow every code follows at once,
  the unused ones too. The moments average over ~MOMENT_STEPS batches and at least MOMENT_ROWS rows a code: a
  batch's mean depends on which images it drew (the more so the fewer), and a frame that followed each batch
  would move every code by that difference of content, which is no drift of the encoder. Eval mode leaves the
  frame where training left it.
- Cosine codes (`cosine`): the rows arrive l2-normalised, and the codes are put back on the unit sphere after
  every EMA step, so the nearest code is the one of highest cosine similarity.
- Dead codes: a code is dead when its recent count (`recent_count`: the EMA of its rows per step, without the
  fit's initial weight) falls under `dead_code_threshold` (rows per step). Dead codes are re-seeded from rows of
  the batch, with the seed count (or `restart_count`), on the device, with no host synchronisation. A row is drawn
  with probability proportional to the batch count of its code, so a region receives new codes in proportion to
  its count squared: restarts split the most used codes first, which evens out the usage faster than rows drawn
  uniformly (those follow the data's density). The shipped configs use a quarter of a code's fair share (rows per
  step / K).
- Several processes (torch.distributed initialised): the statistics and re-seed candidates of every step are
  summed over the ranks first (`vqvae.sync`), and the initialisation is broadcast from rank 0, so every rank keeps
  the same codebook.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference
from vqvae.seeding import draw_in_proportion, kmeans_plus_plus, random_rows
from vqvae.sync import broadcast_from_rank0, sum_across_ranks, sum_moments_across_ranks, world_size

BACKENDS = ("auto", "triton", "torch")
INITS = ("kmeans++", "random")
# ema_steps of a state loaded without one (written before the warm-up existed): a codebook long past its warm-up.
TRAINED = 2 ** 40
# The frame's horizon: each training batch weighs at most 1 / MOMENT_STEPS in the running moments, and at most its
# rows / (num_codes * MOMENT_ROWS): long enough to average out which images a batch drew (a small batch draws
# fewer), short enough to follow the encoder (see the module docstring).
MOMENT_STEPS = 8
MOMENT_ROWS = 128
# With the warm-up, the first batch's fit enters the EMA as this many steps of its rows (see the module docstring).
INIT_STEPS = 16
# The warm-up's floor: the EMA averages at least this many rows per code, so that a code's count, which decides
# whether it is dead, is not one batch's draw (a decay of at least 1 - (rows per step / num_codes) / MEMORY_ROWS).
MEMORY_ROWS = 16
VARIANCE_FLOOR = 1e-12  # of a feature's running variance: a constant feature must not be divided by zero


@dataclass
class PendingStats:
    """EMA statistics summed over the micro-batches of one optimizer step (see `accumulate`)."""

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


class EMACodebook(nn.Module):
    """K codes of dimension D (`code_dim`) that search and learn from rows [N, D]; see the module docstring."""

    def __init__(self, num_codes: int, code_dim: int, *, decay: float, eps: float, ema_warmup: bool,
                 ema_warmup_steps: int, init: str, kmeans_iters: int,
                 affine_reparam: bool, cosine: bool, dead_code_threshold: float, restart_count: float | None,
                 backend: str, precision: str, deterministic: bool):
        super().__init__()
        _check_codebook_config(num_codes, code_dim, decay, eps, init, dead_code_threshold, restart_count, backend,
                               precision)
        if isinstance(ema_warmup_steps, bool) or not isinstance(ema_warmup_steps, int) or ema_warmup_steps < 1:
            raise ValueError(f"ema_warmup_steps must be an int >= 1, got {ema_warmup_steps!r}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        if affine_reparam and cosine:
            raise ValueError("affine_reparam and cosine exclude each other: cosine codes live on the unit sphere")
        self.num_codes, self.code_dim, self.decay, self.eps = num_codes, code_dim, decay, eps
        self.ema_warmup, self.ema_warmup_steps = ema_warmup, ema_warmup_steps
        self.init, self.kmeans_iters, self.affine_reparam, self.cosine = init, kmeans_iters, affine_reparam, cosine
        self.dead_code_threshold = dead_code_threshold
        self.restart_count, self.backend, self.precision = restart_count, backend, precision
        self.deterministic = deterministic
        # Placeholder codes until the first training batch replaces them (see initialise_).
        self.register_buffer("codebook", torch.randn(num_codes, code_dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, code_dim))
        self.register_buffer("recent_count", torch.zeros(num_codes))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("ema_steps", torch.tensor(0, dtype=torch.int64))
        # Measured only with affine_reparam; a second moment of 0 marks moments never measured.
        self.register_buffer("data_mean", torch.zeros(code_dim))
        self.register_buffer("data_sq_mean", torch.zeros(code_dim))
        # A host-side copy of `initialized`, so that the common path never reads a device flag.
        self._initialized = False
        self._pending: PendingStats | None = None  # statistics gathered inside accumulate()
        self._prepared, self._prepared_key = None, None  # the search's form of the codebook, in eval
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_initialized_flag())

    @property
    def restarts_enabled(self) -> bool:
        return self.dead_code_threshold > 0

    # -- search and statistics ------------------------------------------------------------------------------

    def use_triton(self, rows: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and rows.is_cuda)

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest code (int64 [N]); -1 for rows holding NaN or inf. The kernels read the rows in
        their own dtype, against the fp32 codebook."""
        if not self.use_triton(rows):
            return reference.nearest_code(rows, self.codebook)[0]
        prepared = self._prepared_codebook()
        return kernels.nearest_code_prepared_op(rows, self.codebook, *prepared, self.precision)[0]

    def _prepared_codebook(self):
        """The codebook in the search's operand form (`kernels.prepare_codebook`), made once per codebook change:
        in training the codebook changes every step; in eval it is kept until the codebook tensor is written
        (its version counter moves) or replaced (moved to another device, loaded)."""
        key = (self.codebook.data_ptr(), self.codebook._version)
        if self.training or torch.compiler.is_compiling() or self._prepared_key != key:
            self._prepared = kernels.prepare_codebook_op(self.codebook)
            self._prepared_key = key
        return self._prepared

    def _stats(self, rows: torch.Tensor, indices: torch.Tensor):
        if self.use_triton(rows):
            return kernels.code_stats_op(rows, indices, self.num_codes, self.deterministic)
        return reference.code_stats(rows, indices, self.num_codes)

    # -- the EMA step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def learn_(self, rows: torch.Tensor, indices: torch.Tensor, learn: torch.Tensor):
        """Gather a batch's statistics (rows with index -1 add nothing) and re-seed candidates; take the EMA step
        now or, inside accumulate(), when the block ends. Returns the batch's per-code counts and the codes found
        dead (before their re-seeding)."""
        counts, sums = self._stats(rows, indices)
        candidates, candidate_ok = self._reseed_candidates(rows, learn, indices, counts)
        if self._pending is not None:
            self._pending.add(counts, sums, candidates, candidate_ok)
            return counts, self.dead_codes()
        return counts, self._commit(counts, sums, candidates, candidate_ok)

    @contextlib.contextmanager
    def accumulate(self):
        """Gradient accumulation: inside the block, training forwards only gather EMA statistics; on leaving it,
        the codebook takes one EMA step with the statistics of every micro-batch, as if they were one batch. (With
        affine_reparam the frame still follows each micro-batch before it is searched, moving every code.)

            with quantizer.accumulate() as step:
                for micro_batch in chunks:
                    model(micro_batch).loss.backward()
            optimizer.step()
            step.dead_codes   # codes found dead (and re-seeded) by that EMA step
        """
        if self._pending is not None:
            raise RuntimeError("quantizer.accumulate() blocks cannot be nested")
        pending = self._pending = PendingStats()
        try:
            yield pending
        finally:
            self._pending = None
        if pending.counts is not None:
            with torch.no_grad(), torch.autocast(device_type=pending.counts.device.type, enabled=False):
                dead = self._commit(pending.counts, pending.sums, pending.candidates, pending.candidate_ok)
            pending.dead_codes = dead.sum()

    def _commit(self, counts, sums, candidates, candidate_ok) -> torch.Tensor:
        """One EMA step from summed statistics, then re-seed the dead codes. Across processes, the statistics and
        the candidates are summed first, so that every rank makes the same step and the same re-seeds.
        Returns the dead-code mask found before re-seeding."""
        counts, sums, candidates, candidate_ok = sum_across_ranks(counts, sums, candidates, candidate_ok)
        state = (self.cluster_size, self.embed_sum, self.codebook)
        rows_in_step = counts.sum()
        decay = self.current_decay(rows_in_step)
        if self.use_triton(self.codebook):
            kernels.ema_blend_op(*state, counts, sums, decay, self.eps)
        else:
            reference.ema_blend_(*state, counts, sums, decay, self.eps)
        self.recent_count.copy_(torch.where(rows_in_step > 0, decay * self.recent_count + (1.0 - decay) * counts,
                                            self.recent_count))
        if self.cosine:  # the averaged codes back onto the sphere (a batch without rows changed nothing)
            self.codebook.copy_(torch.where(counts.sum() > 0, F.normalize(self.codebook, dim=1), self.codebook))
        self.ema_steps.add_((rows_in_step > 0).long())  # a batch without rows is no step: nothing changes
        dead = self.dead_codes()
        self._restart_dead_codes(dead, candidates, candidate_ok, rows_in_step)
        return dead

    # -- the moving frame (affine_reparam) ------------------------------------------------------------------

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running per-feature mean and standard deviation of the data (affine_reparam)."""
        variance = (self.data_sq_mean - self.data_mean.square()).clamp(min=VARIANCE_FLOOR)
        return self.data_mean, variance.sqrt()

    @torch.no_grad()
    def follow_batch_(self, rows: torch.Tensor, usable: torch.Tensor | None) -> None:
        """Before a training batch is searched: blend its moments (over the `usable` rows, finite and not masked
        out) into the running ones, and move every code, and its EMA sum, by the change of frame
        c -> mean' + std' / std * (c - mean). A batch weighs 1 / MOMENT_STEPS, or less when it holds fewer than
        num_codes * MOMENT_ROWS / MOMENT_STEPS rows (its share of num_codes * MOMENT_ROWS): it is the content a
        batch drew that makes its moments differ from the next one's, and a smaller batch draws fewer images. A
        batch without rows changes nothing; the first one measured (after initialisation, or a state saved without
        moments) sets the moments and moves no code."""
        rows = rows.float()
        finite = torch.isfinite(rows).all(dim=1)
        usable = finite if usable is None else finite & usable
        n, row_sum, sq_sum = sum_moments_across_ranks(usable.sum().float(), torch.where(usable[:, None], rows, 0.0))
        measured = self.data_sq_mean.sum() > 0  # 0 marks moments never measured
        weight = torch.where(measured, (n / (self.num_codes * MOMENT_ROWS)).clamp(max=1.0 / MOMENT_STEPS), 1.0)
        active = n > 0
        old_mean, old_std = (t.clone() for t in self.moments())
        per_row = n.clamp(min=1.0)
        self.data_mean.copy_(torch.where(active, (1 - weight) * self.data_mean + weight * row_sum / per_row,
                                         self.data_mean))
        self.data_sq_mean.copy_(torch.where(active, (1 - weight) * self.data_sq_mean + weight * sq_sum / per_row,
                                            self.data_sq_mean))
        mean, std = self.moments()
        move = active & measured
        ratio = std / old_std
        count = self.cluster_size[:, None]  # embed_sum = count * codebook, to the Laplace smoothing's eps
        self.codebook.copy_(torch.where(move, mean + ratio * (self.codebook - old_mean), self.codebook))
        self.embed_sum.copy_(torch.where(move, ratio * (self.embed_sum - count * old_mean) + count * mean,
                                         self.embed_sum))

    def current_decay(self, rows_in_step: torch.Tensor | None = None) -> torch.Tensor:
        """The decay of the next EMA step, a 0-d fp32 device tensor (see the warm-up in the module docstring).
        `rows_in_step` (a device scalar): the warm-up keeps at least MEMORY_ROWS rows per code in the average."""
        decay = torch.full((), self.decay, dtype=torch.float32, device=self.codebook.device)
        if not self.ema_warmup:
            return decay
        steps = self.ema_steps.float()
        warm = (1.0 + steps) / (self.ema_warmup_steps + steps)
        if rows_in_step is not None:
            warm = torch.maximum(warm, 1.0 - rows_in_step.float() / (self.num_codes * MEMORY_ROWS))
        return torch.minimum(decay, warm)

    # -- dead codes -----------------------------------------------------------------------------------------

    def dead_codes(self) -> torch.Tensor:
        """Bool [K]: codes whose recent EMA count is under the threshold."""
        return self.recent_count < self.dead_code_threshold

    def _reseed_candidates(self, rows: torch.Tensor, learn: torch.Tensor, indices: torch.Tensor,
                           counts: torch.Tensor):
        """One row of the batch per code, drawn with probability proportional to the batch count of the row's code,
        and whether it may seed a code (finite and not masked out); (None, None) when re-seeding is off."""
        if not self.restarts_enabled:
            return None, None
        # A row's weight is its code's count, so a code's rows are drawn in proportion to its count squared: the
        # new codes land in the most used codes' regions and split them (rows drawn uniformly would follow the
        # data's density, which places them in proportion to the count; bench/RESULTS.md measures both).
        weights = torch.where(learn, counts[indices.clamp(min=0)], 0.0)
        picks = draw_in_proportion(weights, self.num_codes)
        return rows[picks].float(), learn[picks]

    def _restart_dead_codes(self, dead, candidates, candidate_ok, rows_in_step: torch.Tensor) -> None:
        """Re-seed dead codes from their candidate rows, on the device."""
        if candidates is None:
            return
        reseed = dead & candidate_ok
        seed = self._restart_seed(rows_in_step)
        self.codebook.copy_(torch.where(reseed[:, None], candidates, self.codebook))
        self.embed_sum.copy_(torch.where(reseed[:, None], candidates * seed, self.embed_sum))
        self.cluster_size.copy_(torch.where(reseed, seed, self.cluster_size))
        self.recent_count.copy_(torch.where(reseed, seed, self.recent_count))

    def _restart_seed(self, rows_in_step: torch.Tensor) -> torch.Tensor:
        if self.restart_count is not None:
            return torch.full_like(rows_in_step, self.restart_count)
        return (rows_in_step / self.num_codes).clamp(min=self._seed_floor())  # a device scalar: no host sync

    def _seed_floor(self) -> float:
        # At least twice the dead threshold, so a fresh code is not dead on arrival, and at least 1, so that Laplace
        # smoothing (eps-sized) does not shrink it.
        return max(2.0 * self.dead_code_threshold, 1.0)

    # -- initialisation -------------------------------------------------------------------------------------

    # A one-off step with a host read: left to eager mode, so torch.compile neither breaks its graph here nor
    # compiles code that runs once (inductor in torch 2.13 also fails on this graph when N == num_codes).
    @torch.compiler.disable
    @torch.no_grad()
    def initialise_(self, rows: torch.Tensor) -> None:
        """Seed the codes from rows of the first training batch (see `init`), and the EMA state as if each code had
        already averaged `seed` copies of itself (its k-means rows; with the warm-up, over INIT_STEPS steps): a step
        whose inputs sit on their codes leaves the codebook as is."""
        # A one-off host read: seeding the codebook from NaN would corrupt it for good.
        if rows.shape[0] == 0 or not bool(torch.isfinite(rows).all()):
            raise ValueError("the first training batch holds NaN or inf (or masks out every position); "
                             "the codebook is initialised from it")
        rows = rows.float()
        # Seeded from distinct vectors: two identical codes would tie for every row near them.
        distinct = torch.unique(rows, dim=0)
        choose = kmeans_plus_plus if self.init == "kmeans++" else random_rows
        codes = distinct[choose(distinct, self.num_codes)]
        # A code's EMA count tends to its share of the rows of one step (all ranks together).
        seed = max(rows.shape[0] * world_size() / self.num_codes, self._seed_floor())
        self.ema_steps.zero_()
        if self.affine_reparam:
            self.data_mean.copy_(rows.mean(dim=0))
            self.data_sq_mean.copy_(rows.square().mean(dim=0))
        self.codebook.copy_(codes)
        self.cluster_size.fill_(seed)
        if self.kmeans_iters > 0:  # counts measured: a code k-means left (nearly) empty starts dead
            counts = self._lloyd_(rows) * world_size()
            # Without restarts nothing would revive an empty code, and a zero count would pull it to the origin.
            self.cluster_size.copy_(counts if self.dead_code_threshold > 0 else counts.clamp(min=seed))
        self.recent_count.copy_(self.cluster_size)
        if self.ema_warmup:
            self.cluster_size.mul_(INIT_STEPS)
        self.embed_sum.copy_(self.codebook * self.cluster_size[:, None])
        broadcast_from_rank0(self.codebook, self.cluster_size, self.embed_sum, self.recent_count, self.data_mean,
                             self.data_sq_mean)
        self.initialized.fill_(True)
        self._initialized = True

    def _lloyd_(self, rows: torch.Tensor) -> torch.Tensor:
        """`kmeans_iters` Lloyd iterations of the codebook on `rows`: each code moves to the mean of the rows nearest
        it. A code left with fewer rows than the first step would keep alive (the dead threshold, at least one row)
        moves instead onto a row drawn as the restarts draw theirs, in proportion to its code's count, so the next
        iteration splits the most used codes (the usual repair of empty clusters; at batch 16 the codes found dead
        at step 1 fall from ~1100 to ~390 and steps 1-12 read up to 14% more, bench/RESULTS.md). The last
        iteration moves none, so the counts it returns are measured. On CUDA it runs the quantizer's own kernels;
        elsewhere the PyTorch reference (Triton's interpreter would take seconds a search for a one-off step)."""
        kernels_on_gpu = rows.is_cuda and self.use_triton(rows)
        too_few = max(self.dead_code_threshold, 1.0)  # rows a step, all ranks together
        for iteration in range(self.kmeans_iters):
            if kernels_on_gpu:
                indices = self.nearest(rows)
                counts, sums = self._stats(rows, indices)
            else:
                indices = reference.nearest_code(rows, self.codebook)[0]
                counts, sums = reference.code_stats(rows, indices, self.num_codes)
            means = sums / counts.clamp(min=1.0)[:, None]
            if self.cosine:
                means = F.normalize(means, dim=1)
            self.codebook.copy_(torch.where(counts[:, None] > 0, means, self.codebook))
            if iteration < self.kmeans_iters - 1:
                relocate = counts * world_size() < too_few
                picks = draw_in_proportion(counts[indices], self.num_codes)
                self.codebook.copy_(torch.where(relocate[:, None], rows[picks], self.codebook))
        return counts

    def _sync_initialized_flag(self) -> None:
        self._initialized = bool(self.initialized)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state written before the warm-up existed (an older checkpoint, or an adapter's import from another
        # package) is a trained codebook: past its warm-up.
        if prefix + "codebook" in state_dict and prefix + "ema_steps" not in state_dict:
            state_dict[prefix + "ema_steps"] = torch.tensor(TRAINED)
        if prefix + "cluster_size" in state_dict and prefix + "recent_count" not in state_dict:  # one count then
            state_dict[prefix + "recent_count"] = state_dict[prefix + "cluster_size"].clone()
        if prefix + "codebook" in state_dict and prefix + "data_mean" not in state_dict:  # moments not measured yet
            state_dict[prefix + "data_mean"] = torch.zeros(self.code_dim)
            state_dict[prefix + "data_sq_mean"] = torch.zeros(self.code_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_codebook_config(num_codes, code_dim, decay, eps, init, dead_code_threshold, restart_count, backend,
                           precision):
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if not isinstance(code_dim, int) or code_dim < 1:
        raise ValueError(f"dim and codebook_dim must be positive ints, got {code_dim!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not eps > 0.0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not (dead_code_threshold >= 0.0 and math.isfinite(dead_code_threshold)):
        raise ValueError(f"dead_code_threshold must be finite and >= 0, got {dead_code_threshold}")
    if restart_count is not None and not (restart_count > 0.0 and math.isfinite(restart_count)):
        raise ValueError(f"restart_count must be positive and finite (or None), got {restart_count}")
    for name, value, allowed in (("init", init, INITS), ("backend", backend, BACKENDS),
                                 ("precision", precision, kernels.PRECISIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
