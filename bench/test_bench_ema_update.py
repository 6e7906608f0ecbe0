"""EMA codebook update, side by side: one batch's per-code counts and sums blended into the EMA state; and its two
steps alone, the statistics (`code_stats`) and the blend (`ema_blend_`).

Every round starts from a fresh copy of the same state (the update is in place), made untimed in the setup.

Providers of the update
  triton, triton-deterministic  `vq_kernels.ema_update_` with atomics, and with the sorted, bit-reproducible reduction
  torch-reference               `vq_kernels.reference.ema_update_`: index_add_ statistics and the blend
  compile-reference             the same under torch.compile
  onehot                        the classic peer formulation, written here: counts and sums from an N x K one-hot
                                matrix (counts = onehot.sum(0), sums = onehot.T @ x), then the reference blend
  vector-quantize-pytorch       the package's own EMA update of its codebook (`update_indices`), which is one-hot
Providers of the steps: triton (and triton-deterministic for the statistics) and torch-reference.
"""

import pytest
import torch
import torch.nn.functional as F
import vq_kernels
from vq_kernels import reference

from bench import harness, roofline
from bench.harness import Provider

DECAY, EPS = 0.99, 1e-5

PROVIDERS = [
    Provider("triton", "fp32", needs=("triton",)),
    Provider("triton-deterministic", "fp32", needs=("triton",)),
    Provider("torch-reference", "fp32"),
    Provider("compile-reference", "fp32", needs=("compile",)),
    # int64 one-hot, then its float copy: 12 bytes per element of the N x K matrix.
    Provider("onehot", "fp32", heavy=True, bytes_per_nk=12),
    Provider("vector-quantize-pytorch", "fp32", needs=("vector_quantize_pytorch",), heavy=True, bytes_per_nk=12),
]


def _onehot_update_(x, indices, cluster_size, embed_sum, codebook, decay, eps):
    onehot = F.one_hot(indices, cluster_size.shape[0]).to(x.dtype)
    counts = onehot.sum(dim=0)
    sums = onehot.T @ x
    reference.ema_blend_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
    return counts


def _vector_quantize_pytorch(shape, device):
    """The package's codebook module and an update function of the common signature that writes the state into it."""
    from vector_quantize_pytorch import VectorQuantize  # noqa: PLC0415

    codebook_module = VectorQuantize(dim=shape.d, codebook_size=shape.k, decay=DECAY, eps=EPS,
                                     kmeans_init=False).to(device).train()._codebook

    def update_(x, indices, cluster_size, embed_sum, codebook, decay, eps):
        # Its state is [heads, K] and [heads, K, D]; the copies in are part of setup's work, done here to keep
        # one signature, and cost O(K D), small next to the update's O(N K D).
        codebook_module.cluster_size.copy_(cluster_size[None])
        codebook_module.embed_avg.copy_(embed_sum[None])
        codebook_module.update_indices(x, indices)

    return update_


STEP_PROVIDERS = [
    Provider("triton", "fp32", needs=("triton",)),
    Provider("triton-deterministic", "fp32", needs=("triton",)),
    Provider("torch-reference", "fp32"),
]
BLEND_PROVIDERS = [provider for provider in STEP_PROVIDERS if provider.name != "triton-deterministic"]


def update_fn(provider: Provider, shape, device):
    name = provider.name
    if name in ("triton", "triton-deterministic"):
        deterministic = name == "triton-deterministic"

        def update_(*args):
            # validate_indices=False: the indices come from the search, as in the quantizer (no device-side assert).
            return vq_kernels.ema_update_(*args, deterministic=deterministic, validate_indices=False)

        return update_
    if name == "torch-reference":
        return reference.ema_update_
    if name == "compile-reference":
        return harness.compiled(reference.ema_update_)
    if name == "onehot":
        return _onehot_update_
    if name == "vector-quantize-pytorch":
        return _vector_quantize_pytorch(shape, device)
    raise ValueError(f"unknown provider {name!r}")


def _batch(shape, device):
    """A batch x with random code indices, and an EMA state of about N / K rows a code."""
    x = torch.randn(shape.n, shape.d, device=device)
    indices = torch.randint(0, shape.k, (shape.n,), device=device)
    cluster_size = torch.full((shape.k,), shape.n / shape.k, device=device)
    embed_sum = torch.randn(shape.k, shape.d, device=device) * cluster_size[:, None]
    return x, indices, cluster_size, embed_sum


def _fresh_state(cluster_size, embed_sum):
    return lambda: (cluster_size.clone(), embed_sum.clone(), torch.empty_like(embed_sum))


def make_update_case(provider: Provider, shape, device: str):
    x, indices, cluster_size, embed_sum = _batch(shape, device)
    state = _fresh_state(cluster_size, embed_sum)
    return update_fn(provider, shape, device), lambda: (x, indices, *state(), DECAY, EPS)


def make_stats_case(provider: Provider, shape, device: str):
    x, indices, _, _ = _batch(shape, device)
    if provider.name == "torch-reference":
        return reference.code_stats, lambda: (x, indices, shape.k)
    deterministic = provider.name == "triton-deterministic"

    def stats(x, indices, num_codes):
        return vq_kernels.code_stats(x, indices, num_codes, deterministic=deterministic, validate_indices=False)

    return stats, lambda: (x, indices, shape.k)


def make_blend_case(provider: Provider, shape, device: str):
    x, indices, cluster_size, embed_sum = _batch(shape, device)
    counts, sums = reference.code_stats(x, indices, shape.k)
    state = _fresh_state(cluster_size, embed_sum)
    blend_ = reference.ema_blend_ if provider.name == "torch-reference" else vq_kernels.ema_blend_
    return blend_, lambda: (*state(), counts, sums, DECAY, EPS)


EMA_UPDATE = harness.Operation(
    "ema_update", tuple(PROVIDERS), make_update_case,
    cost=lambda shape, itemsize: roofline.ema_update_cost(shape.n, shape.k, shape.d, itemsize))
CODE_STATS = harness.Operation(
    "code_stats", tuple(STEP_PROVIDERS), make_stats_case,
    cost=lambda shape, itemsize: roofline.code_stats_cost(shape.n, shape.k, shape.d, itemsize))
EMA_BLEND = harness.Operation(
    "ema_blend_", tuple(BLEND_PROVIDERS), make_blend_case,
    cost=lambda shape, itemsize: roofline.ema_blend_cost(shape.k, shape.d))


@pytest.mark.parametrize("provider, shape", harness.cases(PROVIDERS))
def test_ema_update(benchmark, provider, shape):
    harness.benchmark_case(benchmark, EMA_UPDATE, provider, shape)


@pytest.mark.parametrize("provider, shape", harness.cases(STEP_PROVIDERS, shapes=[harness.SEED]))
def test_code_stats(benchmark, provider, shape):
    harness.benchmark_case(benchmark, CODE_STATS, provider, shape)


@pytest.mark.parametrize("provider, shape", harness.cases(BLEND_PROVIDERS, shapes=[harness.SEED]))
def test_ema_blend(benchmark, provider, shape):
    harness.benchmark_case(benchmark, EMA_BLEND, provider, shape)
