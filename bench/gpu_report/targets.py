"""The project's GPU targets, judged from a report: each with its figure and "met" or "missed" on a GPU, "no GPU"
elsewhere (a CPU's figures, the interpreter's above all, say nothing about them), "not measured" where the report
lacks the figure."""

from dataclasses import dataclass

SEED = "N = 65536, K = 4096, D = 256"
FAST_MAX_S = 210e-6
EXACT_OVER_FAST_MAX = 1.3
EMA_UPDATE_MAX_S = 40e-6
STEP_SPEEDUP_MIN = 15.0
STEP_MEMORY_RATIO_MAX = 1 / 20
PEER = "vector-quantize-pytorch"


@dataclass(frozen=True)
class Verdict:
    target: str
    figure: str
    verdict: str  # met, missed, not measured, no GPU


def judge(report: dict) -> list[Verdict]:
    cases = {(c["operation"], c["provider"]): c for c in report.get("timings", {}).get("cases", [])}

    def median(operation, provider):
        return cases.get((operation, provider), {}).get("median_s")

    def peak(operation, provider):
        return cases.get((operation, provider), {}).get("peak_mem_bytes")

    fast, exact = median("nearest_code", "triton-fast"), median("nearest_code", "triton-exact")
    step, peer_step = median("quantizer_step", "triton-exact"), median("quantizer_step", PEER)
    step_mem, peer_mem = peak("quantizer_step", "triton-exact"), peak("quantizer_step", PEER)
    verdicts = [
        _at_most(f"`fast` <= {FAST_MAX_S * 1e6:.0f} us at {SEED}", fast, FAST_MAX_S, duration),
        _at_most(f"`exact` <= {EXACT_OVER_FAST_MAX}x `fast`", _ratio(exact, fast), EXACT_OVER_FAST_MAX,
                 lambda r: f"{r:.2f}x ({duration(exact)})"),
        _at_most(f"EMA update (stats + blend) <= {EMA_UPDATE_MAX_S * 1e6:.0f} us", median("ema_update", "triton"),
                 EMA_UPDATE_MAX_S, duration),
        _faster_than_peers(cases, "nearest_code", ("triton-fast", "triton-exact")),
        _faster_than_peers(cases, "ema_update", ("triton", "triton-deterministic")),
        _at_least(f"quantizer step (`exact`) >= {STEP_SPEEDUP_MIN:.0f}x faster than {PEER}", _ratio(peer_step, step),
                  STEP_SPEEDUP_MIN, lambda r: f"{r:.1f}x ({duration(step)} vs {duration(peer_step)})"),
        _at_most(f"quantizer step memory <= 1/{1 / STEP_MEMORY_RATIO_MAX:.0f} of {PEER}'s", _ratio(step_mem, peer_mem),
                 STEP_MEMORY_RATIO_MAX, lambda r: f"1/{1 / r:.0f} ({mib(step_mem)} vs {mib(peer_mem)})"),
        _tests_green(report),
    ]
    if not report.get("environment", {}).get("cuda", False):
        return [Verdict(v.target, "-", "no GPU") for v in verdicts]
    return verdicts


def _ratio(a, b):
    return a / b if a is not None and b else None


def _at_most(target, value, limit, show) -> Verdict:
    if value is None:
        return Verdict(target, "-", "not measured")
    return Verdict(target, show(value), "met" if value <= limit else "missed")


def _at_least(target, value, limit, show) -> Verdict:
    if value is None:
        return Verdict(target, "-", "not measured")
    return Verdict(target, show(value), "met" if value >= limit else "missed")


def _faster_than_peers(cases: dict, operation: str, ours: tuple[str, ...]) -> Verdict:
    """Each of ours faster than every other provider of the operation that ran: our slowest against their fastest."""
    target = f"{operation}: {', '.join(ours)} faster than every peer present"
    timed = {provider: c["median_s"] for (op, provider), c in cases.items() if op == operation and "median_s" in c}
    mine = [timed[name] for name in ours if name in timed]
    peers = {name: seconds for name, seconds in timed.items() if name not in ours}
    if len(mine) < len(ours) or not peers:
        return Verdict(target, "-", "not measured")
    fastest = min(peers, key=peers.get)
    figure = f"our slowest {duration(max(mine))}, fastest peer {fastest} {duration(peers[fastest])}"
    return Verdict(target, figure, "met" if max(mine) < peers[fastest] else "missed")


def _tests_green(report: dict) -> Verdict:
    target = "kernel tests green on the GPU"
    correctness, stage = report.get("correctness"), report.get("stages", {}).get("correctness")
    if not correctness or not stage:
        return Verdict(target, "-", "not measured")
    counts = correctness.get("counts", {})
    figure = f"{counts.get('PASSED', 0)} passed, {counts.get('FAILED', 0)} failed, {counts.get('ERROR', 0)} errors"
    green = stage["status"] == "ok" and counts.get("PASSED", 0) > 0
    return Verdict(target, figure + ("" if stage["status"] == "ok" else f" ({stage['status']})"),
                   "met" if green else "missed")


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.4g} MiB"
