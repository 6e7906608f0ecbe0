"""Compile every kernel launch the quantizer makes for an NVIDIA GPU, as the launch compiles it; no GPU needed.

    python -m bench.compile_for_gpu [--arch 90] [--model]
    python -m bench.compile_for_gpu --model --shapes 65536,262144,8 65536,262144,32   # the searches at these shapes

Triton's interpreter, which runs the kernels on the CPU in the tests, is lenient where the compiler is not, and
cannot say what the compiled code costs. This script
  1. calls the public functions of `kernels` (the search, codebook preparation, statistics, EMA blend) on CPU
     tensors of each case's shapes and dtypes, with Triton's launch replaced by a recorder: every kernel launch the
     function makes is recorded with its arguments, so the cases cannot drift from the launchers;
  2. specialises each launch the way Triton's launcher does (`specialise`: an integer equal to 1 becomes a constant,
     integers and pointers divisible by 16 are marked so; tests/kernels/test_compile_for_gpu.py checks this against Triton's
     own binder), and compiles it with every autotune configuration that the kernel's own `prune_configs_by` keeps
     for the SM's shared memory;
  3. prints per configuration: registers, local memory (spills), shared memory, the MMA instructions, and the main
     loop's instructions per tile (all, MMA, waits, barriers, shared loads, shuffles), read from the SASS with the
     cuobjdump that ships with Triton;
  4. with --model, turns the figures into a predicted time at the seed shape on an H100 (`bench/NOTES.md`).
It fails if a launch does not compile, if the pruning keeps a configuration that does not fit, or keeps none.
It needs TRITON_INTERPRET unset, which decides at import time what `@triton.jit` makes, so the test suite runs it
as a subprocess.
"""

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs TRITON_INTERPRET unset"

import torch  # noqa: E402
import triton  # noqa: E402
import vq_kernels  # noqa: E402
import vq_kernels._common  # noqa: E402
import vq_kernels.nearest_exact  # noqa: E402
import vq_kernels.nearest_pass  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench import calibrate_model  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Shared memory one block may use (opt-in maximum), by compute capability: a kernel that compiles but needs more
# fails at launch.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SEED = (65536, 4096, 256)  # N, K, D
SEED_NAME = "N=65536 K=4096 D=256"
MODELLED = {"_fast_kernel", "_exact_kernel", "_nearest_code_kernel"}  # the searches' sweeps (the last: version 1)
CALIBRATED = {"_fast_kernel": "fast", "_exact_kernel": "exact"}  # bench.calibrate_model's corrections
H100_FP16_FLOPS = 989e12  # dense fp16/bf16 tensor-core peak: the floor the calibration is fitted against
ODD = [(1023, 37, 200), (37, 5, 3), (64, 70, 300)]  # not block multiples; one code tile; rows in slices


@dataclass
class Launch:
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict
    case: str

    @property
    def fn(self):
        return self.kernel.fn if isinstance(self.kernel, triton.runtime.Autotuner) else self.kernel


@contextlib.contextmanager
def recording(launches: list, case: str):
    """Replace kernel launches by a record of them; accept CPU tensors where the launchers want CUDA ones."""
    def record(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        launches.append(Launch(self, args, kwargs, case))

    saved = (triton.runtime.JITFunction.run, triton.runtime.Autotuner.run, vq_kernels._common.INTERPRET,
             vq_kernels.nearest_pass.multiprocessors, vq_kernels.nearest_exact.multiprocessors)
    triton.runtime.JITFunction.run = record
    triton.runtime.Autotuner.run = record
    vq_kernels._common.INTERPRET = True  # check_device: CPU tensors stand in for CUDA ones
    # an H100's SMs: they size the fallback's grid and decide whether a search splits its codes (SPLIT)
    vq_kernels.nearest_pass.multiprocessors = vq_kernels.nearest_exact.multiprocessors = lambda device: H100["sms"]
    try:
        yield
    finally:
        (triton.runtime.JITFunction.run, triton.runtime.Autotuner.run, vq_kernels._common.INTERPRET,
         vq_kernels.nearest_pass.multiprocessors, vq_kernels.nearest_exact.multiprocessors) = saved


def search_calls(shapes) -> list:
    """(case name, call): the search in each mode, fp32 x against an fp32 codebook, at each (N, K, D) of `shapes`."""
    return [(f"nearest_code {precision} x float32 N={n} K={k} D={d}",
             lambda n=n, k=k, d=d, p=precision: vq_kernels.nearest_code(
                 torch.zeros(n, d), vq_kernels.prepare_codebook(torch.zeros(k, d)), p))
            for n, k, d in shapes for precision in vq_kernels.PRECISIONS]


def quantizer_calls():
    """(case name, call) for what the quantizer launches: the search in each mode and x dtype against an fp32
    codebook, the preparation, the statistics in both modes, the blend; at the seed shape and the odd shapes."""
    calls = []
    for n, k, d in [SEED, *ODD]:
        shape = f"N={n} K={k} D={d}"
        for dtype in ((torch.float32, torch.bfloat16, torch.float16) if (n, k, d) == SEED else (torch.float32,)):
            for precision in vq_kernels.PRECISIONS:
                name = f"nearest_code {precision} x {str(dtype)[6:]} {shape}"
                calls.append((name, lambda n=n, k=k, d=d, dtype=dtype, p=precision: vq_kernels.nearest_code(
                    torch.zeros(n, d, dtype=dtype), vq_kernels.prepare_codebook(torch.zeros(k, d)), p)))
            for deterministic in (False, True):
                name = f"code_stats {'deterministic' if deterministic else 'atomic'} x {str(dtype)[6:]} {shape}"
                calls.append((name, lambda n=n, k=k, d=d, dtype=dtype, det=deterministic: vq_kernels.code_stats(
                    torch.zeros(n, d, dtype=dtype), torch.zeros(n, dtype=torch.int64), k, deterministic=det,
                    validate_indices=False)))
        calls.append((f"ema_blend {shape}", lambda k=k, d=d: vq_kernels.ema_blend_(
            torch.ones(k), torch.zeros(k, d), torch.zeros(k, d), torch.ones(k), torch.zeros(k, d), 0.99, 1e-5)))
    return calls


def record_launches(calls) -> list[Launch]:
    launches = []
    for name, call in calls:
        with recording(launches, name):
            call()
    return launches


def specialise(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs) for ASTSource, as Triton's launcher derives them from the arguments: tensors
    become typed pointers, marked divisible by 16 when their address is; integers become i32 (i64 past its range),
    the constant 1 when they equal 1, and are marked when divisible by 16; floats are fp32; tl.constexpr
    parameters (passed or defaulted) are constants."""
    bound = dict(zip(fn.arg_names, args))
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        value = bound[name] if name in bound else kwargs.get(name, param.default)
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                     torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]] if value.data_ptr() % 16 == 0 else []
        elif isinstance(value, bool) or value is None:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[(i,)] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            attrs[(i,)] = [["tt.divisibility", 16]] if value % 16 == 0 else []
        elif isinstance(value, float):
            signature[name], attrs[(i,)] = "fp32", []
        else:
            raise TypeError(f"{fn.__name__}: no rule for argument {name} of type {type(value).__name__}")
    return signature, constexprs, attrs


def configurations(launch: Launch, shared_limit: int) -> list[tuple[dict, dict]]:
    """(meta-parameters, options) to compile: every configuration the autotuner's pruning keeps for this SM."""
    if not isinstance(launch.kernel, triton.runtime.Autotuner):
        kw = dict(launch.kwargs)
        return [({}, {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)})]
    configs = launch.kernel.configs
    prune = launch.kernel.early_config_prune
    if prune is not None:
        saved = vq_kernels.nearest_pass.shared_memory_limit
        vq_kernels.nearest_pass.shared_memory_limit = lambda: shared_limit
        try:
            configs = prune(configs, dict(zip(launch.fn.arg_names, launch.args)), **launch.kwargs)
        finally:
            vq_kernels.nearest_pass.shared_memory_limit = saved
    return [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]


def compile_launch(launch: Launch, meta: dict, options: dict, arch: int):
    kwargs = {k: v for k, v in {**launch.kwargs, **meta}.items() if k not in ("num_warps", "num_stages")}
    signature, constexprs, attrs = specialise(launch.fn, launch.args, kwargs)
    source = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_as_triton_launches(launch: Launch, meta: dict, options: dict, arch: int):
    """The same launch specialised by Triton's own launcher code (its binder and _pack_args, as JITFunction.run
    calls them), for the test that `specialise` agrees with it. Private Triton API: 3.6 and 3.9 share it."""
    from triton.compiler.compiler import make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = {**launch.kwargs, **meta, **options}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return (signature, constexprs, attrs), triton.compile(source, target=target, options=options.__dict__)


def self_check(arch: int = 90) -> list[str]:
    """The seed-shape `fast` search in its first kept configuration, specialised here and by Triton's launcher:
    the same signature, constants and attributes, and the same registers and shared memory once compiled."""
    launches = record_launches([(f"nearest_code fast {SEED_NAME}", lambda: vq_kernels.nearest_code(
        torch.zeros(SEED[0], SEED[2]), vq_kernels.prepare_codebook(torch.zeros(SEED[1], SEED[2])), "fast"))])
    launch = next(la for la in launches if la.fn.__name__ == "_fast_kernel")
    meta, options = configurations(launch, MAX_SHARED_BYTES[arch])[0]
    ours = read_figures(compile_launch(launch, meta, options, arch))
    spec, compiled = compile_as_triton_launches(launch, meta, options, arch)
    theirs = read_figures(compiled)
    mine = specialise(launch.fn, launch.args, {**launch.kwargs, **meta})
    failures = []
    if mine[0] != spec[0] or mine[1] != spec[1]:
        failures.append(f"signature/constants differ:\n here   {mine[:2]}\n triton {spec[:2]}")
    attrs = {key: value for key, value in spec[2].items() if value}  # Triton lists unmarked arguments too
    if {key: value for key, value in mine[2].items() if value} != attrs:
        failures.append(f"attributes differ:\n here   {mine[2]}\n triton {spec[2]}")
    for name in ("registers", "shared", "local_bytes"):
        if getattr(ours, name) != getattr(theirs, name):
            failures.append(f"{name}: {getattr(ours, name)} here, {getattr(theirs, name)} as Triton launches it")
    print(f"self-check sm_{arch} {meta} {options}: here {ours.registers} regs, {ours.shared} B shared; as launched "
          f"{theirs.registers} regs, {theirs.shared} B shared; {len(failures)} differences")
    for failure in failures:
        print("FAIL", failure)
    return failures


# -- reading the compiled code ------------------------------------------------------------------------------------

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


@dataclass
class Figures:
    registers: int
    local_bytes: int  # stack frame per thread: where registers spill
    shared: int
    mma: list  # distinct MMA instructions
    loop: collections.Counter = field(default_factory=collections.Counter)  # main loop, one tile
    loop_waits: list = field(default_factory=list)
    # The loop's last wait for all MMAs to finish (WARPGROUP.DEPBAR.LE gsb0, 0x0), and what follows it: if MMAs are
    # issued after it, they stay in flight across the end of the turn, overlapping the instructions after them;
    # `gap` counts the instructions between the wait and the first of them, when the tensor cores have nothing.
    in_flight: bool = False
    gap: int = 0
    outside: int = 0  # instructions outside the main loop (static count)
    mma_flops_per_tile: float = 0.0  # per warpgroup
    tf32: bool = False


def read_figures(compiled, inner_trips: int = 1) -> Figures:
    """Registers, spills, shared memory, and the main loop's instructions per tile. The main loop is the outermost
    loop that holds MMA instructions; a loop nested in it (features in slices) counts inner_trips times."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True).stdout
    code = [(int(a, 16), op, operands) for a, op, operands in SASS_LINE.findall(sass)]
    figures = Figures(int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)),
                      compiled.metadata.shared, sorted({op for _, op, _ in code if "MMA" in op}))
    loops = []  # (start, end) of every backward branch
    for address, op, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    mma_loops = [(a, b) for a, b in loops if any(a <= x <= b and "MMA" in op for x, op, _ in code)]
    if not mma_loops:
        figures.outside = len(code)
        return figures
    start, end = max(mma_loops, key=lambda ab: ab[1] - ab[0])
    inner = [(a, b) for a, b in loops if start < a and b < end]
    body = [(op, operands) for address, op, operands in code if start <= address <= end]
    drains = [i for i, (op, operands) in enumerate(body) if op.startswith("WARPGROUP.DEPBAR") and "0x0" in operands]
    after = [i for i, (op, _) in enumerate(body) if op.startswith("HGMMA") and (not drains or i > drains[-1])]
    figures.in_flight = bool(after)
    figures.gap = after[0] - drains[-1] if after and drains else 0
    for address, op, operands in code:
        if not start <= address <= end:
            figures.outside += 1
            continue
        weight = inner_trips if any(a <= address <= b for a, b in inner) else 1
        figures.loop[op.split(".")[0]] += weight
        figures.loop["all"] += weight
        if "DEPBAR" in op or op.startswith("BAR"):
            figures.loop_waits.append(f"{op} {operands}".strip())
        shape = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?", op)  # no suffix: fp16 inputs
        if shape:
            m, n, k = map(int, shape.groups()[:3])
            figures.mma_flops_per_tile += weight * 2 * m * n * k
            figures.tf32 = shape.group(4) == "TF32"
    return figures


def describe(fig: Figures) -> str:
    loop = fig.loop
    waits = collections.Counter(fig.loop_waits)
    return (f"{fig.registers} regs, {fig.local_bytes} B stack, {fig.shared} B shared; MMA {', '.join(fig.mma) or '-'};"
            f" per tile {loop['all']} instr ({loop['HGMMA']} HGMMA, {loop['LDSM']} LDSM, {loop['LDGSTS']} LDGSTS, "
            f"{loop['SHFL']} SHFL, {loop['STL'] + loop['LDL']} STL/LDL); waits {dict(waits) or '-'}")


# -- the static model ---------------------------------------------------------------------------------------------

H100 = {"sms": 132, "clock": 1.83e9, "fp16_flops_per_clk": 4096, "tf32_flops_per_clk": 2048, "issue_per_clk": 4,
        "l2_bytes_per_s": 5.5e12, "dram_bytes_per_s": 3.35e12, "regs": 65536, "launch_s": 3e-6}


def predict_search(fig: Figures, meta: dict, options: dict, n: int, k: int, d: int, x_bytes: int,
                   shared_limit: int) -> dict:
    """Predicted seconds of one search kernel at (n, k, d) on an H100, from its compiled figures. Where the search
    splits its codes over programs (few rows: `vq_kernels.nearest_pass.search_splits`), each block of rows is that many
    CTAs, each sweeping its share of the tiles; the merge kernel after it (a few loads a row and split) is left out.

    Per code tile and CTA: the tensor cores need (MMA flops of the loop x warpgroups) / (flops per clock per SM);
    the four schedulers issue the loop's instructions for every warp, one per clock each; the tile's codes come
    from L2 (5.5 TB/s over 132 SMs, an assumption: measured figures for H100 run 5.5-7 TB/s). If the loop waits
    for its MMAs to finish before the rest of its instructions (a wait-to-zero after its last MMA), MMA and issue
    add up; if its MMAs stay in flight into the next turn, the longer of the two counts, plus the instructions
    between the next turn's wait and its first MMA; CTAs resident together on an SM overlap each other's phases.
    Waves of CTAs over 132 SMs, plus the instructions outside the loop once per CTA; never less than reading x
    from DRAM once. First-order: no latencies, no bank conflicts, perfect issue."""
    hw = H100
    warps = options["num_warps"]
    block_n, block_k = meta["BLOCK_N"], meta["BLOCK_K"]
    rate = hw["tf32_flops_per_clk"] if fig.tf32 else hw["fp16_flops_per_clk"]
    mma = fig.mma_flops_per_tile * (warps // 4) / rate
    issue = fig.loop["all"] * warps / hw["issue_per_clk"]
    serial = not fig.in_flight
    per_cta = max(1, min(shared_limit // max(fig.shared, 1), hw["regs"] // (fig.registers * 32 * warps)))
    gap = fig.gap * warps / hw["issue_per_clk"]
    tile = max(mma, (mma + issue) / per_cta) if serial else gap + max(mma, issue - gap)
    l2 = block_k * d * 2 / (hw["l2_bytes_per_s"] / hw["sms"] / hw["clock"])
    tile = max(tile, l2 * per_cta) / per_cta if per_cta > 1 else max(tile, l2)
    splits, split_codes = vq_kernels.nearest_pass.search_splits(n, k, hw["sms"])
    tiles = triton.cdiv(min(k, split_codes), block_k)
    cta = tiles * tile + fig.outside * warps / hw["issue_per_clk"]
    ctas = triton.cdiv(n, block_n) * splits
    waves = triton.cdiv(ctas, hw["sms"] * per_cta)
    seconds = max(waves * cta * per_cta / hw["clock"] if per_cta > 1 else waves * cta / hw["clock"],
                  n * d * x_bytes / hw["dram_bytes_per_s"])
    return {"seconds": seconds, "mma_cycles": mma, "issue_cycles": issue, "gap_cycles": gap, "l2_cycles": l2,
            "serial": serial,
            "ctas_per_sm": per_cta, "waves": waves, "splits": splits}


# -- main ---------------------------------------------------------------------------------------------------------

def compile_all(arch: int, model: bool = False, only: str = "", shapes=()) -> list[str]:
    """Compile the quantizer's launches (with `shapes`: the searches at those (N, K, D) alone) and, with `model`,
    predict each search's time at the seed shape (or at each of `shapes`) on an H100."""
    limit = MAX_SHARED_BYTES[arch]
    failures, figures = [], {}
    if model and not triton.__version__.startswith(calibrate_model.TRITON_RELEASE):
        print(f"note: compiled by triton {triton.__version__}; the calibration was fitted on triton "
              f"{calibrate_model.TRITON_RELEASE}'s code (the GPU machines' release: pip install -e '.[triton36]' in "
              f"a separate environment), and another release compiles another loop")
    calls = search_calls(shapes) if shapes else quantizer_calls()
    launches = record_launches([(name, call) for name, call in calls if only in name])
    for launch in launches:
        fitting = 0
        for meta, options in configurations(launch, limit):
            kwargs = {**launch.kwargs, **meta}
            key = (launch.fn.__name__, str(specialise(launch.fn, launch.args, kwargs)), str(options))
            label = f"sm_{arch} {launch.case}: {launch.fn.__name__} {meta or ''} {options}"
            if key not in figures:  # the same specialisation compiles to the same code: once
                try:
                    compiled = compile_launch(launch, meta, options, arch)
                except Exception as error:  # noqa: BLE001  (report every kernel, then fail)
                    failures.append(f"{label}: {type(error).__name__}: {error}")
                    print(f"FAIL {label}: {error}")
                    continue
                inner = 1 if kwargs.get("ONE_D_TILE", True) else triton.cdiv(
                    launch.args[launch.fn.arg_names.index("D")], kwargs["BLOCK_D"])
                figures[key] = fig = read_figures(compiled, inner)
                print(f"{'ok ' if fig.shared <= limit else 'big'}  {label}: {describe(fig)}")
                if fig.shared > limit:
                    failures.append(f"{label}: kept by the pruning but needs {fig.shared} B of shared memory "
                                    f"(> {limit})")
            fig = figures[key]
            fitting += fig.shared <= limit
            modelled = launch.case.endswith(SEED_NAME) or bool(shapes)
            if model and arch == 90 and modelled and launch.fn.__name__ in MODELLED:
                n, k, d = (int(v) for v in re.findall(r"[NKD]=(\d+)", launch.case))
                if shapes:
                    print(f"     {launch.case}: {launch.fn.__name__} {meta} {options}")
                x = launch.args[0]
                p = predict_search(fig, meta, options, n, k, d, x.element_size(), limit)
                print(f"     model: {p['seconds'] * 1e6:.0f} us (per tile: MMA {p['mma_cycles']:.0f}, issue "
                      f"{p['issue_cycles']:.0f} ({p['gap_cycles']:.0f} before the MMA), L2 {p['l2_cycles']:.0f} "
                      f"cycles; {'serial' if p['serial'] else 'MMA in flight'}"
                      f"; {p['splits']} split{'s' * (p['splits'] > 1)}, {p['ctas_per_sm']} CTA/SM, {p['waves']} waves)")
                if launch.fn.__name__ in CALIBRATED:
                    floor_us = 2 * n * k * d / H100_FP16_FLOPS * 1e6
                    us, error = calibrate_model.correct(p["seconds"] * 1e6, floor_us, CALIBRATED[launch.fn.__name__])
                    print(f"     calibrated on the H200 run: {us:.0f} us, +-{error:.0%} (worst leave-one-out error; "
                          f"a loop unlike the shipped ones may miss by more)")
        if not fitting:
            failures.append(f"{launch.case}: {launch.fn.__name__}: no configuration fits sm_{arch}'s {limit} B")
            print(f"FAIL {launch.case}: {launch.fn.__name__}: no configuration fits in {limit} B of shared memory")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                        help="compute capability, e.g. 90 (H100) or 80 (A100)")
    parser.add_argument("--model", action="store_true", help="predict seed-shape times on an H100 (sm_90)")
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    parser.add_argument("--shapes", nargs="+", default=[], metavar="N,K,D",
                        help="compile (and with --model predict) the searches at these shapes instead")
    parser.add_argument("--self-check", action="store_true",
                        help="only compare this script's specialisation with Triton's launcher's, for one config")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.shapes]
    failures = self_check(args.arch) if args.self_check else compile_all(args.arch, args.model, args.only, shapes)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
