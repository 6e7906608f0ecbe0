"""The report's stages: what each measures, its time limit, and its body, which runs in a process of its own.

Every body writes its figures into DIR/report.json (`record`) as soon as it has them, and prints what it does to its
log. A body needs CUDA to measure anything; under `--smoke` it runs the same code at toy sizes on the CPU (Triton
under its interpreter), to keep the command working between GPU loans: its figures mean nothing.
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.gpu_report import record

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Context:
    out: Path  # the report's folder
    smoke: bool  # toy sizes on the CPU
    deadline: float  # time.monotonic() at which the supervisor kills this stage


@dataclass(frozen=True)
class Stage:
    name: str
    body: Callable[[Context], None]
    limit_s: float  # on a GPU
    smoke_limit_s: float  # with --smoke, on a CPU shared with other work

    def limit(self, smoke: bool) -> float:
        return self.smoke_limit_s if smoke else self.limit_s


# -- environment -----------------------------------------------------------------------------------------------

# Modules the report reports on (never imports: wandb, in particular, stays out of every process of the report).
OPTIONAL_MODULES = ("vector_quantize_pytorch", "einx", "flash_kmeans", "faiss", "wandb")


def environment(ctx: Context) -> None:
    import torch  # noqa: PLC0415

    from bench import roofline  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    record.update(ctx.out, "environment", cuda=device == "cuda", device=roofline.device_name(device),
                  gpu=gpu_facts() if device == "cuda" else None, versions=versions(),
                  project=project_origin(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print("measuring the roofline's ceilings ...", flush=True)
    record.update(ctx.out, "environment", ceilings=roofline.measure_ceilings(device))


def gpu_facts() -> dict:
    import torch  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
            "driver": driver_version()}


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (nvidia-smi: {error})"
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else f"unknown (nvidia-smi exited {done.returncode})"


def versions() -> dict:
    import numpy  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    found = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "triton": triton.__version__, "numpy": numpy.__version__}
    distributions = importlib.metadata.packages_distributions()
    for module in OPTIONAL_MODULES:
        names = distributions.get(module, [])
        if importlib.util.find_spec(module) is None:
            found[module] = None
        else:
            found[module] = next((importlib.metadata.version(name) for name in names), "installed")
    return found


def project_origin() -> dict:
    """Where `kernels` and `vqvae` were imported from, and how: the checkout on PYTHONPATH, the checkout as the
    working directory, or an install (pyproject.toml requires wandb, which the GPU image lacks, so there the project
    runs from PYTHONPATH or is installed with --no-deps)."""
    import vq_kernels  # noqa: PLC0415

    source = Path(vq_kernels.__file__).resolve().parent.parent
    # An egg-info that a build left in the checkout is found on the working directory's path too: not an install.
    installs = [dist for dist in importlib.metadata.distributions(name="vqvae-triton")
                if Path(dist.locate_file("")).resolve() != ROOT]
    editable = any(json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
                   for dist in installs)
    on_pythonpath = source in [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source != ROOT:
        how = "an installed copy, not the checkout"
    elif on_pythonpath:
        how = "the checkout, on PYTHONPATH"
    elif editable:
        how = "the checkout, installed as editable (pip install -e)"
    else:
        how = "the checkout, as the working directory (neither installed nor on PYTHONPATH)"
    return {"how": how, "imported_from": str(source), "installed": [dist.version for dist in installs],
            "editable": editable, "on_pythonpath": on_pythonpath}


# -- correctness -------------------------------------------------------------------------------------------------

# The kernel tests that answer the GPU's questions, most telling first (a stage cut short keeps the first ones): no
# host synchronisation in a training step, deterministic mode bit-equal across runs, the EMA kernels against the
# reference, `exact` against fp64 and `fast` within its stated bound, the quantizer's backends agreeing.
GPU_TESTS = (
    "tests/quantizer/test_vector_quantizer.py::test_a_training_step_never_waits_on_the_device",
    "tests/quantizer/test_vector_quantizer.py::test_deterministic_triton_training_is_bit_identical",
    "tests/kernels/test_ema_update.py",
    "tests/kernels/test_nearest_code.py",
    "tests/quantizer/test_vector_quantizer.py::test_backends_agree_over_training_steps",
    "tests/quantizer/test_vector_quantizer.py::test_ema_follows_the_reference_update",
)
# A handful of the same under the interpreter: seconds each.
SMOKE_TESTS = (
    "tests/quantizer/test_vector_quantizer.py::test_a_training_step_never_waits_on_the_device",
    "tests/quantizer/test_vector_quantizer.py::test_deterministic_triton_training_is_bit_identical",
    "tests/kernels/test_ema_update.py::test_ema_update_matches_reference",
    "tests/kernels/test_nearest_code.py::test_exact_resolves_duplicated_codes_to_the_lowest_index",
    "tests/kernels/test_nearest_code.py::test_fast_returns_a_copy_of_a_nearest_code",
)
PYTEST_WORKERS = 8  # on the GPU machine's 16 cores, with pytest-xdist: Triton's compilations run side by side


class TestTally:
    """The outcome of each test, read from `pytest -v` as it prints them (with or without xdist's worker prefix)."""

    OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    NODE = re.compile(r"(tests/\S+::\S+)")
    COLLECTED = re.compile(r"collected (\d+) items?|\[(\d+) items?\]")

    def __init__(self):
        self.counts = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"), 0)
        self.failures: list[str] = []
        self.collected: int | None = None

    def read(self, line: str) -> bool:
        """Take one line of pytest's output; True if it changed the tally."""
        if self.collected is None and (match := self.COLLECTED.search(line)):
            self.collected = int(match.group(1) or match.group(2))
            return True
        if line.startswith(("FAILED ", "ERROR ")):  # the closing summary repeats each failure
            return False
        outcome, node = self.OUTCOME.search(line), self.NODE.search(line)
        if not (outcome and node):
            return False
        self.counts[outcome.group(1)] += 1
        if outcome.group(1) in ("FAILED", "ERROR"):
            self.failures.append(node.group(1))
        return True

    def as_dict(self) -> dict:
        return {"counts": self.counts, "failures": self.failures, "collected": self.collected}


def correctness(ctx: Context) -> None:
    tests = SMOKE_TESTS if ctx.smoke else GPU_TESTS
    parallel = not ctx.smoke and importlib.util.find_spec("xdist") is not None
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
               *(["-n", str(PYTEST_WORKERS)] if parallel else []), *tests]
    tally = TestTally()
    record.update(ctx.out, "correctness", tests=list(tests), command="python " + " ".join(command[1:]),
                  **tally.as_dict())
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pytest:
        for line in pytest.stdout:
            print(line, end="", flush=True)
            if tally.read(line):
                record.update(ctx.out, "correctness", **tally.as_dict())
    record.update(ctx.out, "correctness", returncode=pytest.returncode)
    if pytest.returncode != 0:
        sys.exit(f"pytest exited with {pytest.returncode}: {tally.counts['FAILED']} failed, "
                 f"{tally.counts['ERROR']} errors")


# -- timings -----------------------------------------------------------------------------------------------------

SMOKE_SHAPE = (256, 64, 32)  # N, K, D: one small batch; under the interpreter every provider runs in seconds
REP_MS = 100.0  # calls timed per case on a GPU: about this many milliseconds' worth (do_bench's default)
SMOKE_REP_MS = 1.0  # --smoke times each call the fewest times (3): it checks that the case runs
COMPILE_IN_SMOKE = "--smoke leaves torch.compile out: compiling on a CPU takes minutes"


def _operations():
    """Every benchmarked operation, with the providers and calls that the pytest benchmarks define."""
    from bench.test_bench_ema_update import CODE_STATS, EMA_BLEND, EMA_UPDATE  # noqa: PLC0415
    from bench.test_bench_nearest_code import NEAREST_CODE  # noqa: PLC0415
    from bench.test_bench_quantizer import QUANTIZER_STEP  # noqa: PLC0415

    return NEAREST_CODE, CODE_STATS, EMA_BLEND, EMA_UPDATE, QUANTIZER_STEP


def adopt_measured_ceilings(ctx: Context) -> None:
    """The ceilings the environment stage measured, so every stage compares with the same ones (and, if it did not
    finish, this stage measures them itself when first needed)."""
    from bench import harness, roofline  # noqa: PLC0415

    ceilings = record.load(ctx.out).get("environment", {}).get("ceilings")
    if ceilings:
        roofline.adopt_ceilings(harness.DEVICE, ceilings)


def timings(ctx: Context) -> None:
    from bench import harness  # noqa: PLC0415

    adopt_measured_ceilings(ctx)
    shape = harness.Shape(*SMOKE_SHAPE) if ctx.smoke else harness.SEED
    # torch.compile's cases last: their compilation is the slowest part, and a stage cut short keeps the rest.
    plan = [(op, provider) for op in _operations() for provider in op.providers]
    plan.sort(key=lambda case: "compile" in case[1].needs)
    record.update(ctx.out, "timings", n=shape.n, k=shape.k, d=shape.d,
                  planned=[planned_case(op, provider, shape) for op, provider in plan], cases=[])
    for op, provider in plan:
        record.append(ctx.out, "timings", "cases", measure(ctx, op, provider, shape))


# The sweeps over large codebooks (the peers are measured at the seed shape): the search alone, ours alone; then
# the training step, ours beside PyTorch's path and the peer wherever its N x K matrices fit, ours first so that a
# stage cut short keeps them.
SWEEP_N, SWEEP_KS, SWEEP_DS = 65536, (4096, 16384, 65536, 262144), (256, 32, 8)
SMOKE_SWEEP_N, SMOKE_SWEEP_KS, SMOKE_SWEEP_DS = 256, (64, 256), (8,)  # a few seconds a case interpreted
SWEEP_PROVIDERS = ("triton-fast", "triton-exact")
# Then the search for few rows against many codes (one image a call), where it splits the codes over programs
# (`vq_kernels.nearest_pass.search_splits`); after the sweep, so that a stage cut short keeps the sweep.
FEW_ROWS_N, FEW_ROWS_KS, FEW_ROWS_DS = 1024, (65536, 262144), (256, 8)
SMOKE_FEW_ROWS_N, SMOKE_FEW_ROWS_KS, SMOKE_FEW_ROWS_DS = 16, (4096,), (8,)  # 2 splits under the interpreter
STEP_SWEEP_PROVIDERS = ("triton-exact", "vector-quantize-pytorch", "torch")


def sweep(ctx: Context) -> None:
    from bench.test_bench_nearest_code import NEAREST_CODE  # noqa: PLC0415

    sweep_over_codebooks(ctx, "sweep", NEAREST_CODE, SWEEP_PROVIDERS, shapes_first=True, few_rows=True)


def step_sweep(ctx: Context) -> None:
    from bench.test_bench_quantizer import QUANTIZER_STEP  # noqa: PLC0415

    sweep_over_codebooks(ctx, "step_sweep", QUANTIZER_STEP, STEP_SWEEP_PROVIDERS, shapes_first=False)


def sweep_over_codebooks(ctx: Context, section: str, operation, provider_names, *, shapes_first: bool,
                         few_rows: bool = False) -> None:
    """operation at every (K, D) of the sweep for the named providers; shapes_first: all providers at a shape
    before the next shape, else one provider at every shape before the next provider; few_rows: then the few-rows
    shapes, every provider at each."""
    from bench import harness  # noqa: PLC0415

    adopt_measured_ceilings(ctx)
    n, ks, ds = (SMOKE_SWEEP_N, SMOKE_SWEEP_KS, SMOKE_SWEEP_DS) if ctx.smoke else (SWEEP_N, SWEEP_KS, SWEEP_DS)
    providers = [p for name in provider_names for p in operation.providers if p.name == name]
    shapes = [harness.Shape(n, k, d) for d in ds for k in ks]
    plan = ([(shape, p) for shape in shapes for p in providers] if shapes_first else
            [(shape, p) for p in providers for shape in shapes])
    if few_rows:
        few_n, few_ks, few_ds = ((SMOKE_FEW_ROWS_N, SMOKE_FEW_ROWS_KS, SMOKE_FEW_ROWS_DS) if ctx.smoke else
                                 (FEW_ROWS_N, FEW_ROWS_KS, FEW_ROWS_DS))
        plan += [(harness.Shape(few_n, k, d), p) for d in few_ds for k in few_ks for p in providers]
    record.update(ctx.out, section, n=n, ks=list(ks), ds=list(ds),
                  planned=[planned_case(operation, p, shape) for shape, p in plan], cases=[])
    for shape, provider in plan:
        record.append(ctx.out, section, "cases", measure(ctx, operation, provider, shape))


def planned_case(operation, provider, shape) -> dict:
    """A case the stage means to measure, listed before it starts: the report marks those it never reached."""
    return {"operation": operation.name, "provider": provider.name, "n": shape.n, "k": shape.k, "d": shape.d}


def measure(ctx: Context, operation, provider, shape) -> dict:
    """One case: its figures, or why it was skipped, or the error that stopped it (with the traceback in the log),
    so that one provider's failure costs the stage nothing else."""
    import pytest  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from bench import harness  # noqa: PLC0415

    case = {"operation": operation.name, **harness.case_info(provider, shape, cost=None, median_s=None)}
    reason = harness.skip_reason(provider, shape, interpreted_triton=ctx.smoke)
    if reason is None and ctx.smoke and "compile" in provider.needs:
        reason = COMPILE_IN_SMOKE
    if reason is not None:
        print(f"{operation.name} {provider} {shape}: skipped: {reason}", flush=True)
        return {**case, "skipped": reason}
    print(f"{operation.name} {provider} {shape} ...", flush=True)
    started = time.monotonic()
    try:
        case = harness.measure_case(operation, provider, shape, rep_ms=SMOKE_REP_MS if ctx.smoke else REP_MS)
    except pytest.skip.Exception as skip:
        case["skipped"] = skip.msg
    except Exception as error:  # noqa: BLE001  (a provider's failure is a finding; the other cases go on)
        traceback.print_exc()
        case["error"] = f"{type(error).__name__}: {next(iter(str(error).strip().splitlines()), '')}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    outcome = f"{case['median_s'] * 1e6:.1f} us" if "median_s" in case else case.get("skipped") or case.get("error")
    print(f"  {time.monotonic() - started:.1f} s: {outcome}", flush=True)
    return case


# -- training ----------------------------------------------------------------------------------------------------


def training(ctx: Context) -> None:
    from bench.gpu_report.training import train_and_measure  # noqa: PLC0415  (it imports torch and vqvae)

    train_and_measure(ctx)


# -- the stages, in order --------------------------------------------------------------------------------------

STAGES = (
    Stage("environment", environment, limit_s=20, smoke_limit_s=60),
    Stage("correctness", correctness, limit_s=110, smoke_limit_s=90),
    Stage("timings", timings, limit_s=90, smoke_limit_s=90),
    Stage("sweep", sweep, limit_s=60, smoke_limit_s=60),
    Stage("step_sweep", step_sweep, limit_s=80, smoke_limit_s=60),
    Stage("training", training, limit_s=100, smoke_limit_s=60),
)


def stage(name: str) -> Stage:
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")
