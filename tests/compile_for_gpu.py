"""Compile every Triton kernel of `kernels` for an NVIDIA GPU, on any machine: no GPU is needed to compile.

    python tests/compile_for_gpu.py [--arch 90]

Triton's interpreter, which runs the kernels on the CPU in the tests, is lenient where the compiler is not (a
branch on a value it treats as constant, say): this catches such kernels before a GPU does. It must run without
TRITON_INTERPRET, which decides at import time what `@triton.jit` makes, so the test suite runs it as a
subprocess. Each case is one specialisation the launchers can produce; the autotuned kernel is compiled with the
largest and the smallest of its configurations.
"""

import argparse
import importlib
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402, F401  (imports the modules below)

NEAREST = sys.modules["kernels.nearest_code"]  # the package exports a function of the same name

I32 = "i32"
# Shared memory one block may use (opt-in maximum), by compute capability: a kernel that compiles but needs more
# fails at launch, and an autotuner whose every configuration does fails altogether.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
NEAREST_SIZES = {"N": I32, "K": I32, "D": I32, "stride_xn": I32, "stride_xd": I32, "stride_ck": I32, "stride_cd": I32}


def _nearest(x, prepared, d, precision):
    """The specialisation the launcher makes for D features: its block shape comes from the launcher itself."""
    block_d = NEAREST._block_d(d, precision)
    one_tile = d <= block_d
    precision = "tf32x3" if precision == "exact" else "tf32"
    pointers = {"x_ptr": f"*{x}", "code_ptr": f"*{x}", "prepared_ptr": f"*{prepared}", "code_sqnorm_ptr": "*fp32",
                "center_ptr": "*fp32", "index_ptr": "*i64", "sqdist_ptr": "*fp32"}
    constexprs = {"BLOCK_D": block_d, "ONE_D_TILE": one_tile, "PRECISION": precision, "UPCAST": False}
    return "kernels.nearest_code", "_nearest_code_kernel", {**pointers, **NEAREST_SIZES}, constexprs


CASES = {  # nearest_code: the rows on chip (small D) and in slices (large D), in each precision
    "nearest_code exact fp32, D = 64": _nearest("fp32", "fp32", 64, "exact"),
    "nearest_code exact bf16, D = 256": _nearest("bf16", "fp32", 256, "exact"),
    "nearest_code fast bf16, D = 256": _nearest("bf16", "bf16", 256, "fast"),
    "nearest_code fast fp16, D = 300": _nearest("fp16", "fp16", 300, "fast"),
    "code_stats atomics": (
        "kernels.code_stats", "_code_stats_atomic_kernel",
        {"x_ptr": "*bf16", "index_ptr": "*i64", "counts_ptr": "*fp32", "sums_ptr": "*fp32", "N": I32, "K": I32,
         "D": I32, "stride_xn": I32, "stride_xd": I32},
        {"BLOCK_N": 64, "BLOCK_D": 128}),
    "code_stats sorted (deterministic)": (
        "kernels.code_stats", "_code_stats_sorted_kernel",
        {"x_ptr": "*fp32", "order_ptr": "*i64", "run_start_ptr": "*i64", "counts_ptr": "*fp32", "sums_ptr": "*fp32",
         "D": I32, "stride_xn": I32, "stride_xd": I32},
        {"BLOCK_R": 16, "BLOCK_D": 128}),
    "ema_blend": (
        "kernels.ema_update", "_ema_blend_kernel",
        {"cluster_size_ptr": "*fp32", "embed_sum_ptr": "*fp32", "codebook_ptr": "*fp32", "counts_ptr": "*fp32",
         "sums_ptr": "*fp32", "decay_ptr": "*fp32", "rows_ptr": "*fp32", "total_ptr": "*fp32", "K": I32, "D": I32,
         "stride_ek": I32, "stride_ed": I32, "stride_ck": I32, "stride_cd": I32, "stride_sk": I32, "stride_sd": I32,
         "eps": "fp32"},
        {"BLOCK_K": 16, "BLOCK_D": 128}),
}


def _launch_options(kernel) -> list[tuple[dict, dict]]:
    """(meta-parameters, compile options) to build: the autotuner's largest and smallest config, or the defaults."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [({}, {"num_warps": 4, "num_stages": 3})]
    configs = sorted(kernel.configs, key=lambda c: (sum(c.kwargs.values()), c.num_warps, c.num_stages))
    return [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in (configs[-1], configs[0])]


def compile_all(arch: int) -> list[str]:
    """Compile each case; a case fails if a configuration does not compile, or if none fits in shared memory."""
    target, limit = GPUTarget("cuda", arch, 32), MAX_SHARED_BYTES[arch]
    failures = []
    for name, (module, attr, signature, constexprs) in CASES.items():
        kernel = getattr(importlib.import_module(module), attr)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        fitting = 0
        for meta, options in _launch_options(kernel):
            all_constexprs = {**constexprs, **meta}
            full_signature = {**signature, **{key: "constexpr" for key in all_constexprs}}
            label = f"{name} {meta or ''} {options}"
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=full_signature, constexprs=all_constexprs),
                                          target=target, options=options)
            except Exception as error:  # noqa: BLE001  (report every kernel, then fail)
                failures.append(f"{label}: {type(error).__name__}: {error}")
                print(f"FAIL sm_{arch} {label}: {error}")
                continue
            shared = compiled.metadata.shared
            fitting += shared <= limit
            print(f"{'ok ' if shared <= limit else 'big'}  sm_{arch} {label}: {shared} B shared memory (limit {limit})")
        if not fitting:
            failures.append(f"{name}: no configuration fits in sm_{arch}'s {limit} B of shared memory")
            print(f"FAIL sm_{arch} {name}: no configuration fits in {limit} B of shared memory")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                        help="compute capability, e.g. 90 (H100) or 80 (A100)")
    failures = compile_all(parser.parse_args().arch)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
