"""The codebook's health rules (vqvae/quantizer/health.py): each one on a stream built to need it, against the
quantizer without it, and the whole set on an encoder-like stream that collapses the plain quantizer
(HEALTH_RULES_OFF)."""

import pytest
import torch
from vq_kernels import reference

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.health import HEALTH_RULES_OFF, AffineReparam, KMeansInit

K, D = 24, 8


def _batch(step, rank, rows=40):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1000 * step + rank))


BACKENDS = ["torch", "triton"]
INIT_STEPS = 16  # the default fit weight (fit_weight_steps)
MOMENT_STEPS, MOMENT_ROWS = AffineReparam.STEPS, AffineReparam.ROWS


def _clusters(num, dim, separation, device, generator=None):
    return torch.randn(num, dim, device=device, generator=generator) * separation


def _around(centres, rows_per_centre, noise, device):
    picks = torch.arange(centres.shape[0], device=device).repeat_interleave(rows_per_centre)
    return centres[picks] + noise * torch.randn(picks.shape[0], centres.shape[1], device=device)


def test_warmup_decay_rises_from_near_zero_to_the_configured_decay(device):
    quantizer = VectorQuantizer(8, 4, decay=0.99).to(device)  # (1 + t) / (200 + t), at most 0.99
    expected = {0: 0.005, 198: 0.5, 600: 601 / 800, 19700: 0.99, 50000: 0.99}
    for steps, decay in expected.items():
        quantizer.codebook.ema_steps.fill_(steps)
        assert quantizer.codebook.current_decay().device.type == torch.device(device).type
        assert abs(quantizer.codebook.current_decay().item() - decay) < 1e-6, steps
    quantizer = VectorQuantizer(8, 4, decay=0.99, ema_warmup_steps=10).to(device)
    quantizer.codebook.ema_steps.fill_(80)
    assert abs(quantizer.codebook.current_decay().item() - 0.9) < 1e-6
    quantizer = VectorQuantizer(8, 4, decay=0.99, ema_warmup=False).to(device)
    assert abs(quantizer.codebook.current_decay().item() - 0.99) < 1e-7
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="ema_warmup_steps must be (an int >= 1|int, got)"):
            VectorQuantizer(8, 4, ema_warmup_steps=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_lets_the_codebook_follow_an_early_shift(backend, device):
    """Right after initialisation the data moves (as an encoder's outputs do early in training): with the warm-up
    the codes reach it within ten steps; at a constant decay of 0.99 they have moved a tenth of the way."""
    centres = _clusters(8, 6, 10.0, device)
    shift = torch.full((6,), 0.5, device=device)  # far smaller than the separation: the assignments stay the same
    gaps = {}
    for warmup in (True, False):
        # one code per cluster (k-means++), and no affine re-parameterisation (it would follow the shift too)
        quantizer = VectorQuantizer(8, 6, backend=backend, ema_warmup=warmup, dead_code_threshold=0.0,
                                       affine_reparam=False, init="kmeans++").to(device)
        quantizer(_around(centres, 16, 0.01, device))
        for _ in range(10):
            quantizer(_around(centres + shift, 16, 0.01, device))
        order = reference.nearest_code(centres + shift, quantizer.codebook.codes)[0]
        gaps[warmup] = (quantizer.codebook.codes[order] - (centres + shift)).norm(dim=1).max().item()
    assert gaps[True] < 0.05 * shift.norm().item() < gaps[False] / 10, gaps


def test_a_long_warmup_keeps_the_codes_on_clusters_that_keep_moving(device):
    """16 clusters that each move their own way, half their width every 4 steps, for 80 steps (no frame can follow
    that, and restarts are off): with the default warm-up (W = 200) the codes stay on them; with W = 10 the decay
    is 0.8-0.9 over steps 40-80 and the codes trail their clusters, doubling the quantization error."""
    error = {}
    for warmup_steps in (200, 10):
        runs = []
        for _ in range(3):
            centres = torch.randn(16, 8, device=device) * 20  # far apart: no two cross paths (at * 8 some did)
            velocity = torch.randn(16, 8, device=device) * 0.05
            quantizer = VectorQuantizer(16, 8, backend="torch", init="kmeans++", dead_code_threshold=0.0,
                                           affine_reparam=False, ema_warmup_steps=warmup_steps).to(device)
            losses = [quantizer(_around(centres + step * velocity, 32, 0.3, device)).loss.item()
                      for step in range(80)]
            runs.append(sum(losses[40:]) / 40 / 0.25 / 0.09)  # in units of the clusters' own variance
        error[warmup_steps] = sorted(runs)[1]  # the median run
    assert error[200] < 1.4 < 1.7 < error[10], error


def test_kmeans_iterations_put_each_code_on_its_clusters_mean_with_its_count(device):
    """8 far-apart clusters of unequal sizes, one k-means++ seed in each: 10 Lloyd iterations move every code to its
    cluster's mean and give it the cluster's size as its count; without them the codes stay on single rows."""
    centres = _clusters(8, 6, 50.0, device)
    sizes = [100, 60, 37, 23, 13, 9, 5, 3]
    # Tight clusters: at a spread of 0.5, k-means++ put two seeds in one cluster in ~6% of draws (the D^2 weight of
    # 250 rows' spread against one small cluster far away), and no Lloyd iteration moves a seed across clusters.
    rows = torch.cat([centres[i] + 0.05 * torch.randn(n, 6, device=device) for i, n in enumerate(sizes)])
    means = torch.stack([part.mean(dim=0) for part in rows.split(sizes)])
    for iters in (10, 0):
        quantizer = VectorQuantizer(8, 6, backend="torch", init="kmeans++", kmeans_init_iters=iters).to(device)
        quantizer.codebook.initialise_(rows)
        cluster = reference.nearest_code(quantizer.codebook.codes, centres)[0]
        assert sorted(cluster.tolist()) == list(range(8))
        gap = (quantizer.codebook.codes - means[cluster]).norm(dim=1).max().item()
        if iters:
            assert gap < 1e-4, gap
            assert quantizer.codebook.recent_count.tolist() == [float(sizes[c]) for c in cluster.tolist()]
            # the warm-up's EMA takes the fit as INIT_STEPS steps of its rows
            torch.testing.assert_close(quantizer.codebook.cluster_size, quantizer.codebook.recent_count * INIT_STEPS)
            torch.testing.assert_close(quantizer.codebook.embed_sum, quantizer.codebook.codes * quantizer.codebook.cluster_size[:, None])
        else:
            assert gap > 0.05, gap  # a single row sits ~0.05 * sqrt(6) from its cluster's mean
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="kmeans_init_iters must be (an int >= 0|int, got)"):
            VectorQuantizer(8, 6, kmeans_init_iters=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_moves_the_codes_it_would_leave_dead_into_the_most_used_ones(backend, device):
    """Half of 16 seeds far from every row: Lloyd iterations alone never give them a row, and the first step would
    find them dead. Moved, between iterations, onto rows drawn in proportion to their code's count, they end inside
    the data and split its codes: every code holds at least the threshold's rows."""
    rows = 3.0 * torch.randn(960, 4, device=device)
    quantizer = VectorQuantizer(16, 4, backend=backend, dead_code_threshold=2.0).to(device)
    far = 1000.0 * torch.cat([torch.eye(4, device=device), -torch.eye(4, device=device)])
    with torch.no_grad():
        quantizer.codebook.codes.copy_(torch.cat([rows[:8], far]))
        counts = KMeansInit(quantizer.options.kmeans_init_iters)._fit_(quantizer.codebook, rows)
    assert (counts >= 2.0).all(), counts
    assert counts.sum().item() == rows.shape[0]
    assert (quantizer.codebook.codes.norm(dim=1) < 20.0).all(), "a code stayed away from the data"


def test_the_warmup_keeps_sixteen_rows_per_code_in_the_average_at_small_batches(device):
    """With few rows a step, a warm-up decay near 0 would make a code's count one batch's draw (and every code
    that drew under the threshold dead): the decay is raised to 1 - rows / (K * 16)."""
    quantizer = VectorQuantizer(8, 4, decay=0.99).to(device)
    rows = lambda n: torch.tensor(float(n), device=device)  # noqa: E731
    assert abs(quantizer.codebook.current_decay(rows(32)).item() - 0.75) < 1e-6  # 32 rows = 4 per code
    assert abs(quantizer.codebook.current_decay(rows(10 ** 6)).item() - 0.005) < 1e-6  # many rows: the warm-up's own
    quantizer.codebook.ema_steps.fill_(10 ** 5)
    assert abs(quantizer.codebook.current_decay(rows(1)).item() - 0.99) < 1e-6  # never above `decay`


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_codes_are_reseeded_where_the_most_used_codes_are(backend, device):
    """One code takes 960 rows of a wide cluster; 64 codes take one row each of another. A re-seed drawn from
    rows uniformly would land in the second cluster one time in 16 (~28 of the 447 dead codes); drawn in proportion
    to the count of the row's code, ~0.03 of them do: the new codes split the code that is overused."""
    num_codes, dim = 512, 4
    heavy = 3.0 * torch.randn(960, dim, device=device)
    light_centre = torch.full((dim,), 100.0, device=device)
    light = light_centre + torch.randn(64, dim, device=device)
    rows = torch.cat([heavy, light])
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, dead_code_threshold=1.0,
                                   affine_reparam=False).to(device)
    quantizer(rows)  # initialises; the state is then set by hand
    with torch.no_grad():
        # the dead codes: far from every row (not so far that the search's fp32 rounding blurs the light rows)
        quantizer.codebook.codes.copy_(-100.0 + torch.randn(num_codes, dim, device=device))
        quantizer.codebook.codes[0] = heavy.mean(dim=0)
        quantizer.codebook.codes[1:65] = light
        quantizer.codebook.cluster_size.fill_(0.01)
        quantizer.codebook.cluster_size[0], quantizer.codebook.cluster_size[1:65] = 960.0, 2.0
        quantizer.codebook.recent_count.copy_(quantizer.codebook.cluster_size)
        quantizer.codebook.embed_sum.copy_(quantizer.codebook.codes * quantizer.codebook.cluster_size[:, None])
    before = quantizer.codebook.codes.clone()
    out = quantizer(rows)
    assert out.dead_codes.item() == num_codes - 65
    moved = (quantizer.codebook.codes[65:] - before[65:]).norm(dim=1) > 10.0  # (the others shrink a little: EMA)
    reseeded = quantizer.codebook.codes[65:][moved]
    # 447 draws with replacement from ~960 rows repeat about 90 of them: one code per row, the rest wait a step
    assert 300 <= reseeded.shape[0] <= num_codes - 65, reseeded.shape[0]
    assert (reseeded[:, None] == rows[None]).all(dim=-1).any(dim=1).all(), "re-seeded codes lie on batch rows"
    assert torch.unique(reseeded, dim=0).shape[0] == reseeded.shape[0], "two codes re-seeded on one row"
    in_light = ((reseeded - light_centre).norm(dim=1) < 10.0).sum().item()
    assert in_light <= 2, f"{in_light} of {reseeded.shape[0]} re-seeds landed among the rarely used codes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_draws_reseed_where_rows_sit_far_from_their_code_and_never_on_held_copies(backend, device):
    """960 copies of one vector (a flat background) sit exactly on code 0; 64 rows scatter around another code. Draws
    by usage would put nearly every new code on the copies, which code 0 already holds (the new codes would then tie
    with it, lose, and die again); draws by error take only the scattered rows."""
    num_codes, dim = 256, 4
    flat = torch.full((960, dim), 2.0, device=device)
    scatter_centre = torch.full((dim,), -20.0, device=device)
    scattered = scatter_centre + 3.0 * torch.randn(64, dim, device=device)
    rows = torch.cat([flat, scattered])
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, dead_code_threshold=1.0, affine_reparam=False,
                                   restart_draws="error").to(device)
    quantizer(rows)
    with torch.no_grad():
        quantizer.codebook.codes.copy_(100.0 + torch.randn(num_codes, dim, device=device))
        quantizer.codebook.codes[0], quantizer.codebook.codes[1] = flat[0], scatter_centre
        quantizer.codebook.cluster_size.fill_(0.01)
        quantizer.codebook.cluster_size[0], quantizer.codebook.cluster_size[1] = 960.0, 64.0
        quantizer.codebook.recent_count.copy_(quantizer.codebook.cluster_size)
        quantizer.codebook.embed_sum.copy_(quantizer.codebook.codes * quantizer.codebook.cluster_size[:, None])
    before = quantizer.codebook.codes.clone()
    quantizer(rows)
    moved = (quantizer.codebook.codes[2:] - before[2:]).norm(dim=1) > 10.0
    reseeded = quantizer.codebook.codes[2:][moved]
    on_scattered = (reseeded[:, None] == scattered[None]).all(dim=-1).any(dim=1)
    assert on_scattered.all(), f"{(~on_scattered).sum().item()} of {reseeded.shape[0]} re-seeds missed the scattered rows"
    # 254 dead codes, 64 rows to seed them: each row drawn seeds one code (254 draws in proportion to the error
    # leave ~7 of the 64 undrawn, rarely more than 11)
    assert torch.unique(reseeded, dim=0).shape[0] == reseeded.shape[0] >= 40, reseeded.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_codebook_larger_than_a_batch_fills_within_a_few_steps_without_copies(backend, device):
    """512 codes, 64 fresh rows a step. The first batch seeds 64 codes; the other 448 start dead (copies would tie
    with their originals and lose every row) and take distinct rows of the next batches, one code per row: within
    ten steps every code has been seeded, and over steps 21-50 (1,920 rows) nearly every code is chosen. (Seeded
    as copies and re-seeded with repeats, as before, 44% were.)"""
    num_codes, dim, rows = 512, 4, 64
    generator = torch.Generator(device=device).manual_seed(3)
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, dead_code_threshold=0.25 * rows / num_codes,
                                   affine_reparam=False).to(device)
    first = torch.randn(rows, dim, device=device, generator=generator)
    quantizer(first)
    assert (quantizer.codebook.cluster_size[rows:] == 0).all(), "codes beyond the batch's rows start dead"
    chosen = torch.zeros(num_codes, dtype=torch.bool, device=device)
    for step in range(2, 51):
        out = quantizer(torch.randn(rows, dim, device=device, generator=generator))
        if step == 10:
            assert out.dead_codes.item() < 0.05 * num_codes, out.dead_codes.item()
        if step > 20:
            chosen[out.indices] = True
    assert torch.unique(quantizer.codebook.codes, dim=0).shape[0] == num_codes, "two codes hold the same vector"
    assert chosen.float().mean().item() >= 0.9, chosen.float().mean().item()


def test_with_more_codes_than_rows_an_abandoned_code_is_moved_within_two_hundred_steps(device):
    """512 codes, 64 rows a step (threshold: a quarter of the fair share, 1/32 row). The data jumps to a far region
    for 19 steps (the codes are re-seeded there), then back: the codes left in the far region win no rows and must
    be found dead and moved. A re-seeded code starts with its fair share (1/8 row), so at the memory floor's decay
    (0.992) it is dead after ~180 steps; with the former floor of one row it took ~340. (The rule is the same on
    both backends: the PyTorch one, for speed.)"""
    num_codes, dim, rows, backend = 512, 4, 64, "torch"
    generator = torch.Generator(device=device).manual_seed(5)
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, dead_code_threshold=0.25 * rows / num_codes,
                                   affine_reparam=False).to(device)
    batch = lambda shift: torch.randn(rows, dim, device=device, generator=generator) + shift  # noqa: E731
    quantizer(batch(0.0))
    for _ in range(2, 21):
        quantizer(batch(50.0))
    far = lambda: ((quantizer.codebook.codes - 50.0).norm(dim=1) < 10).sum().item()  # noqa: E731
    assert far() > 0.8 * num_codes
    for step in range(21, 251):
        quantizer(batch(0.0))
        if far() == 0:
            break
    assert far() == 0, f"{far()} codes still wait in the far region at step 250"


def _growing_stream(step, device, dim=8, rows=512, generator=None):
    """Encoder-like outputs: a cloud of 32 directions whose mean drifts and whose spread grows tenfold over 40
    steps, as the seed configuration's encoder outputs do in its first hundred steps."""
    centres = _clusters(32, dim, 1.0, "cpu", generator=torch.Generator().manual_seed(1)).to(device)
    scale = 0.1 * 10 ** min(step / 40, 1.0)
    shift = 0.03 * step * torch.ones(dim, device=device)
    picks = torch.randint(32, (rows,), device=device, generator=generator)
    noise = torch.randn(rows, dim, device=device, generator=generator) * 0.3
    return scale * (centres[picks] + noise) + shift


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_reparam_keeps_the_codes_on_a_drifting_growing_cloud(backend, device):
    """With dead-code restarts off, so that nothing else rescues them: codes averaged in standardised coordinates
    follow the cloud's drift and growth, used or not; plain codes (even warmed up) are left inside it and fewer stay
    in use. (The frame averages over MOMENT_STEPS batches, so it lags a cloud that grows 6% a step; following each
    batch alone it would keep 95% in use here, but it chases the content of real batches, see the test below.)"""
    usage = {}
    for affine in (True, False):
        torch.manual_seed(0)
        quantizer = VectorQuantizer(64, 8, backend=backend, affine_reparam=affine, dead_code_threshold=0.0
                                       ).to(device)
        outs = [quantizer(_growing_stream(step, device)) for step in range(60)]
        usage[affine] = min(out.usage.item() for out in outs[40:])
    assert usage[True] > usage[False] + 0.12 and usage[False] < 0.5, usage


def _half_of_the_clusters(centres, rows=512):
    """A batch drawn from a random half of the clusters: its mean and spread depend on which half it drew (as a
    batch of a few photographs' crops depends on the photographs), though no cluster moved."""
    half = torch.randperm(centres.shape[0], device=centres.device)[: centres.shape[0] // 2]
    picks = half[torch.randint(len(half), (rows,), device=centres.device)]
    return centres[picks] + 0.3 * torch.randn(rows, centres.shape[1], device=centres.device)


def test_the_frame_averages_over_batches_instead_of_chasing_each_ones_content(device, monkeypatch):
    """Fixed clusters, batches of varying content, and a slow codebook (decay 0.99, no warm-up, no restarts), so
    that the frame is what moves the codes: averaged over 8 batches it leaves them near their clusters; following
    each batch alone (STEPS = 1) drags every code by the batch's difference of content."""
    error, default = {}, AffineReparam.STEPS
    for moment_steps in (default, 1):
        monkeypatch.setattr(AffineReparam, "STEPS", moment_steps)
        monkeypatch.setattr(AffineReparam, "ROWS", 1 if moment_steps == 1 else MOMENT_ROWS)
        ratios = []
        for _ in range(3):
            centres = torch.randn(16, 8, device=device) * 4
            quantizer = VectorQuantizer(16, 8, backend="torch", init="kmeans++", dead_code_threshold=0.0,
                                           ema_warmup=False).to(device)
            quantizer(_around(centres, 32, 0.3, device))
            losses = [quantizer(_half_of_the_clusters(centres)).loss.item() for _ in range(40)]
            # the squared quantization error per feature, in units of the clusters' own (0.3^2)
            ratios += [loss / 0.25 / 0.09 for loss in losses[5:]]
        error[moment_steps] = sum(ratios) / len(ratios)
    assert error[default] < 10 < error[1], error


def test_a_batch_weighs_in_the_frame_by_its_rows_up_to_one_in_moment_steps(device):
    """The frame's moments average over at least MOMENT_ROWS rows a code: a batch of few rows (a few images'
    crops, whose mean says more about the images drawn) weighs in proportion to its rows; a large one 1/8."""
    num_codes = 64
    for rows, weight in ((256, 256 / (num_codes * MOMENT_ROWS)), (4096, 1 / MOMENT_STEPS)):
        quantizer = VectorQuantizer(num_codes, 4, backend="torch", affine_reparam=True).to(device)
        first = torch.randn(512, 4, device=device)
        quantizer(first)  # initialises: the moments are the first batch's
        batch = 3.0 + torch.randn(rows, 4, device=device)
        quantizer(batch)
        expected = (1 - weight) * first.mean(dim=0) + weight * batch.mean(dim=0)
        torch.testing.assert_close(quantizer.codebook.data_mean, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_a_small_batch_the_first_fit_holds_its_place_and_unused_codes_die_as_soon(backend, device):
    """4 rows a code, so the warm-up's decay is floored at 0.75: the k-means fit enters the EMA as INIT_STEPS steps
    of its rows, so a code whose 8 rows of the next batch sit 0.5 off its fit moves 1/25 of the way (2/5 without
    that weight: a small batch would drag the fit to its own draw of content). The count that decides deadness starts
    from the fit's own counts: codes that the next batches leave unused are dead at the fourth step
    (4 * 0.75^3 < 2), as they would be without it."""
    num_codes, dim = 64, 6
    centres = _clusters(num_codes, dim, 50.0, device)
    quantizer = VectorQuantizer(num_codes, dim, backend=backend, init="kmeans++", affine_reparam=False,
                                   dead_code_threshold=2.0).to(device)
    quantizer.codebook.initialise_(_around(centres, 4, 0.1, device))
    assert quantizer.codebook.recent_count.tolist() == [4.0] * num_codes  # a code on each cluster
    torch.testing.assert_close(quantizer.codebook.cluster_size, torch.full_like(quantizer.codebook.cluster_size, 4.0 * INIT_STEPS))
    decay = quantizer.codebook.current_decay(torch.tensor(4.0 * num_codes, device=device)).item()
    assert abs(decay - 0.75) < 1e-6
    fit, used = quantizer.codebook.codes.clone(), torch.arange(num_codes // 2, device=device)
    shift = torch.full((dim,), 0.5, device=device)
    dead = []
    for _ in range(3):
        out = quantizer((fit[used] + shift).repeat_interleave(8, dim=0))  # 8 rows each: 4 a code of the batch
        dead.append(out.dead_codes.item())
        if len(dead) == 1:
            moved = (quantizer.codebook.codes[used] - fit[used]) / shift
            share = (1 - decay) * 8 / (decay * 4 * INIT_STEPS + (1 - decay) * 8)
            torch.testing.assert_close(moved, torch.full_like(moved, share), rtol=1e-3, atol=2e-4)
            still = quantizer.codebook.codes[num_codes // 2:]
            torch.testing.assert_close(still, fit[num_codes // 2:], rtol=1e-5, atol=1e-4)
    assert dead == [0, 0, num_codes // 2], dead


def test_dead_memory_keeps_codes_fed_a_few_rows_a_step_through_the_warmup_and_still_moves_unused_ones(device):
    """Threshold 4 rows a step; after the fit (16 rows a code), 8 codes get 2 rows a step (as codes on flat image
    areas do), 16 get 16, and 8 get none; the first step at which each group is found dead is read. Without the rule the count deadness reads follows the warm-up's
    decay (floored at 0.47 here): the codes fed 2 rows are dead at step 3. With a memory of 10 steps (decay 0.9)
    they live until 2 + 14 * 0.9^t < 4, step 19, and unused codes are still found, at step 14 (16 * 0.9^t < 4)."""
    num_codes, dim = 32, 4
    centres = _clusters(num_codes, dim, 50.0, device)
    few, unused = torch.arange(8, device=device), torch.arange(24, 32, device=device)
    first_dead = {}
    for memory in (0, 10):
        quantizer = VectorQuantizer(num_codes, dim, backend="torch", init="kmeans++", affine_reparam=False,
                                       dead_code_threshold=4.0, dead_code_memory=memory).to(device)
        quantizer.codebook.initialise_(_around(centres, 16, 0.1, device))
        codes = quantizer.codebook.codes.clone()
        batch = torch.cat([codes[:8].repeat_interleave(2, dim=0), codes[8:24].repeat_interleave(16, dim=0)])
        # The re-seeding is recorded, not done: a dead code drawn onto the rows of a "few" code would split them at
        # random, and the step at which that group dies would then depend on the draw.
        found = []
        quantizer.codebook.restarts.reseed_ = lambda book, dead, *rest: found.append(dead.clone())
        steps = {"few": None, "unused": None}
        for step in range(1, 25):
            quantizer(batch)
            dead = found[-1]  # the codes found dead by this step, before their re-seeding
            for name, group in (("few", few), ("unused", unused)):
                if steps[name] is None and dead[group].all():
                    steps[name] = step
        first_dead[memory] = steps
    assert first_dead[0] == {"few": 3, "unused": 2}, first_dead
    assert first_dead[10] == {"few": 19, "unused": 14}, first_dead


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_health_rules_survive_a_stream_that_collapses_the_plain_quantizer(backend, device):
    perplexities = {}
    for name, options in (("defaults", {}), ("plain", HEALTH_RULES_OFF)):
        torch.manual_seed(0)
        quantizer = VectorQuantizer(64, 8, backend=backend, **options).to(device)
        outs = [quantizer(_growing_stream(step, device)) for step in range(60)]
        perplexities[name] = min(out.perplexity.item() for out in outs[1:])
    assert perplexities["defaults"] > 25 and perplexities["plain"] < 10, perplexities


def test_accumulated_micro_batches_move_the_frame_each_but_average_once(device, fixed_start):
    """With affine_reparam the frame follows every micro-batch before it is searched (the codes move with it), but
    the EMA counts and sums take one step, when the block ends."""
    quantizer = fixed_start(VectorQuantizer(K, D, dead_code_threshold=0.0).to(device))
    quantizer(_batch(0, 0).to(device))  # measures the moments once
    sizes, steps = quantizer.codebook.cluster_size.clone(), quantizer.codebook.ema_steps.clone()
    with quantizer.accumulate():
        for rank in range(3):
            codes = quantizer.codebook.codes.clone()
            quantizer(_batch(1, rank).to(device) * (2 + rank))
            assert not torch.equal(quantizer.codebook.codes, codes), "the frame follows each micro-batch"
            assert torch.equal(quantizer.codebook.cluster_size, sizes) and torch.equal(quantizer.codebook.ema_steps, steps)
    assert quantizer.codebook.ema_steps == steps + 1 and not torch.equal(quantizer.codebook.cluster_size, sizes)
