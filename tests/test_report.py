"""The one-command benchmark report runs end to end on a CPU (GPU parts skipped) and writes its three files."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--out", str(tmp_path),
                        "--select", "cpu_tiny_pack", "--bench-timeout", "500"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["gpu_tests"] == {"skipped": "no CUDA device"} and rep["ceilings"] == {}
    providers = {b["provider"] for b in rep["benchmarks"]}
    assert providers == {"unigendet-torch", "reference-code"}
    assert all(b["mean_s"] > 0 for b in rep["benchmarks"])
    (row, *_) = [s for s in rep["summary"] if s["group"] == "cpu-tiny-pack-fwd"]
    assert row["vs"]["reference-code"] > 0 and row["tflops"] > 0
    assert "| cpu-tiny-pack-fwd |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 1000
