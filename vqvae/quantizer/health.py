"""The codebook's health rules: each one a part with its reason, its constants and its switch.

One name per rule: its `name` (the ablation's `ours-no-<name>`) is its class's name and the prefix of the options
that set it: `EMAWarmup` ("ema-warmup": ema_warmup, ema_warmup_steps, ema_warmup_min_rows), `KMeansInit`
("kmeans-init": kmeans_init_iters), `DeadCodeMemory` ("dead-code-memory": dead_code_memory), `FitWeight`
("fit-weight": fit_weight_steps), `AffineReparam` ("affine-reparam": affine_reparam), `DeadCodeRestarts`
("dead-code-restarts": dead_code_threshold, restart_count, restart_draws).

Why rules at all: at initialisation a VQ-VAE's encoder outputs are tiny, and over the first hundred steps the
optimizer moves them by as much as their spread, which then grows ~50-fold, almost all along one direction. A
codebook that averages over 100 steps (decay 0.99 from the start) lags behind them; the codes left behind stop
receiving rows and the few at the leading edge take them all: the seed configuration collapsed from perplexity
2435 to 9 within 54 steps. bench/RESULTS.md ("Codebook health") measures each rule; docs/codebook-health.md
says why each is there.

A rule has only the hooks it needs (the base class's do nothing); `vqvae.quantizer.codebook.Codebook` calls them,
in the order of its rule list, at fixed points of its two procedures (`initialise_` and `_commit`):
    buffers(num_codes, dim)                  state the rule keeps (registered on the codebook, saved with it)
    initialise_(codebook, rows, seed)        after the first batch seeded the codes (cluster_size = seed)
    before_search_(codebook, rows, usable)   before each training batch is searched
    decay(codebook, decay, rows_in_step)     the decay of this EMA step
    after_blend_(codebook, counts, decay)    after the EMA step blended a batch in
    activity(codebook)                       the count that deadness is read against (default: cluster_size;
                                             the first rule in the list that keeps one)
    adopt_(codebook)                         after the codebook took over codes and counts trained elsewhere

`rules_from_options` turns the options into the list; its order matters where a rule reads what another wrote
(FitWeight weighs KMeansInit's counts; DeadCodeRestarts reads DeadCodeMemory's count, else FitWeight's recent
count). An empty list is the plain EMA quantizer of Sonnet's VectorQuantizerEMA (`HEALTH_RULES_OFF`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqvae.quantizer.backend import TORCH
from vqvae.quantizer.metrics import blend_counts_
from vqvae.quantizer.options import QuantizerOptions
from vqvae.quantizer.seeding import draw_in_proportion, first_of_copies
from vqvae.quantizer.sync import sum_moments_across_ranks, world_size

VARIANCE_FLOOR = 1e-12  # of a feature's running variance: a constant feature must not be divided by zero


class Rule:
    name = "rule"
    off: dict = {}  # the options that switch this rule off

    def buffers(self, num_codes: int, dim: int) -> dict[str, torch.Tensor]:
        return {}

    def initialise_(self, codebook, rows: torch.Tensor, seed: float) -> None:
        pass

    def before_search_(self, codebook, rows: torch.Tensor, usable: torch.Tensor | None) -> None:
        pass

    def decay(self, codebook, decay: torch.Tensor, rows_in_step: torch.Tensor | None) -> torch.Tensor:
        return decay

    def after_blend_(self, codebook, counts: torch.Tensor, decay: torch.Tensor) -> None:
        pass

    def activity(self, codebook) -> torch.Tensor | None:
        return None

    def adopt_(self, codebook) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class EMAWarmup(Rule):
    """Step t (from 0) uses the decay min(decay, (1 + t) / (steps + t)): the codebook averages over about
    1 + t / steps steps, so it starts as a k-means step on each batch and lengthens its memory as training settles
    (0.5 at step 200, 0.75 at 600, 0.9 at 1800, 0.99 from step ~19700 with steps = 200).

    The memory floor: at small batches the decay is raised so that the average holds at least `min_rows` rows
    per code (a decay of at least 1 - (rows per step / num_codes) / min_rows), so that a code's count, which
    decides whether it is dead, is not one batch's draw. The decay is a device tensor: no host read."""

    name = "ema-warmup"
    off = {"ema_warmup": False}

    def __init__(self, steps: int, min_rows: int):
        self.steps, self.min_rows = steps, min_rows

    def decay(self, codebook, decay, rows_in_step):
        steps = codebook.ema_steps.float()
        warm = (1.0 + steps) / (self.steps + steps)
        if rows_in_step is not None and self.min_rows > 0:
            warm = torch.maximum(warm, 1.0 - rows_in_step.float() / (codebook.num_codes * self.min_rows))
        return torch.minimum(decay, warm)


class KMeansInit(Rule):
    """`iters` Lloyd iterations of the seeded codes on the first batch: each code moves to the mean of the rows
    nearest it, and the counts of the last iteration start the EMA counts (a code k-means left empty starts dead).
    Between iterations a code left with fewer rows than the first step would keep alive (the dead threshold, at
    least one row) moves onto a row drawn as the restarts draw theirs, in proportion to its code's count, so the
    next iteration splits the most used codes (the usual repair of empty clusters). The last iteration
    moves none, so the counts it returns are measured. On CUDA it runs the codebook's backend; elsewhere the
    PyTorch reference (Triton's interpreter would take seconds a search for a one-off step)."""

    name = "kmeans-init"
    off = {"kmeans_init_iters": 0}

    def __init__(self, iters: int):
        self.iters = iters

    def initialise_(self, codebook, rows, seed):
        counts = self._fit_(codebook, rows) * world_size()
        # Without restarts nothing would revive an empty code, and a zero count would pull it to the origin.
        codebook.cluster_size.copy_(counts if codebook.dead_code_threshold > 0 else counts.clamp(min=seed))

    def _fit_(self, codebook, rows: torch.Tensor) -> torch.Tensor:
        too_few = max(codebook.dead_code_threshold, 1.0)  # rows a step, all ranks together
        backend = codebook.backend if rows.is_cuda else TORCH
        for iteration in range(self.iters):
            indices = codebook.nearest(rows) if rows.is_cuda else TORCH.nearest(rows, codebook.codes, None)
            counts, sums = backend.stats(rows, indices, codebook.num_codes)
            means = sums / counts.clamp(min=1.0)[:, None]
            if codebook.cosine:
                means = F.normalize(means, dim=1)
            codebook.codes.copy_(torch.where(counts[:, None] > 0, means, codebook.codes))
            if iteration < self.iters - 1:
                relocate = counts * world_size() < too_few
                picks = draw_in_proportion(counts[indices], codebook.num_codes)
                codebook.codes.copy_(torch.where(relocate[:, None], rows[picks], codebook.codes))
        return counts


class DeadCodeMemory(Rule):
    """Deadness is read on `dead_count`, an EMA of each code's rows per step whose memory is at least `steps` steps
    (decay max(step's decay, 1 - 1 / steps)), whatever the warm-up's decay does to the codebook's own counts.

    Why: during the warm-up the codebook's counts forget within a step or two (decay 0.24 at step 60), so a code
    is declared dead by one poor batch. On images with large flat areas, where most rows are copies of a few
    vectors, most codes receive 1-3 rows a step, under the threshold however they are placed: re-seeded with a
    count of 16, such a code was dead again two steps later, and 64% of the codes were moved at every step
    (bench/RESULTS.md, "Dead-code churn"). With a memory of `steps` steps a code fed r rows a step lives about
    steps * ln((seed - r) / (threshold - r)) steps before it is moved again; one fed none, steps * ln(seed /
    threshold). Starts from the first fit's own counts, as FitWeight's `recent_count` does."""

    name = "dead-code-memory"
    off = {"dead_code_memory": 0}

    def __init__(self, steps: int):
        self.steps = steps

    def buffers(self, num_codes, dim):
        return {"dead_count": torch.zeros(num_codes)}

    def initialise_(self, codebook, rows, seed):
        codebook.dead_count.copy_(codebook.cluster_size)  # before FitWeight weighs cluster_size: this rule runs first

    def after_blend_(self, codebook, counts, decay):
        blend_counts_(codebook.dead_count, counts, torch.clamp(decay, min=1.0 - 1.0 / self.steps))

    def activity(self, codebook):
        return codebook.dead_count

    def adopt_(self, codebook):
        codebook.dead_count.copy_(codebook.cluster_size)


class FitWeight(Rule):
    """The first batch's fit enters the EMA as `steps` steps of its rows: at small batches, where the warm-up's
    decay is floored, the codes hold the fit instead of following each small batch's draw of images. Deadness is
    judged on `recent_count`, the same EMA started from the fit's own counts, so an unused code dies as soon as it
    would without the weight. At the seed configuration's batch the first step's decay (0.005) spends the weight."""

    name = "fit-weight"
    off = {"fit_weight_steps": 1}

    def __init__(self, steps: int):
        self.steps = steps

    def buffers(self, num_codes, dim):
        return {"recent_count": torch.zeros(num_codes)}

    def initialise_(self, codebook, rows, seed):
        codebook.recent_count.copy_(codebook.cluster_size)
        codebook.cluster_size.mul_(self.steps)

    def after_blend_(self, codebook, counts, decay):
        blend_counts_(codebook.recent_count, counts, decay)

    def activity(self, codebook):
        return codebook.recent_count

    def adopt_(self, codebook):
        codebook.recent_count.copy_(codebook.cluster_size)


class AffineReparam(Rule):
    """Affine re-parameterisation (after Huh et al. 2023, "Straightening out the straight-through estimator"): the
    codes live in the frame of the data's running per-feature mean and standard deviation. Before each training
    batch is searched the frame follows its moments and every code moves with it, c -> mean' + std' / std *
    (c - mean), so when the encoder's outputs shift or grow every code follows at once, the unused ones too.

    The moments average over ~`steps` batches and at least `rows` rows a code: a batch's mean depends on which
    images it drew (the more so the fewer), and a frame that followed each batch would move every code by that
    difference of content, which is no drift of the encoder. Eval mode leaves the frame where training left it."""

    name = "affine-reparam"
    off = {"affine_reparam": False}
    STEPS = 8  # each training batch weighs at most 1 / STEPS in the running moments ...
    ROWS = 128  # ... and at most its rows / (num_codes * ROWS)

    def buffers(self, num_codes, dim):
        # A second moment of 0 marks moments never measured.
        return {"data_mean": torch.zeros(dim), "data_sq_mean": torch.zeros(dim)}

    def initialise_(self, codebook, rows, seed):
        codebook.data_mean.copy_(rows.mean(dim=0))
        codebook.data_sq_mean.copy_(rows.square().mean(dim=0))

    @staticmethod
    def moments(codebook) -> tuple[torch.Tensor, torch.Tensor]:
        """The running per-feature mean and standard deviation of the data."""
        variance = (codebook.data_sq_mean - codebook.data_mean.square()).clamp(min=VARIANCE_FLOOR)
        return codebook.data_mean, variance.sqrt()

    def before_search_(self, codebook, rows, usable):
        """Blend the batch's moments (over the `usable` rows, finite and not masked out) into the running ones and
        move every code, and its EMA sum, by the change of frame. A batch without rows changes nothing; the first
        one measured (after initialisation, or a state saved without moments) sets the moments and moves no
        code."""
        rows = rows.float()
        finite = torch.isfinite(rows).all(dim=1)
        usable = finite if usable is None else finite & usable
        n, row_sum, sq_sum = sum_moments_across_ranks(usable.sum().float(), torch.where(usable[:, None], rows, 0.0))
        measured = codebook.data_sq_mean.sum() > 0
        weight = torch.where(measured, (n / (codebook.num_codes * self.ROWS)).clamp(max=1.0 / self.STEPS), 1.0)
        active = n > 0
        old_mean, old_std = (t.clone() for t in self.moments(codebook))
        per_row = n.clamp(min=1.0)
        codebook.data_mean.copy_(torch.where(active, (1 - weight) * codebook.data_mean + weight * row_sum / per_row,
                                         codebook.data_mean))
        codebook.data_sq_mean.copy_(torch.where(active, (1 - weight) * codebook.data_sq_mean
                                                + weight * sq_sum / per_row, codebook.data_sq_mean))
        mean, std = self.moments(codebook)
        move = active & measured
        ratio = std / old_std
        count = codebook.cluster_size[:, None]  # embed_sum = count * codebook, to the Laplace smoothing's eps
        codebook.codes.copy_(torch.where(move, mean + ratio * (codebook.codes - old_mean), codebook.codes))
        codebook.embed_sum.copy_(torch.where(move, ratio * (codebook.embed_sum - count * old_mean) + count * mean,
                                         codebook.embed_sum))

    def adopt_(self, codebook):
        codebook.data_mean.zero_()  # moments not measured: the next training batch measures them
        codebook.data_sq_mean.zero_()


class DeadCodeRestarts(Rule):
    """A code is dead when its activity (the EMA of its rows per step) falls under the codebook's dead threshold;
    each EMA step re-seeds the dead codes from rows of the batch, with `count` as their EMA count (None: their
    share of the step's rows), on the device, with no host synchronisation.

    `draws` picks the batch rows: "usage" draws a row with probability proportional to the batch count of its
    code, so a region receives new codes in proportion to its count squared: restarts split the most used codes
    first, which evens out the usage faster than rows drawn uniformly (those follow the data's density; "uniform").
    "error" draws a row in proportion to its squared distance from its code (k-means++'s rule): new codes go where
    the codebook serves the rows worst, and not onto copies of a row that a code already holds (on images with
    large flat areas, most rows are such copies). The shipped configs use a quarter of a code's fair share
    (rows per step / K) as the threshold."""

    name = "dead-code-restarts"
    off = {"dead_code_threshold": 0.0}

    def __init__(self, count: float | None, draws: str):
        self.count, self.draws = count, draws

    def candidates(self, codebook, rows: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor):
        """One row of the batch per code, and whether it may seed one: finite and not masked out (index >= 0), and
        not a row that its code already holds exactly (a copy of a code never wins a row from it: ties go to the
        lower index)."""
        code = indices.clamp(min=0)
        error = (rows.float() - codebook.codes[code]).square().sum(dim=1)
        fresh = (indices >= 0) & (error > 0)
        if self.draws == "usage":
            weights = torch.where(fresh, counts[code], 0.0)
        elif self.draws == "error":
            weights = torch.where(fresh, error, 0.0)
        else:
            weights = fresh.float()
        picks = draw_in_proportion(weights, codebook.num_codes)
        return rows[picks].float(), fresh[picks]

    def reseed_(self, codebook, dead, candidates, candidate_ok, rows_in_step: torch.Tensor) -> None:
        # Draws repeat rows (with replacement; with more dead codes than rows, they must): one code per row, and
        # the codes left dead take rows of the next steps. A codebook larger than a batch fills this way.
        reseed = first_of_copies(candidates, dead & candidate_ok)
        if self.count is not None:
            seed = torch.full_like(rows_in_step, self.count)
        else:
            seed = (rows_in_step / codebook.num_codes).clamp(min=codebook.seed_floor())  # a device scalar: no host sync
        codebook.codes.copy_(torch.where(reseed[:, None], candidates, codebook.codes))
        for count in {id(t): t for t in (codebook.cluster_size, codebook.activity())}.values():
            count.copy_(torch.where(reseed, seed, count))
        codebook.learning.codes_written_(codebook, reseed)


def rules_from_options(options: QuantizerOptions) -> list[Rule]:
    """The rules that the options switch on, in the order the codebook runs them."""
    rules: list[Rule] = []
    if options.ema_warmup:
        rules.append(EMAWarmup(options.ema_warmup_steps, options.ema_warmup_min_rows))
    if options.kmeans_init_iters > 0:
        rules.append(KMeansInit(options.kmeans_init_iters))
    if options.dead_code_memory > 0 and options.dead_code_threshold > 0:  # before FitWeight: read first
        rules.append(DeadCodeMemory(options.dead_code_memory))
    if options.fit_weight_steps > 1 and options.learning == "ema":  # learned codes do not average the fit
        rules.append(FitWeight(options.fit_weight_steps))
    if options.affine_reparam:
        rules.append(AffineReparam())
    if options.dead_code_threshold > 0:
        rules.append(DeadCodeRestarts(options.restart_count, options.restart_draws))
    return rules


# Each rule's name and the options that switch it off alone: the health benchmark's ablation (`ours-no-<name>`),
# with two of their settings: the warm-up's memory floor, and restarts drawn by usage.
ABLATIONS = {rule.name: rule.off for rule in (EMAWarmup, KMeansInit, FitWeight, AffineReparam, DeadCodeRestarts)}
ABLATIONS["ema-warmup-min-rows"] = {"ema_warmup_min_rows": 0}
ABLATIONS["usage-draws"] = {"restart_draws": "uniform"}

# Every health rule off: the plain EMA quantizer of Sonnet's VectorQuantizerEMA (an empty rule list).
HEALTH_RULES_OFF = dict(ema_warmup=False, fit_weight_steps=1, kmeans_init_iters=0, affine_reparam=False,
                        dead_code_threshold=0.0)
