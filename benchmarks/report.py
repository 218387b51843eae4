"""One-command benchmark report: ceilings, GPU correctness tests, benchmarks, and a table + chart.

    python benchmarks/report.py --out benchmarks/results/$(date +%Y%m%d)-$(hostname)

On a GPU machine (one H100/H200: about 5-8 minutes) it

1. measures the card's ceilings: device-to-device copy bandwidth (GB/s) and the bf16 matrix-multiply rate
   (TFLOP/s, 8192^3 GEMM), with CUDA events after warm-up;
2. runs the GPU correctness tests (``pytest tests -m gpu``), bf16 included, and records pass/fail counts;
3. runs ``pytest benchmarks --benchmark-only`` with JSON output;
4. writes ``report.json`` (card, date, versions, ceilings, tests, every benchmark with its extra_info),
   ``report.md`` (per group: each provider's time, TFLOP/s or GB/s, share of the ceiling, and our speed-up
   against every peer) and ``report.png`` (speed-ups per group).

On a CPU-only machine the GPU steps are skipped (and said so in the report); the CPU benchmark cases still run,
so the report's CPU ratios (ours against the reference path) are filled in.

Benchmark conventions read here: the provider is the test's ``provider`` parameter (ours: ``ours*``/``unigendet*``);
``extra_info`` may hold ``tflops``, ``gbps`` and ``peak_mem_bytes``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_ceilings(seconds_budget: float = 20.0) -> dict:
    """Copy bandwidth and bf16 GEMM rate of the current CUDA device (empty dict without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    dev = torch.device("cuda")

    def time_cuda(fn, iters):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    def copy_rate() -> float:
        src = torch.empty(1 << 28, dtype=torch.float32, device=dev).uniform_()  # 1 GiB
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src), 20)
        return 2 * src.numel() * src.element_size() / t / 1e9  # read + write

    copy_gbps = copy_rate()
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, 20)
    gemm_tflops = 2 * m**3 / t / 1e12
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "copy_gbps": round(copy_gbps, 1),
        "bf16_gemm_tflops": round(gemm_tflops, 1),
    }


def _pytest_counts(text: str) -> dict:
    counts = {}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(num)
    return counts


def run_gpu_tests(out_dir: str, timeout: int) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    log = os.path.join(out_dir, "gpu-tests.log")
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(log, "w") as f:
        f.write(text)
    return {"returncode": rc, "seconds": round(time.time() - t0, 1), "counts": _pytest_counts(text[-2000:]),
            "log": os.path.basename(log)}


def run_benchmarks(out_dir: str, timeout: int, select: str | None) -> tuple[dict, list[dict]]:
    path = os.path.join(out_dir, "benchmarks.json")
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={path}"]
    if select:
        cmd += ["-k", select]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired:
        text, rc = "", "timeout"
    with open(os.path.join(out_dir, "benchmarks.log"), "w") as f:
        f.write(text)
    benches = []
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            params = b.get("params") or {}
            benches.append({
                "group": b.get("group") or b["name"].split("[")[0],
                "name": b["name"],
                "provider": str(params.get("provider", b["name"])),
                "mean_s": b["stats"]["mean"],
                "stddev_s": b["stats"]["stddev"],
                "rounds": b["stats"]["rounds"],
                "extra_info": b.get("extra_info", {}),
            })
    return {"returncode": rc, "seconds": round(time.time() - t0, 1), "counts": _pytest_counts(text[-2000:])}, benches


def is_ours(provider: str) -> bool:
    return provider.startswith(("ours", "unigendet"))


def summarise(benches: list[dict], ceilings: dict) -> list[dict]:
    """Per group: our provider(s) against each peer (speed-up = peer time / our time)."""
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b["group"], []).append(b)
    rows = []
    for group, items in sorted(groups.items()):
        ours = [b for b in items if is_ours(b["provider"])]
        peers = [b for b in items if not is_ours(b["provider"])]
        for o in ours:
            row = {"group": group, "ours": o["provider"], "ours_ms": o["mean_s"] * 1e3, "vs": {}}
            for key in ("tflops", "gbps"):
                if key in o["extra_info"]:
                    row[key] = o["extra_info"][key]
            if ceilings and "tflops" in row:
                row["pct_of_gemm"] = 100.0 * row["tflops"] / ceilings["bf16_gemm_tflops"]
            if ceilings and "gbps" in row:
                row["pct_of_copy"] = 100.0 * row["gbps"] / ceilings["copy_gbps"]
            for p in peers:
                row["vs"][p["provider"]] = p["mean_s"] / o["mean_s"]
            rows.append(row)
    return rows


def write_markdown(path: str, report: dict) -> None:
    lines = [f"# unigendet benchmark report ({report['date']})", ""]
    env = report["environment"]
    lines.append(f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
                 f"device: {report['ceilings'].get('device', 'CPU only (' + env['cpu'] + ')')}")
    c = report["ceilings"]
    if c:
        lines.append(f"Ceilings measured: copy {c['copy_gbps']} GB/s, bf16 GEMM {c['bf16_gemm_tflops']} TFLOP/s.")
    t = report["gpu_tests"]
    lines.append(f"GPU tests: {t.get('skipped') or t.get('counts')}")
    lines += ["", "| group | ours | time (ms) | TFLOP/s | GB/s | % of ceiling | speed-up vs peers |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["summary"]:
        pct = r.get("pct_of_gemm", r.get("pct_of_copy"))
        vs = ", ".join(f"{k}: {v:.2f}x" for k, v in sorted(r["vs"].items())) or "-"
        pct_s = f"{pct:.0f}%" if pct is not None else "-"
        tflops = f"{r['tflops']:.3g}" if "tflops" in r else "-"
        gbps = f"{r['gbps']:.3g}" if "gbps" in r else "-"
        lines.append(f"| {r['group']} | {r['ours']} | {r['ours_ms']:.3f} | {tflops} | {gbps} | {pct_s} | {vs} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, summary: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, values = [], []
    for r in summary:
        for peer, v in sorted(r["vs"].items()):
            labels.append(f"{r['group']}\nvs {peer}")
            values.append(v)
    if not values:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(values)), 4.5))
    ax.bar(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of ours (peer time / our time)")
    ax.set_title("unigendet vs peers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latest"))
    p.add_argument("--select", default=None, help="pytest -k expression for the benchmarks")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU correctness tests")
    p.add_argument("--test-timeout", type=int, default=180)
    p.add_argument("--bench-timeout", type=int, default=300)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import importlib.util

    triton_v = None
    if importlib.util.find_spec("triton"):
        import triton

        triton_v = triton.__version__
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_v,
                        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count()},
    }
    report["ceilings"] = measure_ceilings()
    report["gpu_tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_gpu_tests(args.out, args.test_timeout)
    report["benchmark_run"], report["benchmarks"] = run_benchmarks(args.out, args.bench_timeout, args.select)
    report["summary"] = summarise(report["benchmarks"], report["ceilings"])
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_markdown(os.path.join(args.out, "report.md"), report)
    chart = write_chart(os.path.join(args.out, "report.png"), report["summary"])
    print(open(os.path.join(args.out, "report.md")).read())
    print(f"wrote {args.out}/report.json, report.md" + (", report.png" if chart else ""))
    ok = report["benchmark_run"]["returncode"] == 0 and report["gpu_tests"].get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
