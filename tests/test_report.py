"""The one-command report: its CPU smoke form end to end (a subset of steps), the budget rule and the tables."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "report.py")


def _run(out, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, REPORT, "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def test_smoke_report_writes_every_finished_step(tmp_path):
    r = _run(tmp_path, "--budget-s", "240", "--only", "environment,ceilings,diga,train_step,projection")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["mode"] == "smoke" and rep["environment"]["torch"]
    assert rep["ceilings"]["copy_gbps"] > 0 and rep["ceilings"]["gemm_tflops"] > 0
    ours = rep["diga"]["cpu-2x32x32-t37-d3584-fp32"]["providers"]["ours"]
    assert ours["fwd_ms"] > 0 and ours["bwd_ms"] > 0 and ours["bwd_gbps"] > 0
    ts = rep["train_step"]
    assert ts["master_dtype"] == "fp32" and ts["providers"]["unigendet"]["step_ms"] > 0
    assert "step_ms" in ts["providers"]["reference-code"]
    (label, proj), = rep["projection"]["projection"].items()
    assert proj["total_hours"] > 0
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 6 and {"report.json", "report.md", "report.log"} <= set(files), files
    md = (tmp_path / "report.md").read_text()
    assert "## Training step" in md and "## Diga" in md
    events = [json.loads(line)["event"] for line in (tmp_path / "report.log").read_text().splitlines()]
    assert "environment" in events and "projection" in events


def test_budget_stops_new_steps_and_says_so(tmp_path):
    r = _run(tmp_path, "--budget-s", "0.5", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    skipped = rep["skipped"]
    assert {"train_step", "projection"} <= set(skipped)
    assert all(v.startswith("budget:") for v in skipped.values())
    assert "## Not run" in (tmp_path / "report.md").read_text()


def test_bad_arguments_are_one_line_errors(tmp_path):
    r = _run(tmp_path, "--only", "nonsense", timeout=120)
    assert r.returncode == 2 and "unknown step" in r.stderr and "Traceback" not in r.stderr


def test_markdown_of_a_partial_report():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import report

    d = {"date": "d", "mode": "gpu", "command": "c", "budget_s": 360, "elapsed_s": 12.0,
         "environment": {"torch": "2.11", "gpu": "H200"}, "ceilings": {"copy_gbps": 4300.0, "gemm_tflops": 790.0},
         "attention": {"w": {"providers": {"ours-triton": {"fwd_ms": 2.0, "bwd_ms": 5.0, "fwd_tflops": 400.0,
                                                           "bwd_tflops": 300.0, "fwd_pct_of_gemm": 50.6},
                                           "flex": {"fwd_ms": 3.0, "bwd_ms": 6.0, "fwd_tflops": 266.0,
                                                    "bwd_tflops": 250.0},
                                           "flash-attn": {"skipped": "flash_attn is not installed"}}}},
         "skipped": {"train_step": "budget: 3 s left, about 20 s needed"}}
    report._speedups(d["attention"]["w"])
    md = report.markdown(d)
    assert "| w | flex | 3 | 6 |" in md and "1.50x / 1.20x" in md
    assert "flash_attn is not installed" in md and "train_step: budget" in md
