"""Nearest-code search, side by side: for x [N, D] and a codebook [K, D], each row's nearest code.

Providers
  triton-exact, triton-fast  `vq_kernels.nearest_code` on fp32 and bf16 inputs; both make one pass on the tensor cores
                             (fp16 operands, fp32 accumulation), and `exact` then rescores in fp32 the rows that
                             pass cannot certify: the floor of both is that of the fp16 pass (`bench.roofline`)
  torch-reference            `vq_kernels.reference.nearest_code`: the project's PyTorch path (chunked addmm + argmin,
                             centred, exact distances recomputed)
  eager-fp32, eager-bf16     the textbook formulation, written here: argmin_k(|c_k|^2 - 2 x.c_k) by addmm, in chunks
                             of 4096 rows (an N x K score matrix does not fit at the largest shapes)
  compile-fp32, compile-bf16 the same with each chunk's addmm + argmin under torch.compile
  flash-kmeans               flash-kmeans's Triton assignment kernel (bf16), where installed, on CUDA
  faiss-gpu                  FAISS GPU brute-force search with k = 1 (fp32), where installed, on CUDA
"""

import pytest
import torch
import vq_kernels
from vq_kernels import reference

from bench import harness, roofline
from bench.harness import Provider

CHUNK_ROWS = 4096

PROVIDERS = [
    Provider("triton-exact", "fp16", torch.float32, needs=("triton",)),
    Provider("triton-fast", "fp16", torch.bfloat16, needs=("triton",)),
    Provider("torch-reference", "fp32", torch.float32),
    Provider("eager-fp32", "fp32", torch.float32, heavy=True),
    Provider("eager-bf16", "bf16", torch.bfloat16, heavy=True),
    Provider("compile-fp32", "fp32", torch.float32, needs=("compile",), heavy=True),
    Provider("compile-bf16", "bf16", torch.bfloat16, needs=("compile",), heavy=True),
    Provider("flash-kmeans", "bf16", torch.bfloat16, needs=("flash_kmeans",),
             cuda_only="flash-kmeans's assignment kernel needs CUDA"),
    Provider("faiss-gpu", "fp32", torch.float32, needs=("faiss",), cuda_only="FAISS GPU search needs CUDA"),
]


def _scores_argmin(rows, codes_t, code_sqnorm):
    # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, and |x|^2 does not change which code is nearest.
    return torch.addmm(code_sqnorm, rows, codes_t, alpha=-2.0).argmin(dim=1)


def _chunked_search(x, codebook, chunk_fn):
    code_sqnorm = codebook.float().square().sum(dim=1).to(codebook.dtype)
    codes_t = codebook.T
    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        indices[start : start + CHUNK_ROWS] = chunk_fn(x[start : start + CHUNK_ROWS], codes_t, code_sqnorm)
    return indices


def _flash_kmeans(x, codebook):
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton  # noqa: PLC0415

    x_sq = x.float().square().sum(dim=1)
    return euclid_assign_triton(x[None], codebook[None], x_sq[None])


def _faiss_search():
    import faiss  # noqa: PLC0415
    import faiss.contrib.torch_utils  # noqa: F401, PLC0415  (lets faiss.knn_gpu take CUDA tensors)

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("the installed faiss is a CPU build; FAISS GPU search needs faiss-gpu")
    resources = faiss.StandardGpuResources()
    return lambda x, codebook: faiss.knn_gpu(resources, x, codebook, 1)


def search_fn(provider: Provider):
    name = provider.name
    if name.startswith("triton-"):
        return lambda x, codebook: vq_kernels.nearest_code(x, codebook, name.removeprefix("triton-"))
    if name == "torch-reference":
        return reference.nearest_code
    if name.startswith("eager-"):
        return lambda x, codebook: _chunked_search(x, codebook, _scores_argmin)
    if name.startswith("compile-"):
        return lambda x, codebook: _chunked_search(x, codebook, harness.compiled(_scores_argmin))
    if name == "flash-kmeans":
        return _flash_kmeans
    if name == "faiss-gpu":
        return _faiss_search()
    raise ValueError(f"unknown provider {name!r}")


def make_case(provider: Provider, shape, device: str):
    """Random x and codebook in the provider's dtype, and its search."""
    x = torch.randn(shape.n, shape.d, device=device).to(provider.dtype)
    codebook = torch.randn(shape.k, shape.d, device=device).to(provider.dtype)
    return search_fn(provider), lambda: (x, codebook)


NEAREST_CODE = harness.Operation(
    "nearest_code", tuple(PROVIDERS), make_case,
    cost=lambda shape, itemsize: roofline.nearest_code_cost(shape.n, shape.k, shape.d, itemsize))


@pytest.mark.parametrize("provider, shape", harness.cases(PROVIDERS))
def test_nearest_code(benchmark, provider, shape):
    harness.benchmark_case(benchmark, NEAREST_CODE, provider, shape)


@pytest.mark.parametrize("provider, shape", harness.cases(PROVIDERS, large_codebooks=True))
def test_nearest_code_large_codebook(benchmark, provider, shape):
    harness.benchmark_case(benchmark, NEAREST_CODE, provider, shape)
