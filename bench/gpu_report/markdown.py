"""report.md, and the block that `bench.summarize --gpu-report` puts into bench/RESULTS.md, from report.json.

Every table is drawn from whatever the report holds: a stage that failed or was stopped shows as such, its cases
that never ran as "not reached", a provider that could not run as "skipped: <why>".
"""

from bench.gpu_report.targets import duration, judge, mib

SMOKE_NOTE = ("**Smoke run** (toy sizes; without a GPU, Triton under its interpreter): it checks that every stage "
              "runs; its figures measure nothing.")


def report(data: dict) -> str:
    """The whole report: what ran where, how each stage ended, the targets, and every figure."""
    return _join(heading(data, "#"), environment_lines(data), stage_table(data, "##"), *figure_sections(data, "##"))


def results_block(data: dict) -> str:
    """bench/RESULTS.md's record of one GPU run (under its "## GPU"): the same, less the stages' bookkeeping."""
    return _join(heading(data, "###"), environment_lines(data), *figure_sections(data, "####"))


def figure_sections(data: dict, level: str) -> list[str]:
    return [section(data, level) for section in
            (target_table, correctness_lines, timing_table, sweep_table, step_sweep_table, training_table)]


def _join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part) + "\n"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


# -- what ran where ----------------------------------------------------------------------------------------------


def heading(data: dict, level: str) -> str:
    env, run = data.get("environment", {}), data.get("run", {})
    date = env.get("date") or run.get("started", "?")
    title = f"{level} GPU report: {env.get('device', 'device unknown')}, {date}, commit {run.get('commit', '?')}"
    return title + ("\n\n" + SMOKE_NOTE if run.get("smoke") else "")


def environment_lines(data: dict) -> str:
    env, run = data.get("environment", {}), data.get("run", {})
    versions, gpu = env.get("versions", {}), env.get("gpu") or {}
    lines = [f"- `{run.get('command', 'python -m bench.gpu_report')}`, started {run.get('started', '?')}"]
    if gpu:
        lines.append(f"- {gpu['name']}: compute capability {gpu['capability']}, {gpu['multiprocessors']} SMs, "
                     f"{gpu['memory_bytes'] / 2**30:.0f} GiB, driver {gpu['driver']}")
    if versions:
        optional = ", ".join(f"{name} {versions[name] or 'absent'}" for name in
                             ("vector_quantize_pytorch", "flash_kmeans", "faiss", "wandb") if name in versions)
        lines.append(f"- Python {versions['python']}, torch {versions['torch']} (CUDA {versions['torch_cuda']}), "
                     f"triton {versions['triton']}, numpy {versions['numpy']}; {optional}")
    if project := env.get("project"):
        lines.append(f"- the project ran from {project['how']}: {project['imported_from']}")
    wheels = run.get("wheels", {})
    if wheels.get("error"):
        lines.append(f"- carried wheels: pip failed: {wheels['error'][-300:]}")
    elif wheels:
        lines.append("- carried wheels: " + (", ".join(wheels["installed"]) or wheels.get("note", "none")))
    if ceilings := env.get("ceilings"):
        flops = ", ".join(f"{p} {v / 1e12:.4g}" for p, v in ceilings.items() if p != "bandwidth")
        lines.append(f"- measured ceilings: copy {ceilings['bandwidth'] / 1e9:.4g} GB/s; matmul TFLOP/s: {flops}")
    return "\n".join(lines)


def stage_table(data: dict, level: str) -> str:
    limits, results = data.get("run", {}).get("limits_s", {}), data.get("stages", {})
    rows = []
    for name in dict.fromkeys([*limits, *results]):
        result = results.get(name)
        if result is None:
            rows.append([name, "not run", "-", f"{limits[name]:.0f} s", ""])
            continue
        note = "" if result["status"] == "ok" else _last_line(result.get("log_tail", ""))
        rows.append([name, result["status"], f"{result['seconds']:.0f} s", f"{result['limit_s']:.0f} s",
                     f"{result['log']}{': ' + note if note else ''}"])
    return f"{level} Stages\n\n" + _table(["stage", "status", "time", "limit", "log"], rows)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


# -- figures -------------------------------------------------------------------------------------------------


def target_table(data: dict, level: str) -> str:
    rows = [[v.target, v.figure, v.verdict] for v in judge(data)]
    return f"{level} Targets\n\n" + _table(["target", "figure", "verdict"], rows)


def correctness_lines(data: dict, level: str) -> str:
    correctness = data.get("correctness")
    if not correctness:
        return ""
    counts = correctness.get("counts", {})
    summary = ", ".join(f"{n} {outcome.lower()}" for outcome, n in counts.items() if n)
    lines = [f"{level} Kernel tests\n\npytest on {len(correctness.get('tests', []))} selections of tests/ (the "
             f"command is in report.json): {correctness.get('collected') or '?'} collected; {summary or 'none ran'}"]
    lines += [f"- failed: `{node}`" for node in correctness.get("failures", [])]
    return "\n".join(lines)


CASE_COLUMNS = ["median", "TFLOP/s", "of floor", "peak", "note"]


def _planned_cases(section: dict) -> list[tuple[dict, dict | None]]:
    """Each case the stage planned, with what it recorded of it (None: the stage stopped before reaching it)."""
    def key(case):
        return case["operation"], case["provider"], case["n"], case["k"], case["d"]

    done = {key(case): case for case in section.get("cases", [])}
    return [(plan, done.get(key(plan))) for plan in section.get("planned", [])]


def _case_cells(case: dict | None) -> list:
    """The CASE_COLUMNS of one case."""
    if case is None:
        return ["-", "-", "-", "-", "not reached (the stage stopped first)"]
    if "median_s" not in case:
        note = f"skipped: {case['skipped']}" if "skipped" in case else f"error: {case.get('error', '?')}"
        return ["-", "-", "-", "-", note]
    return [duration(case["median_s"]), f"{case['tflops']:.3g}", f"{case['frac_of_floor']:.2f}",
            mib(case.get("peak_mem_bytes")), ""]


def timing_table(data: dict, level: str) -> str:
    timings = data.get("timings")
    if not timings:
        return ""
    rows = [[plan["operation"], plan["provider"], (case or {}).get("precision", ""), *_case_cells(case)]
            for plan, case in _planned_cases(timings)]
    shape = f"N = {timings['n']}, K = {timings['k']}, D = {timings['d']}"
    return (f"{level} Timings at {shape}\n\nMedians (`triton.testing.do_bench` on CUDA), peak memory of one call, "
            "and the fraction of the roofline floor (1.0 = at the floor) at the precision named.\n\n"
            + _table(["operation", "provider", "precision", *CASE_COLUMNS], rows))


def sweep_table(data: dict, level: str, section: str = "sweep", operation: str = "nearest_code") -> str:
    sweep = data.get(section)
    if not sweep:
        return ""
    cases = list(_planned_cases(sweep))
    rows = [[plan["n"], plan["k"], plan["d"], plan["provider"], *_case_cells(case)] for plan, case in cases]
    few = sorted({plan["n"] for plan, _ in cases} - {sweep["n"]})
    then = "".join(f"; then N = {n}" for n in few)
    return (f"{level} {operation} over K and D (N = {sweep['n']}{then})\n\n"
            + _table(["N", "K", "D", "provider", *CASE_COLUMNS], rows))


def step_sweep_table(data: dict, level: str) -> str:
    return sweep_table(data, level, "step_sweep", "quantizer_step")


def training_table(data: dict, level: str) -> str:
    training = data.get("training")
    if not training:
        return ""
    perplexity = training.get("per_step", {}).get("perplexity", [])
    share = training.get("quantizer_share")
    row = [f"{training['images_per_s']:.4g}" if "images_per_s" in training else "-",
           duration(training.get("step_s")), duration(training.get("quantizer_s")),
           f"{share:.0%}" if share is not None else "-", mib(training.get("peak_memory_bytes")),
           f"{training.get('steps', 0)} in {training.get('trained_s', 0):.0f} s",
           " / ".join(f"{p:.0f}" for p in (perplexity[0], min(perplexity), perplexity[-1])) if perplexity else "-"]
    return (f"{level} Training\n\n`{training.get('command', '')}` ({training.get('stopped', 'did not finish')}; "
            f"medians after {training.get('warmup_steps', 0)} warm-up steps; perplexity at every step in report.json)"
            "\n\n"
            + _table(["images/s", "step", "quantizer", "quantizer share", "peak memory", "steps",
                      "perplexity first / lowest / last"], [row]))
