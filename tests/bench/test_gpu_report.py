"""`python -m bench.gpu_report --smoke` keeps working between GPU loans: every stage runs at toy sizes on the CPU,
its report has a row for every stage, provider and target, and a stage that fails or overruns loses nothing of
the others. No timing is checked here: the CPU's figures mean nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import summarize
from bench.gpu_report import markdown, record, run
from bench.gpu_report.stages import STAGES
from bench.test_bench_ema_update import CODE_STATS, EMA_BLEND, EMA_UPDATE
from bench.test_bench_nearest_code import NEAREST_CODE
from bench.test_bench_quantizer import QUANTIZER_STEP

ROOT = Path(__file__).resolve().parents[2]
MAX_FILES, MAX_FILE_BYTES = 8, 16 << 20  # what comes back from a GPU machine


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, shared by the tests below (about a minute and a half on two idle cores)."""
    out = tmp_path_factory.mktemp("gpu_report")
    no_wheels = tmp_path_factory.mktemp("no_wheels")  # the machine's own packages, as in CI
    done = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--out", str(out), "--smoke",
                           "--wheels", str(no_wheels)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, done


def test_smoke_run_completes_every_stage_within_the_file_limits(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert {name: result["status"] for name, result in report["stages"].items()} == {s.name: "ok" for s in STAGES}
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES, sorted(f.name for f in files)
    assert all(f.stat().st_size < MAX_FILE_BYTES for f in files)
    assert {"report.json", "report.md", *(f"{s.name}.log" for s in STAGES)} == {f.name for f in files}


def test_smoke_report_is_printed_last_with_every_stage_provider_and_target(smoke):
    out, done = smoke
    text = (out / "report.md").read_text()
    assert done.stdout.rstrip().endswith(text.rstrip())
    assert "**Smoke run**" in text
    for stage in STAGES:
        assert f"| {stage.name} | ok |" in text
    for operation in (NEAREST_CODE, CODE_STATS, EMA_BLEND, EMA_UPDATE, QUANTIZER_STEP):
        for provider in operation.providers:
            assert f"| {operation.name} | {provider.name} |" in text
    assert "| nearest_code | faiss-gpu | fp32 | - | - | - | - | skipped: FAISS GPU search needs CUDA |" in text
    assert text.count("| 256 | 8 | triton-exact |") == 2  # the search's sweep and the training step's
    assert "## quantizer_step over K and D (N = 256)" in text
    assert "## nearest_code over K and D (N = 256; then N = 16)" in text
    assert "| 16 | 4096 | 8 | triton-exact |" in text  # few rows: the search splits its codes
    assert text.count("| no GPU |") == 8  # every target, and no verdict from a CPU


def test_smoke_report_json_holds_each_stages_figures(smoke):
    out, _ = smoke
    report = record.load(out)
    assert report["environment"]["cuda"] is False and report["environment"]["ceilings"]["fp16"] > 0
    assert report["correctness"]["counts"]["PASSED"] >= 3 and report["correctness"]["failures"] == []
    timed = [case for case in report["timings"]["cases"] if "median_s" in case]
    assert {case["provider"] for case in timed} >= {"triton-exact", "triton-fast", "torch", "torch-reference"}
    swept = report["sweep"]["cases"] + report["step_sweep"]["cases"]
    assert all("error" not in case for case in report["timings"]["cases"] + swept)
    assert {case["provider"] for case in report["step_sweep"]["cases"] if "median_s" in case} >= {"triton-exact",
                                                                                                 "torch"}
    assert {(case["n"], case["provider"]) for case in report["sweep"]["cases"] if "median_s" in case} >= {
        (16, "triton-exact"), (16, "triton-fast")}
    training = report["training"]
    assert training["steps"] >= 1 and len(training["per_step"]["perplexity"]) == training["steps"]
    assert training["stopped"] == "stopped by the stage's clock"
    assert training["wandb_imported"] is False


def test_a_failing_or_overrunning_stage_is_recorded_and_the_stages_after_it_still_run(tmp_path):
    record.save(tmp_path, {"run": {"limits_s": {"fails": 30, "overruns": 2, "after": 30}}})

    def python(code: str) -> list[str]:
        return [sys.executable, "-c", f"from bench.gpu_report import record; out = {str(tmp_path)!r}; {code}"]

    stages = [
        run.StageRun("fails", python("record.update(out, 'fails', partial=1); raise SystemExit('it broke')"), 30),
        run.StageRun("overruns", python("record.update(out, 'overruns', partial=2); import time; time.sleep(60)"), 2),
        run.StageRun("after", python("record.update(out, 'after', done=True)"), 30),
    ]
    results = run.run_stages(stages, tmp_path, run.child_environment(None))
    report = record.load(tmp_path)
    assert [results[name]["status"] for name in ("fails", "overruns", "after")] == ["failed", "timed out", "ok"]
    assert report["fails"] == {"partial": 1} and report["overruns"] == {"partial": 2}  # what they wrote is kept
    assert report["after"] == {"done": True}
    assert "it broke" in report["stages"]["fails"]["log_tail"]
    table = markdown.stage_table(report, "##")
    assert "| fails | failed |" in table and "| overruns | timed out |" in table and "| after | ok |" in table


def test_the_stages_limits_fit_one_run_of_a_gpu_loan():
    assert sum(stage.limit_s for stage in STAGES) + run.WHEEL_INSTALL_LIMIT_S <= run.LOAN_BUDGET_S


def test_summarize_writes_a_gpu_run_into_results_once_and_refuses_a_smoke_run(smoke, tmp_path):
    out, _ = smoke
    report = record.load(out)
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    block = markdown.results_block(report)
    filled = summarize.fill_gpu_section(results, "run-1", block)
    assert "None yet" not in filled.split("## CPU")[0]  # the placeholder goes
    assert filled.index("<!-- gpu-run run-1 -->") < filled.index("## CPU")
    assert "#### Targets" in filled and "#### Timings at N = 256, K = 64, D = 32" in filled
    assert summarize.fill_gpu_section(filled, "run-1", block) == filled  # the same run is replaced, not repeated
    newer = summarize.fill_gpu_section(filled, "run-2", "### a later run")
    assert newer.index("run-2") < newer.index("run-1")  # newest first

    results_copy = tmp_path / "RESULTS.md"
    results_copy.write_text(results)
    with pytest.raises(SystemExit, match="not a GPU run"):
        summarize.main(["--gpu-report", str(out / "report.json"), "--results", str(results_copy)])
    assert results_copy.read_text() == results


def test_a_partial_run_still_runs_the_environment_stage_first():
    assert [s.name for s in run.selected_stages("training,sweep")] == ["environment", "sweep", "training"]
    assert [s.name for s in run.selected_stages("")] == [s.name for s in STAGES]
    with pytest.raises(ValueError, match="unknown stage 'swept'"):
        run.selected_stages("swept")


def test_an_uninstalled_checkout_gets_its_kernels_linked_under_their_import_name(tmp_path, monkeypatch):
    """The GPU machine may run the report from a checkout that pip never installed: kernels/ must still import as
    vq_kernels in every stage (checked for real in a venv without the project installed: the environment stage
    imported vq_kernels through the link)."""
    assert run.link_kernels(tmp_path) is None, "installed here: nothing to link"
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None)  # as if not installed
    folder = run.link_kernels(tmp_path)
    assert (Path(folder) / "vq_kernels").resolve() == ROOT / "kernels"
    assert folder in run.child_environment(None, folder)["PYTHONPATH"].split(os.pathsep)
    assert "links to the checkout's kernels/" in record.load(tmp_path)["run"]["vq_kernels"]
