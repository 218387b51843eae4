"""``python -m unigendet.info``: what is installed and which fast paths are live.

Prints the torch/CUDA/GPU facts, the Triton version and interpreter mode, whether the compiled
extension loaded (and how), whether NVIDIA DALI is importable, and for every fused op the backend
``auto`` would pick on each available device (or, under ``UNIGENDET_BACKEND``, whether the forced
backend can run), with every backend's reasons.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import torch

from . import __version__, _backend, _ext


def _dali_version() -> str | None:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return None
    try:
        import nvidia.dali as dali
    except Exception as e:  # broken installs are reported, not raised
        return f"import failed: {e}"
    return dali.__version__


def _load_ops() -> None:
    import unigendet.ops  # noqa: F401  (importing registers every op's dispatcher)


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-serialisable dict."""
    _load_ops()
    ext = _ext.load()
    cuda = torch.cuda.is_available()
    facts = {
        "unigendet": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [
            {"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i))}
            for i in range(torch.cuda.device_count())
        ] if cuda else [],
        "triton": _backend.triton_version(),
        "triton_interpret": _backend.triton_interpret(),
        "extension": {"loaded": ext.loaded, "how": ext.how, "with_cuda": ext.with_cuda, "reason": ext.reason},
        "dali": _dali_version(),
        "backend_env": os.environ.get(_backend.ENV_VAR, "auto"),
        "ops": {},
    }
    cases = [("cpu", torch.float32)]
    if cuda:
        cases.append(("cuda", torch.bfloat16))
    for name, disp in sorted(_backend.registered_ops().items()):
        entry = {}
        for dev, dtype in cases:
            info = _backend.CallInfo(torch.device(dev), dtype, head_dim=disp.example_head_dim)
            try:
                chosen = disp.select(info)
            except (_backend.BackendUnavailableError, ValueError) as e:
                chosen = None
                error = str(e)
            else:
                error = None
            entry[f"{dev}/{str(dtype).replace('torch.', '')}"] = {
                "selected": chosen,
                "error": error,
                "reasons": disp.reasons(info),
            }
        facts["ops"][name] = entry
    return facts


def format_report(facts: dict) -> str:
    out = []
    w = out.append
    w(f"unigendet {facts['unigendet']}  (python {facts['python']}, {facts['platform']})")
    w(f"torch {facts['torch']}  CUDA build: {facts['torch_cuda'] or 'none'}  "
      f"CUDA available: {facts['cuda_available']}")
    for i, g in enumerate(facts["gpus"]):
        w(f"  GPU {i}: {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})")
    tri = facts["triton"] or "not installed"
    w(f"triton {tri}  interpreter (TRITON_INTERPRET): {'on' if facts['triton_interpret'] else 'off'}")
    e = facts["extension"]
    if e["loaded"]:
        w(f"compiled extension unigendet._C: loaded ({'ahead of time' if e['how'] == 'aot' else 'JIT build'}), "
          f"C++ CPU kernels: yes, CUDA kernels: {'yes' if e['with_cuda'] else 'no'}")
    else:
        w(f"compiled extension unigendet._C: NOT loaded ({e['reason']})")
    w(f"NVIDIA DALI: {facts['dali'] or 'not installed'}")
    w(f"{_backend.ENV_VAR}={facts['backend_env']}")
    w("ops:")
    if not facts["ops"]:
        w("  (no fused ops registered)")
    for name, entry in facts["ops"].items():
        for case, r in entry.items():
            sel = r["selected"] or "NONE"
            w(f"  {name:<22s} {case:<16s} -> {sel}")
            for b, reasons in r["reasons"].items():
                w(f"      {b:<7s} {'; '.join(reasons) if reasons else 'can run'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unigendet.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    facts = collect()
    print(json.dumps(facts, indent=2) if args.json else format_report(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
