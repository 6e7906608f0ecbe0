"""The codebook: its state, its search, and the order in which its parts run: how its codes learn
(`vqvae.quantizer.learning`: EMA, gradient or SimVQ) and its health rules (`vqvae.quantizer.health`).

State (buffers, so they follow `.to()` and the state dict; the learning mode and the health rules add their own,
e.g. the EMA sums, the learned parameters, the affine re-parameterisation's moments):
  codes [K, D]       the codes, as the search reads them (learned codes: rebuilt from their parameters)
  cluster_size [K]   EMA of the rows each code receives per step
  initialized        whether the first training batch has seeded the codes
  ema_steps          EMA steps taken since then: the warm-up's clock

The two procedures, each reading top to bottom:
- `initialise_` (the first training batch): seed the codes from distinct rows of the batch ("random" rows or
  "kmeans++", `vqvae.quantizer.seeding`), with the EMA state as if each code had already averaged `seed` copies of
  itself (its share of one step's rows), so the first steps move codes towards their data rather than shrinking them
  towards zero; then each rule's `initialise_` (the k-means fit, its weight, the moments); then the learning mode
  takes the codes up (EMA sums; learned parameters).
- `_commit` (each EMA step, from the summed statistics of a batch or of an `accumulate()` block): the decay
  (rules may lower it), the learning mode's step (EMA codes: Sonnet's VectorQuantizerEMA blend,
  `vq_kernels.reference.ema_blend_`, and cosine codes back onto the sphere; learned codes: their usage counts), the
  rules' `after_blend_`, the clock, the dead codes, and their re-seeding.
Before each training batch is searched the rules' `before_search_` run (the affine re-parameterisation), then
`refresh_` gives the forward its codes. A codebook trained elsewhere is taken over with `take_over_`.

Several processes (torch.distributed initialised): the statistics and re-seed candidates of every step are summed
over the ranks first (`vqvae.quantizer.sync`), and the initialisation is broadcast from rank 0, so every rank keeps
the same codebook.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from vqvae.quantizer.backend import full_precision, pick_backend
from vqvae.quantizer.health import DeadCodeRestarts, rules_from_options
from vqvae.quantizer.learning import learning_from_options
from vqvae.quantizer.options import QuantizerOptions
from vqvae.quantizer.seeding import kmeans_plus_plus, random_rows
from vqvae.quantizer.sync import broadcast_from_rank0, sum_across_ranks, world_size

# ema_steps of a codebook taken over from elsewhere: long past its warm-up.
PAST_WARMUP = 2 ** 40


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


class Codebook(nn.Module):
    """K codes of dimension `dim` that search and learn from rows [N, dim] by EMA, under the rules that
    `options` switch on (`self.rules`; see the module docstring)."""

    def __init__(self, dim: int, options: QuantizerOptions):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim and codebook_dim must be positive ints, got {dim!r}")
        self.num_codes, self.dim, self.options = options.num_codes, dim, options
        self.decay, self.eps, self.cosine = options.decay, options.eps, options.cosine
        self.dead_code_threshold = options.dead_code_threshold
        self.rules = rules_from_options(options)
        self.restarts = next((rule for rule in self.rules if isinstance(rule, DeadCodeRestarts)), None)
        self.learning = learning_from_options(options)
        # Placeholder codes until the first training batch replaces them (see initialise_).
        self.register_buffer("codes", torch.randn(self.num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.learning.register(self)  # its state: EMA sums, or the parameters the codes are made of
        self._carry_back = True  # learned codes: carry the written codes into the parameters before the next search
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("ema_steps", torch.tensor(0, dtype=torch.int64))
        for rule in self.rules:
            for name, tensor in rule.buffers(self.num_codes, dim).items():
                self.register_buffer(name, tensor)
        # A host-side copy of `initialized`, so that the common path never reads a device flag.
        self._initialized = False
        self._pending: PendingStats | None = None  # statistics gathered inside accumulate()
        self._prepared, self._prepared_key = None, None  # the search's form of the codebook, in eval
        self._backend, self._backend_device = None, None
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_initialized_flag())

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, learning={self.learning.name!r}, rules={self.rules}"

    # -- search and statistics ------------------------------------------------------------------------------

    @property
    def backend(self):
        """The backend of `options.backend` on the codebook's device (`vqvae.quantizer.backend`), chosen once per
        device."""
        device = self.codes.device
        if self._backend_device != device:
            o = self.options
            self._backend, self._backend_device = pick_backend(o.backend, device, o.precision, o.deterministic), device
        return self._backend

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest code (int64 [N]); -1 for rows holding NaN or inf. The kernels read the rows in
        their own dtype, against the fp32 codebook."""
        return self.backend.nearest(rows, self.codes, self._prepared_codebook())

    def refresh_(self) -> torch.Tensor:
        """The codes [K, D] of this forward, with their autograd graph when they are learned
        (`vqvae.quantizer.learning`); the `codes` buffer that the search reads is made from them."""
        return self.learning.refresh_(self)

    def _prepared_codebook(self):
        """The codebook in the search's operand form, made once per codebook change: in training the codebook
        changes every step; in eval it is kept until the codebook tensor is written (its version counter moves)
        or replaced (moved to another device, loaded)."""
        key = (self.codes.data_ptr(), self.codes._version)
        if self.training or torch.compiler.is_compiling() or self._prepared_key != key:
            self._prepared = self.backend.prepare(self.codes)
            self._prepared_key = key
        return self._prepared

    # -- one training batch ---------------------------------------------------------------------------------

    @torch.no_grad()
    def before_search_(self, rows: torch.Tensor, usable: torch.Tensor | None) -> None:
        """Before a training batch is searched: the first one seeds the codes; later ones let the rules act."""
        if not self._initialized:
            self.initialise_(rows if usable is None else rows[usable])
            return
        for rule in self.rules:
            rule.before_search_(self, rows, usable)

    @torch.no_grad()
    def learn_(self, rows: torch.Tensor, indices: torch.Tensor):
        """Gather a batch's statistics (rows with index -1 add nothing) and re-seed candidates; take the EMA step
        now or, inside accumulate(), when the block ends. Returns the batch's per-code counts and the codes found
        dead (before their re-seeding)."""
        counts, sums = self.backend.stats(rows, indices, self.num_codes)
        candidates, candidate_ok = (None, None) if self.restarts is None else \
            self.restarts.candidates(self, rows, indices, counts)
        if self._pending is not None:
            self._pending.add(counts, sums, candidates, candidate_ok)
            return counts, self.dead_codes()
        return counts, self._commit(counts, sums, candidates, candidate_ok)

    @contextlib.contextmanager
    def accumulate(self):
        """Gradient accumulation: inside the block, training forwards only gather EMA statistics; on leaving it,
        the codebook takes one EMA step with the statistics of every micro-batch, as if they were one batch. (The
        affine re-parameterisation still follows each micro-batch before it is searched, moving every code.)

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
            with torch.no_grad(), full_precision(pending.counts.device):
                dead = self._commit(pending.counts, pending.sums, pending.candidates, pending.candidate_ok)
            pending.dead_codes = dead.sum()

    def _commit(self, counts, sums, candidates, candidate_ok) -> torch.Tensor:
        """One EMA step from summed statistics, then re-seed the dead codes. Across processes, the statistics and
        the candidates are summed first, so that every rank makes the same step and the same re-seeds.
        Returns the dead-code mask found before re-seeding."""
        counts, sums, candidates, candidate_ok = sum_across_ranks(counts, sums, candidates, candidate_ok)
        rows_in_step = counts.sum()
        decay = self.current_decay(rows_in_step)
        self.learning.step_(self, counts, sums, decay)
        for rule in self.rules:
            rule.after_blend_(self, counts, decay)
        self.ema_steps.add_((rows_in_step > 0).long())  # a batch without rows is no step: nothing changes
        dead = self.dead_codes()
        if self.restarts is not None:
            self.restarts.reseed_(self, dead, candidates, candidate_ok, rows_in_step)
        return dead

    def current_decay(self, rows_in_step: torch.Tensor | None = None) -> torch.Tensor:
        """The decay of the next EMA step, a 0-d fp32 device tensor; `rows_in_step` (a device scalar), the rows
        the step blends in (the warm-up's memory floor reads it)."""
        decay = torch.full((), self.decay, dtype=torch.float32, device=self.codes.device)
        for rule in self.rules:
            decay = rule.decay(self, decay, rows_in_step)
        return decay

    def activity(self) -> torch.Tensor:
        """Each code's EMA count that deadness is read against: cluster_size, unless a rule keeps another."""
        for rule in self.rules:
            if (count := rule.activity(self)) is not None:
                return count
        return self.cluster_size

    def dead_codes(self) -> torch.Tensor:
        """Bool [K]: codes whose activity is under the dead threshold (none when the threshold is 0)."""
        return self.activity() < self.dead_code_threshold

    def seed_floor(self) -> float:
        # The least EMA count a seeded code starts with: twice the dead threshold, so that a fresh code is not dead
        # on arrival, and no more, so that one that wins no rows is soon found dead and moved (with more codes than
        # a step's rows, a larger floor keeps unused codes alive for many steps). Without restarts, 1 row: nothing
        # would move a code that dies.
        return 2.0 * self.dead_code_threshold if self.dead_code_threshold > 0 else 1.0

    # -- initialisation -------------------------------------------------------------------------------------

    # A one-off step with a host read: left to eager mode, so torch.compile neither breaks its graph here nor
    # compiles code that runs once (inductor in torch 2.13 also fails on this graph when N == num_codes).
    @torch.compiler.disable
    @torch.no_grad()
    def initialise_(self, rows: torch.Tensor) -> None:
        """Seed the codes from rows of the first training batch, then let the rules initialise (see the module
        docstring): a step whose inputs sit on their codes leaves the codebook as is."""
        # A one-off host read: seeding the codebook from NaN would corrupt it for good.
        if rows.shape[0] == 0 or not bool(torch.isfinite(rows).all()):
            raise ValueError("the first training batch holds NaN or inf (or masks out every position); "
                             "the codebook is initialised from it")
        rows = rows.float()
        # Seeded from distinct vectors: two identical codes would tie for every row near them.
        distinct = torch.unique(rows, dim=0)
        choose = kmeans_plus_plus if self.options.init == "kmeans++" else random_rows
        self.codes.copy_(distinct[choose(distinct, self.num_codes)])
        # A code's EMA count tends to its share of the rows of one step (all ranks together).
        seed = max(rows.shape[0] * world_size() / self.num_codes, self.seed_floor())
        self.cluster_size.fill_(seed)
        if self.restarts is not None:  # codes beyond the batch's distinct rows are copies: dead, re-seeded from
            self.cluster_size[distinct.shape[0]:] = 0.0  # the next batches (the choosers put the copies last)
        self.ema_steps.zero_()
        for rule in self.rules:
            rule.initialise_(self, rows, seed)
        broadcast_from_rank0(*(b for b in self.buffers() if b.is_floating_point()))
        self.learning.codes_written_(self, None)
        self.initialized.fill_(True)
        self._initialized = True

    def _sync_initialized_flag(self) -> None:
        self._initialized = bool(self.initialized)
        self._carry_back = True

    @torch.no_grad()
    def take_over_(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a codebook trained elsewhere (an adapter's import from another package): `state` holds some
        of this codebook's tensors by name (its codes and counts, the learning mode's own: the EMA sums, SimVQ's base
        and map); the others keep their values, the codebook is past its warm-up, and the counts a rule keeps of its
        own start from these counts."""
        own = self.state_dict()
        if unknown := sorted(set(state) - set(own)):
            raise KeyError(f"the codebook has no tensor {unknown} (it has {sorted(own)})")
        self.load_state_dict({**own, "ema_steps": torch.tensor(PAST_WARMUP), **state})
        for rule in self.rules:
            rule.adopt_(self)
