"""The Triton kernels compile for NVIDIA GPUs as their launches compile them, and fit the SM, checked on any machine.

The rest of the suite runs the kernels in Triton's interpreter when there is no GPU, and the interpreter accepts
some kernels that the compiler rejects or that need more shared memory than an SM has. `bench/compile_for_gpu.py`
compiles every launch the quantizer makes, specialised as Triton's launcher specialises it, in every autotune
configuration that the kernels' pruning keeps; it needs TRITON_INTERPRET unset, hence the subprocesses.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is what launches use today
    return subprocess.run([sys.executable, "-m", "bench.compile_for_gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.parametrize("arch, only", [(90, ""), (80, "N=65536")], ids=["sm_90", "sm_80-seed-shape"])
def test_kernels_compile_for_nvidia_gpus(arch, only):
    """Every launch compiles and every kept configuration fits the SM's shared memory (the script fails if not);
    on sm_90 every (mode, x dtype) at the seed shape and the odd shapes, on sm_80 at the seed shape."""
    result = _run("--arch", str(arch), "--only", only)
    assert result.returncode == 0, result.stdout + result.stderr
    kernels_seen = {name for name in ("_fast_kernel", "_exact_kernel", "_fallback_kernel", "_finish_kernel",
                                      "_prepare_kernel", "_code_stats_atomic_kernel", "_chunk_sums_kernel",
                                      "_combine_kernel", "_ema_blend_kernel") if name in result.stdout}
    assert len(kernels_seen) == 9, result.stdout
    if arch == 90:
        for dtype in ("float32", "bfloat16", "float16"):
            for precision in ("exact", "fast"):
                assert f"ok   sm_90 nearest_code {precision} x {dtype} N=65536 K=4096 D=256" in result.stdout


def test_compile_check_specialises_as_triton_launches():
    """One configuration, specialised by the script and by Triton's own launcher code: the same signature,
    constants and divisibility attributes, and the same registers and shared memory once compiled."""
    result = _run("--self-check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 differences" in result.stdout, result.stdout


def test_large_codebook_searches_compile_and_are_modelled():
    """The searches at 2^18 + 3 codes of 19 features (odd: not a tile multiple, D padded) compile in both modes,
    for 16,384 rows (one program per block of rows) and for 1,000 (8 blocks, each swept by 16 programs over ranges
    of the codes, then merged), and the static model predicts each kept configuration's time there (bench/NOTES.md,
    large codebooks)."""
    result = _run("--model", "--shapes", "16384,262147,19", "1000,262147,19")
    assert result.returncode == 0, result.stdout + result.stderr
    for n in (16384, 1000):
        for precision in ("exact", "fast"):
            assert f"ok   sm_90 nearest_code {precision} x float32 N={n} K=262147 D=19" in result.stdout
    for merge in ("_merge_kernel", "_fast_merge_kernel"):
        assert f"N=1000 K=262147 D=19: {merge}" in result.stdout, result.stdout
    predictions = [float(us) for us in re.findall(r"model: (\d+) us", result.stdout)]
    assert predictions and all(us > 0 for us in predictions), result.stdout
    calibrated = [float(us) for us in re.findall(r"calibrated on the H200 run: (\d+) us, \+-\d+%", result.stdout)]
    assert len(calibrated) == len(predictions) and all(c > p for c, p in zip(calibrated, predictions))
    assert "; 16 splits, " in result.stdout and "; 1 split, " in result.stdout, result.stdout
