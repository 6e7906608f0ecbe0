"""Markdown tables from a pytest-benchmark JSON file, for bench/RESULTS.md.

    pytest bench --benchmark-only --benchmark-json=bench.json
    python -m bench.summarize bench.json
"""

import argparse
import json


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json_file")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        report = json.load(f)
    print("\n".join(rows(report)))
    targets = target_rows(report)
    if targets:
        print()
        print("\n".join(targets))


if __name__ == "__main__":
    main()
