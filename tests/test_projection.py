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


def test_vae_encoder_flops_analytic_equal_flop_counter():
    """The analytic FLUX encoder count (used where diffusers is absent) equals torch's FLOP counter on diffusers."""
    import pytest
    import torch

    pytest.importorskip("diffusers")
    from torch.utils.flop_counter import FlopCounterMode

    from unigendet.models import get_config
    from unigendet.models.vae import build_vae, flux_encoder_flops

    cfg = get_config("bagel-7b-mot").vae
    for h, w in ((64, 64), (128, 96)):
        with torch.device("meta"):
            vae = build_vae(cfg)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            vae.encode(torch.empty(1, 3, h, w, device="meta"))
        assert flux_encoder_flops(cfg, h, w) == fc.get_total_flops()


def test_projection_needs_no_diffusers(tmp_path):
    hide = ("import sys, importlib.abc, runpy\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'diffusers': raise ImportError('hidden by test')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.argv = ['projection.py', '--out', {str(tmp_path)!r}, '--tokens', '128', '--layers', '1', "
            "'--rounds', '1']\n"
            f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'projection.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "projection.json").read_text())
    assert 1e6 < rep["step_flops"]["vae_flops_per_pixel"] < 1e8
