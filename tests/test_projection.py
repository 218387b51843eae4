"""The budget projection script runs from measured inputs and writes its assumptions beside the numbers."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_projection_script(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "projection.py"), "--out", str(tmp_path),
                        "--tokens", "256", "--layers", "1", "--rounds", "1"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "projection.json").read_text())
    m = rep["measured"]
    assert m["tokens"] > 0 and m["seconds_per_layer_fwd_bwd"] > 0 and m["achieved_tflops"] > 0
    # the FLOP model: a training step costs more than 4x the LLM forward alone, DIGA adds the teacher pass
    f = rep["step_flops"]
    assert f["gduf"] > 4 * f["llm_fwd"] and f["diga"] > 4 * f["llm_fwd"] + f["teacher_fwd"] * 0.99
    assert 1e6 < f["vae_flops_per_pixel"] < 1e8  # the FLUX encoder: ~4.3 MFLOP per pixel
    (label, proj), = rep["projection"].items()
    assert proj["total_hours"] == proj["gduf_hours"] + proj["diga_hours"] > 0
    assert "Assumptions" in (tmp_path / "projection.md").read_text()
