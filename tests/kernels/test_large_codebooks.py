"""Codebooks far larger than a batch (16k-262k codes): the search stays exact at 2^18 + 3 codes on both
backends, and the PyTorch path's memory does not grow with rows x codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vq_kernels
from vq_kernels import reference

from bench.quantizer_step import reset_peak_rss

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("search", ["reference", "exact", "fast"])
def test_a_quarter_million_codes_are_searched_exactly(search, device, assert_nearest):
    """K = 2^18 + 3 (not a multiple of any tile), D = 19, a few rows: the chosen code is nearest in fp64 within
    the documented bound. Three rows are planted near the first, a middle and the last code, where a tile edge or a
    merge across tiles would lose them."""
    num_codes, dim = 2 ** 18 + 3, 19
    codebook = torch.randn(num_codes, dim, device=device)
    planted = torch.tensor([0, 2 ** 17 + 1, num_codes - 1], device=device)
    x = torch.cat([torch.randn(4, dim, device=device), codebook[planted] + 1e-3 * torch.randn(3, dim, device=device)])
    if search == "reference":
        indices, sq_dist = reference.nearest_code(x, codebook)
    else:
        indices = torch.full((x.shape[0],), -7, dtype=torch.int64, device=device)  # poison: each must be written
        sq_dist = torch.full((x.shape[0],), float("nan"), device=device)
        vq_kernels.nearest_code(x, codebook, search, out=(indices, sq_dist))
    assert_nearest(x, codebook, indices, sq_dist, "fast" if search == "fast" else "exact")
    assert indices[-3:].tolist() == planted.tolist()


# Run in a fresh process, so that nothing else moves its resident memory. Linux keeps the peak (VmHWM) and lets a
# process reset it (writing 5 to /proc/self/clear_refs): each rise is the peak during one call over the memory
# resident before it.
_MEASURE = """
import json, sys, torch
from bench.quantizer_step import proc_status_bytes, reset_peak_rss
from vq_kernels import reference
from vqvae.quantizer import VectorQuantizer

def rise(call):
    reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    call()
    return proc_status_bytes("VmHWM") - before

rows, codes, dim = (int(a) for a in sys.argv[1:4])
torch.manual_seed(0)
x, codebook = torch.randn(rows, dim), torch.randn(codes, dim)
reference.nearest_code(x[:8], codebook)  # the allocator's and the threads' first use
search = rise(lambda: reference.nearest_code(x, codebook))
quantizer = VectorQuantizer(codes, dim, backend="torch", affine_reparam=False,
                               dead_code_threshold=0.25 * rows / codes)
seeding = rise(lambda: quantizer(torch.randn(rows, dim)))
quantizer(torch.randn(rows, dim))
step = rise(lambda: quantizer(torch.randn(rows, dim)))  # search, statistics, EMA step, restarts
print(json.dumps({"search": search, "seeding": seeding, "step": step}))
"""


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to reset peak memory")
def test_the_pytorch_path_never_holds_rows_by_codes_scores():
    """4,096 rows against 65,536 codes: one fp32 score matrix would be 1 GiB, and one chunk of 1,024 rows by every
    code (the search before it tiled the codes) 256 MiB. The search, the seeding step and a steady training step
    must each raise the peak resident memory by less than 96 MiB (a 16 MiB score tile, the codebook's K x D state
    and its copies)."""
    rows, codes, dim = 4096, 65536, 8
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(rows), str(codes), str(dim)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rise = json.loads(done.stdout.strip().splitlines()[-1])
    limit = 96 * 2 ** 20
    for name in ("search", "seeding", "step"):
        assert rise[name] < limit, f"the {name} raised peak memory by {rise[name] / 2 ** 20:.0f} MiB"
