"""The supervisor: install the carried wheels, run each stage in a process of its own under its time limit, record
how each ended, and write and print report.md.

    python -m bench.gpu_report --out DIR                   # on the GPU machine: every stage, within 8 minutes
    python -m bench.gpu_report --out DIR --smoke           # on a CPU: the same at toy sizes, in under 2 minutes
    python -m bench.gpu_report --out DIR --stages timings  # again, some stages only (and the environment's),
                                                           # into the same report
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.gpu_report import markdown, record
from bench.gpu_report.stages import ROOT, STAGES, Context, stage

WHEELS = ROOT / ".whl"
WHEEL_INSTALL_LIMIT_S = 20
LOAN_BUDGET_S = 8 * 60  # ../shared/GPU.md: one run of at most 8 minutes, leaving room to run it once more
LOG_LIMIT_BYTES = 4 << 20  # a stage's log keeps its head and tail within this (every file must stay under 16 MiB)


@dataclass(frozen=True)
class StageRun:
    """A stage as the supervisor runs it: a command and its time limit (its output goes to DIR/<name>.log)."""

    name: str
    command: list[str]
    limit_s: float


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.stage:
        return run_stage_body(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selected = selected_stages(args.stages)
    start_report(out, args, command="python -m bench.gpu_report " + " ".join(argv), keep_others=bool(args.stages))
    site = install_wheels(Path(args.wheels), out)
    runs = [StageRun(s.name, stage_command(s.name, out, args.smoke, s.limit(args.smoke)), s.limit(args.smoke))
            for s in selected]
    results = run_stages(runs, out, child_environment(site, link_kernels(out)))
    text = markdown.report(record.load(out))
    (out / "report.md").write_text(text)
    print(text)
    return 0 if all(result["status"] == "ok" for result in results.values()) else 1


def selected_stages(names: str) -> list:
    """The stages named (all by default), the environment always among them and first: the report's verdicts and
    versions describe the machine this run measured on, not one an earlier run in the same folder found."""
    if not names:
        return list(STAGES)
    named = {stage(name).name for name in names.split(",")}
    return [s for s in STAGES if s.name in named or s.name == "environment"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report",
                                     description="The whole GPU measurement, stage by stage, into one folder.")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and the stages' logs")
    parser.add_argument("--smoke", action="store_true",
                        help="every stage at toy sizes on the CPU (Triton interpreted): a check, not a measurement")
    parser.add_argument("--stages", default="",
                        help=f"comma-separated stages to run (default: all of {','.join(s.name for s in STAGES)}); "
                             "the report keeps the other stages' figures")
    parser.add_argument("--commit", default="",
                        help="the checkout's commit, where the machine's copy has no git metadata")
    parser.add_argument("--wheels", default=str(WHEELS), help="folder of wheels to install first (bench/gpu_wheels.sh)")
    parser.add_argument("--stage", default="", help=argparse.SUPPRESS)  # internal: run one stage's body here
    parser.add_argument("--limit-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in filter(None, [*args.stages.split(","), args.stage]):
        try:
            stage(name)
        except ValueError as error:  # before anything runs
            parser.error(str(error))
    return args


# -- the report's header ---------------------------------------------------------------------------------------


def start_report(out: Path, args, command: str, keep_others: bool) -> None:
    report = record.load(out) if keep_others else {}
    report["run"] = {
        "command": command,
        "smoke": args.smoke,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or git_commit(),
        "limits_s": {s.name: s.limit(args.smoke) for s in STAGES},
    }
    report.setdefault("stages", {})
    record.save(out, report)


def git_commit() -> str:
    def git(*words):
        return subprocess.run(["git", "-C", str(ROOT), *words], capture_output=True, text=True, timeout=20)

    try:
        head, status = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (git: {error}; pass --commit)"
    if head.returncode != 0:
        return "unknown (no git metadata here; pass --commit)"
    return head.stdout.strip() + (" with uncommitted changes" if status.stdout.strip() else "")


# -- wheels --------------------------------------------------------------------------------------------------


def install_wheels(folder: Path, out: Path) -> str | None:
    """Install the carried wheels into a new temporary folder (the machine's own environment stays as it is) and
    return it, for the stages' PYTHONPATH; None when there is nothing to install or pip failed (recorded either way:
    the providers that needed them are then reported as absent)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        record.update(out, "run", wheels={"installed": [], "note": f"no wheels in {folder} (bench/gpu_wheels.sh "
                                                                  "downloads them where there is a network)"})
        return None
    target = tempfile.mkdtemp(prefix="gpu_report_site_")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", target, *map(str, wheels)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=WHEEL_INSTALL_LIMIT_S)
        error = None if done.returncode == 0 else done.stderr.strip()[-2000:]
    except subprocess.TimeoutExpired:
        error = f"pip install took over {WHEEL_INSTALL_LIMIT_S} s"
    record.update(out, "run", wheels={"installed": [] if error else [w.name for w in wheels], "target": target,
                                      "error": error})
    return None if error else target


def link_kernels(out: Path) -> str | None:
    """The folder kernels/ installs as the package vq_kernels (pyproject.toml). In a checkout that is not installed
    (`pip install --no-deps -e .` makes it so), a temporary folder holding a link vq_kernels -> kernels/ stands in,
    for the stages' PYTHONPATH; None when vq_kernels imports already."""
    if importlib.util.find_spec("vq_kernels") is not None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="gpu_report_kernels_"))
    (folder / "vq_kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
    record.update(out, "run", vq_kernels=f"not installed: {folder / 'vq_kernels'} links to the checkout's kernels/")
    return str(folder)


def child_environment(*paths: str | None) -> dict:
    """The stages' environment: unbuffered output (a killed stage's log is complete up to its end), and `paths`
    (the installed wheels, the kernels' link) ahead of everything on PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


# -- the stages' processes -------------------------------------------------------------------------------------


def stage_command(name: str, out: Path, smoke: bool, limit_s: float) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_report", "--stage", name, "--out", str(out), "--limit-s", str(limit_s),
            *(["--smoke"] if smoke else [])]


def run_stages(runs: list[StageRun], out: Path, env: dict) -> dict:
    """Run each stage to its end or its limit, whatever the others did; record and print how each ended."""
    results = {}
    for number, run in enumerate(runs, 1):
        results[run.name] = supervise(run, out, env)
        record.update(out, "stages", **{run.name: results[run.name]})
        result = results[run.name]
        print(f"[{number}/{len(runs)}] {run.name}: {result['status']} in {result['seconds']:.0f} s "
              f"(limit {run.limit_s:.0f} s)", flush=True)
    return results


def supervise(run: StageRun, out: Path, env: dict) -> dict:
    """Run one stage with its output in DIR/<name>.log; kill it, with every process it started, at its limit."""
    log_path = out / f"{run.name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(run.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: pytest, loader workers...
        try:
            returncode = process.wait(timeout=run.limit_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, status = process.wait(), "timed out"
    record.remove_partial(out)
    trim_log(log_path)
    result = {"status": status, "seconds": round(time.monotonic() - started, 1), "limit_s": run.limit_s,
              "returncode": returncode, "log": log_path.name}
    if status != "ok":
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return result


def trim_log(path: Path, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep a log's first and last limit / 2 bytes (a progress bar left to run can write megabytes)."""
    if path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    path.write_bytes(data[: limit // 2] + b"\n[... log cut to its head and tail ...]\n" + data[-limit // 2:])


def run_stage_body(args) -> int:
    """In the stage's own process: choose Triton's interpreter where there is no GPU (before anything imports a
    kernel), then run the body."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    this = stage(args.stage)
    limit_s = args.limit_s or this.limit(args.smoke)
    this.body(Context(out=Path(args.out), smoke=args.smoke, deadline=time.monotonic() + limit_s))
    return 0
