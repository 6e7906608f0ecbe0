"""Markdown tables from a pytest-benchmark JSON file, and a GPU report's record in bench/RESULTS.md.

    pytest bench --benchmark-only --benchmark-json=bench.json
    python -m bench.summarize bench.json                          # prints the tables
    python -m bench.summarize --gpu-report DIR/report.json        # writes the run into RESULTS.md's GPU section
"""

import argparse
import json
from pathlib import Path

from bench.gpu_report import markdown

RESULTS = Path(__file__).with_name("RESULTS.md")
# The GPU section's anchor: each run's record goes right below it (newest first), between markers naming the run.
GPU_ANCHOR = "<!-- gpu-runs:"
PLACEHOLDER = "none"  # the run id of the "none yet" text, which the first record replaces


def _fmt(value, scale=1.0, digits=3) -> str:
    return "" if value is None else f"{value * scale:.{digits}g}"


def rows(report: dict) -> list[str]:
    """One line per case. "other load" is how many cores other processes kept busy while it was timed."""
    lines = ["| operation | shape (N, K, D) | provider | median ms | TFLOP/s | GB/s | of floor | peak MiB "
             "| other load |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        if "versus" in info:  # the target test has its own table
            continue
        operation = (bench.get("group") or "").split(" ")[0]
        mem = info.get("peak_mem_bytes")
        lines.append(
            f"| {operation} | {info['n']}, {info['k']}, {info['d']} | {info['provider']} "
            f"| {_fmt(bench['stats']['median'], 1e3, 4)} | {_fmt(info.get('tflops'), 1, 3)} "
            f"| {_fmt(info.get('gbps'), 1, 3)} | {_fmt(info.get('frac_of_floor'), 1, 2)} "
            f"| {_fmt(None if mem is None else mem / 2**20, 1, 4)} | {_fmt(info.get('foreign_cpu_cores'), 1, 2)} |")
    return lines


def target_rows(report: dict) -> list[str]:
    lines = []
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        if "versus" not in info:
            continue
        lines += [f"| {info['provider']} vs {info['versus']} at N={info['n']}, K={info['k']}, D={info['d']} "
                  "| ours | theirs | ratio |",
                  "| --- | ---: | ---: | ---: |",
                  f"| median step, ms | {info['median_s'] * 1e3:.0f} | {info['versus_median_s'] * 1e3:.0f} "
                  f"| {info['speedup']:.2f}x faster |",
                  f"| peak tensor memory, MiB | {info['peak_tensor_bytes'] / 2**20:.0f} "
                  f"| {info['versus_peak_tensor_bytes'] / 2**20:.0f} | {info['memory_ratio']:.3f} |"]
        if info.get("peak_rss_bytes") and info.get("versus_peak_rss_bytes"):
            lines.append(f"| peak resident-set rise, MiB | {info['peak_rss_bytes'] / 2**20:.0f} "
                         f"| {info['versus_peak_rss_bytes'] / 2**20:.0f} "
                         f"| {info['peak_rss_bytes'] / info['versus_peak_rss_bytes']:.3f} |")
    return lines


def _markers(run_id: str) -> tuple[str, str]:
    return f"<!-- gpu-run {run_id} -->", f"<!-- /gpu-run {run_id} -->"


def _without_block(text: str, run_id: str) -> str:
    begin, end = _markers(run_id)
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head.rstrip("\n") + "\n\n" + rest.split(end, 1)[1].lstrip("\n")


def fill_gpu_section(text: str, run_id: str, block: str) -> str:
    """RESULTS.md's text with `block` as the record of run `run_id`: where an earlier record of the same run stood,
    or else first below the GPU section's anchor; the placeholder of an empty section goes."""
    begin, end = _markers(run_id)
    record = f"{begin}\n{block.strip()}\n{end}\n"
    text = _without_block(text, PLACEHOLDER)
    if begin in text:
        head, rest = text.split(begin, 1)
        return head + record + "\n" + rest.split(end, 1)[1].lstrip("\n")
    lines = text.splitlines(keepends=True)
    anchor = next((i for i, line in enumerate(lines) if line.startswith(GPU_ANCHOR)), None)
    if anchor is None:
        raise ValueError(f"no line starting with {GPU_ANCHOR!r} to put the GPU run under; add one to the GPU section")
    return "".join(lines[: anchor + 1]) + "\n" + record + "\n" + "".join(lines[anchor + 1:]).lstrip("\n")


def write_gpu_run(report_path: Path, results_path: Path) -> None:
    report = json.loads(Path(report_path).read_text())
    if report.get("run", {}).get("smoke") or not report.get("environment", {}).get("cuda"):
        raise SystemExit(f"error: {report_path} is not a GPU run (a --smoke run, or no CUDA device): its figures "
                         f"measure nothing, and {results_path.name}'s GPU section records GPU runs only")
    run_id = report["run"]["started"]
    results_path.write_text(fill_gpu_section(results_path.read_text(), run_id, markdown.results_block(report)))
    print(f"{results_path}: GPU run of {run_id} written")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json_file", nargs="?", help="a pytest-benchmark JSON file: print its tables")
    parser.add_argument("--gpu-report", type=Path, help="a bench.gpu_report report.json: write it into --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (default: bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if bool(args.json_file) == bool(args.gpu_report):
        parser.error("give either a pytest-benchmark JSON file or --gpu-report DIR/report.json")
    if args.gpu_report:
        write_gpu_run(args.gpu_report, args.results)
        return
    with open(args.json_file) as f:
        report = json.load(f)
    print("\n".join(rows(report)))
    targets = target_rows(report)
    if targets:
        print()
        print("\n".join(targets))


if __name__ == "__main__":
    main()
