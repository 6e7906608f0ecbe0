"""A residual quantizer's training step, with 4 and 8 layers, against vector-quantize-pytorch's ResidualVQ.

A step is what `bench.quantizer_step` measures for one layer, for the stack: the forward pass in train mode (every
layer's search, commitment loss, EMA update and dead-code restarts where the provider has them), then the backward
pass of the summed commitment losses plus a stand-in for the decoder's loss (the mean square of the quantized
output). x is (B, 1024, D): B images of 32 x 32 latents, channels last.

Providers: those of `bench.quantizer_step` with `layers`: ResidualVectorQuantizer on Triton and on PyTorch (its
layers' defaults, and "torch-peer-ema", the peer's EMA as the ResidualVQ adapter runs it), and vector-quantize-pytorch's
ResidualVQ.

Shapes: the seed shape (N = 65536, D = 256) with K = 1024 and 4096 codes per layer. On the CPU the peer and the
larger cases run at N = 16384 (16 images), and cases above 8 layers x 16384 x 1024 x 256 multiply-adds are left to
the providers that need no N x K matrix. `test_residual_step_against_vector_quantize_pytorch` holds the CPU target:
at N = 16384, K = 1024, D = 256 and 8 layers, at least 3x faster than ResidualVQ with at most a quarter of its peak
memory.

`python -m bench.quantizer_step --provider torch --layers 8 --n 16384 --k 1024 --d 256` prints, as JSON, the peak
memory of one step in a fresh process.
"""

import pytest

from bench import harness, roofline
from bench.harness import Provider, Shape
from bench.quantizer_step import make_step
from bench.test_bench_quantizer import check_against_peer

PROVIDERS = [
    # Both searches run on the tensor cores in fp16 (`exact` then rescores in fp32 what that pass cannot certify).
    Provider("triton-exact", "fp16", needs=("triton",)),
    Provider("triton-fast", "fp16", needs=("triton",)),
    Provider("torch", "fp32"),
    Provider("torch-peer-ema", "fp32"),
    # Per layer: distances, one-hot (float and int64) and cdist's temporaries, ~20 bytes per element of N x K.
    Provider("vector-quantize-pytorch", "fp32", needs=("vector_quantize_pytorch",), heavy=True, bytes_per_nk=20),
]
LAYERS = (4, 8)
TARGET = Shape(16384, 1024, 256)
TARGET_LAYERS = 8
if harness.ON_CUDA:
    SHAPES = [Shape(65536, 1024, 256), Shape(65536, 4096, 256)]
else:
    SHAPES = [TARGET, Shape(16384, 4096, 256), Shape(65536, 1024, 256)]
# On the CPU, a heavy provider's case is skipped above the target's work (layers x N x K x D multiply-adds).
CPU_MAX_WORK = TARGET_LAYERS * TARGET.n * TARGET.k * TARGET.d

# Targets of the torch path against vector-quantize-pytorch, on the CPU, at TARGET with TARGET_LAYERS layers.
MIN_SPEEDUP = 3.0
MAX_MEMORY_RATIO = 0.25
TARGET_ROUNDS = 5


def cases() -> list:
    params = []
    for shape in SHAPES:
        for layers in LAYERS:
            for provider in PROVIDERS:
                reason = skip_reason(provider, shape, layers)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param(provider, shape, layers, id=f"{provider}-{shape}-L{layers}", marks=marks))
    return params


def skip_reason(provider: Provider, shape: Shape, layers: int) -> str | None:
    if (why := harness.skip_reason(provider, shape)) is not None:
        return why
    if provider.heavy and not harness.ON_CUDA and layers * shape.n * shape.k * shape.d > CPU_MAX_WORK:
        return f"too slow on the CPU at {shape} with {layers} layers; {TARGET} with {TARGET_LAYERS} stands in"
    if not harness.ON_CUDA and shape.n > TARGET.n and provider.name != "torch":
        return f"the CPU runs {shape.n} rows for the torch provider only"
    return None


@pytest.mark.parametrize("provider, shape, layers", cases())
def test_residual_step(benchmark, sync, device, provider, shape, layers):
    benchmark.group = f"residual_step {shape} L{layers}"
    step = make_step(provider.name, shape.n, shape.k, shape.d, device, layers)
    median = harness.run_benchmark(benchmark, step, sync=sync)
    mem = harness.peak_memory(step) if median is not None else None
    cost = roofline.quantizer_step_cost(shape.n, shape.k, shape.d, itemsize=4, layers=layers)
    harness.record(benchmark, provider, shape, cost, median, mem)
    benchmark.extra_info["layers"] = layers


@pytest.mark.skipif(not harness.installed("vector_quantize_pytorch"), reason="vector_quantize_pytorch is not installed")
def test_residual_step_against_vector_quantize_pytorch(benchmark):
    """ResidualVectorQuantizer(backend="torch") with 8 layers takes at most a third of the time and a quarter of
    the peak memory of ResidualVQ for the same training step on the CPU, at N = 16384, K = 1024, D = 256
    (measured as `test_bench_quantizer.check_against_peer` says)."""
    check_against_peer(benchmark, TARGET, layers=TARGET_LAYERS, rounds=TARGET_ROUNDS, min_speedup=MIN_SPEEDUP,
                       max_memory_ratio=MAX_MEMORY_RATIO)
