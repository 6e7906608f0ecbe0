"""Benchmark-wide setup: the Triton switch, the device in the report header, the roofline's ceilings.

Without CUDA, Triton's interpreter has to be chosen before any module defining a `@triton.jit` kernel is imported
(as in tests/conftest.py), so the benchmark files can import `vq_kernels` at all. Their Triton cases are then skipped:
the interpreter is a correctness tool, and its timings would mean nothing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench import harness, roofline  # noqa: E402


def pytest_report_header(config):
    triton = "Triton cases run" if harness.ON_CUDA else f"Triton cases skipped ({harness.TRITON_SKIP})"
    return [f"bench device: {roofline.device_name(harness.DEVICE)}; {triton}",
            f"bench shapes: {', '.join(map(str, harness.SHAPES))}"]


@pytest.fixture(scope="session", autouse=True)
def _ceilings(request):
    """Measure the roofline's ceilings once, before any case runs (and, with BENCH_QUIET_WAIT_S, on a quiet
    machine), rather than in the middle of whichever case first needs them."""
    session = getattr(request.config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    harness.wait_for_quiet()
    roofline.measure_ceilings(harness.DEVICE)


@pytest.fixture
def sync():
    """Call at the end of every timed function: on CUDA it waits for the queued kernels, on the CPU it is a no-op."""
    return harness.synchronize


@pytest.fixture
def device() -> str:
    return harness.DEVICE


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
