"""One-command report for a GPU machine: correctness, speed against every peer present, a training step, projection.

    python benchmarks/report.py --out DIR --budget-s 360          # a GPU machine (about 6 minutes)
    python benchmarks/report.py --smoke --out DIR --budget-s 240  # the same steps on a CPU, tiny shapes

It runs from a source checkout (``PYTHONPATH=.``) or an install, needs no network and no optional package, and
takes the steps cheapest-and-most-important first, rewriting its files after every result so that a kill at any
moment leaves everything finished on disk; once ``--budget-s`` is spent it starts no new step (each is listed
as skipped, with the reason). Steps:

1. ``environment`` and ``ceilings``: versions, the device, which peers are importable (and why not), and the
   card's measured copy bandwidth and bf16 matrix-multiply rate (the ceilings every rate is compared with).
2. ``correctness``: every Triton attention kernel (forward, both backwards, one and three K/V sources, head dims
   128 and 72) in bf16 and fp16 against the fp64 reference, by flash-attention's rule (error at most 2x outputs /
   3x gradients plain PyTorch's at the same precision), with GQA, fully masked rows and empty segments;
   bit-for-bit determinism of the forward and the deterministic backward over two runs; the CUDA DIGA kernels
   likewise. (On a CPU: the Triton kernels under the interpreter in fp32/fp16, and the C++ DIGA kernel.)
3. ``attention``: forward and backward timed separately for plain varlen (BAGEL-7B causal, SigLIP head dim 72),
   the FakeClue-like 33k-token packed layout and SMSA, against torch SDPA per sample (flash and cuDNN kernels),
   torch's varlen attention, FlexAttention with the same block mask, the public code's path, flash-attn and
   xformers where importable; TFLOP/s over the visible (query, key) pairs and the share of the measured GEMM rate.
4. ``diga``: the DIGA loss forward and backward against the PyTorch loss (eager and compiled), GB/s and the share
   of the measured copy bandwidth.
5. ``train_step``: two MoT decoder layers of BAGEL-7B width, forward + backward + AdamW step with fp32 master
   weights and bf16 compute, on the packed layout, against the public code's decoder path; peak memory.
6. ``projection``: the paper's schedule projected from the measured step (no diffusers: the VAE is counted
   analytically).

Launches use the kernels' first-choice configurations (each variant compiles once) unless ``--full-autotune``.
Files, all in ``--out``: ``report.json`` (everything), ``report.md`` (the tables), ``report.png`` (speed-ups and
shares of the ceilings), ``report.log`` (one JSON line per event) and ``background.log`` (the output of the
extension build and of the processes that compile the kernels in parallel while the ceilings are measured).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("environment", "ceilings", "correctness", "attention", "diga", "train_step", "projection")


# --------------------------------------------------------------------------------------------------
# The report: budget, incremental files
# --------------------------------------------------------------------------------------------------


class Report:
    """Results so far, rewritten to disk after every change (atomically: a temporary file, then a rename)."""

    def __init__(self, out: str, budget_s: float, smoke: bool):
        self.out, self.budget_s, self.smoke = out, budget_s, smoke
        self.t0 = time.monotonic()
        os.makedirs(out, exist_ok=True)
        self.data: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "mode": "smoke" if smoke else "gpu", "budget_s": budget_s,
                           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                           "skipped": {}}
        self._log = open(os.path.join(out, "report.log"), "a", buffering=1)
        # output of the background processes (extension build, parallel kernel compiles)
        self._bg_log = open(os.path.join(out, "background.log"), "a", buffering=1)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, event: str, **kw) -> None:
        rec = {"t": round(self.elapsed(), 2), "event": event, **kw}
        self._log.write(json.dumps(rec, default=str) + "\n")
        print(f"[{rec['t']:7.1f}s] {event} " + " ".join(f"{k}={v}" for k, v in kw.items()), flush=True)

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})

    def can_start(self, what: str, need_s: float) -> bool:
        """Whether a step estimated at ``need_s`` seconds fits the remaining budget (recorded when not)."""
        if self.remaining() >= need_s:
            return True
        self.data["skipped"][what] = f"budget: {self.remaining():.0f} s left, about {need_s:.0f} s needed"
        self.log("skip", what=what, reason=self.data["skipped"][what])
        self.save()
        return False

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        _atomic_write(os.path.join(self.out, "report.json"), json.dumps(self.data, indent=1, default=_json_default))
        _atomic_write(os.path.join(self.out, "report.md"), markdown(self.data))

    def close(self) -> None:
        self.save()
        with contextlib.suppress(Exception):
            write_chart(os.path.join(self.out, "report.png"), self.data)
        self._log.close()
        self._bg_log.close()


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def guarded(rep: Report, where: dict, key: str):
    """Record an exception under ``where[key]`` instead of stopping the report."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is a result
        where[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        rep.log("error", where=key, error=where[key]["error"], trace=traceback.format_exc()[-1500:])
    finally:
        rep.save()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, *, warmup: int = 2, min_reps: int = 3, max_reps: int = 30, target_s: float = 0.3) -> dict:
    """Median seconds of ``fn()`` (device-synchronised), after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    t_start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t_start < target_s):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "reps": len(times)}


def peak_memory(fn, device) -> int | None:
    """Peak device memory of one call of ``fn`` above what was allocated before (CUDA only)."""
    from conftest import peak_memory_bytes

    return peak_memory_bytes(fn, device)


# --------------------------------------------------------------------------------------------------
# 1. Environment and ceilings
# --------------------------------------------------------------------------------------------------

PEERS = {"flash_attn": "flash-attn", "xformers": "xformers", "diffusers": "diffusers"}


def step_environment(rep: Report, device) -> None:
    import torch

    from unigendet import _backend

    env = rep.section("environment")
    env.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               triton=_backend.triton_version(), triton_interpret=_backend.triton_interpret(),
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    env["autotune"] = os.environ.get("UNIGENDET_TRITON_AUTOTUNE", "off")
    peers = {}
    for mod, name in PEERS.items():
        peers[name] = "importable" if importlib.util.find_spec(mod) else f"absent: {mod} is not installed"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        peers["torch-varlen"] = "importable"
    except ImportError as e:
        peers["torch-varlen"] = f"absent: {e}"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        peers["flex"] = "importable"
    except ImportError as e:
        peers["flex"] = f"absent: {e}"
    env["peers"] = peers
    rep.log("environment", **{k: v for k, v in env.items() if k != "peers"})


def step_ceilings(rep: Report, device) -> None:
    import torch

    c = rep.section("ceilings")
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_reps=5)["median_s"]
    c["copy_gbps"] = round(2 * n * 4 / t / 1e9, 1)
    m = 8192 if device.type == "cuda" else 1024
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    t = time_fn(lambda: a @ b, device, min_reps=5)["median_s"]
    c["gemm_tflops"] = round(2 * m**3 / t / 1e12, 3)
    c["gemm"] = f"{m}^3 {str(dt).replace('torch.', '')}"
    rep.log("ceilings", **c)


# --------------------------------------------------------------------------------------------------
# 2. Correctness
# --------------------------------------------------------------------------------------------------


def _helpers():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import attention_helpers

    return attention_helpers


def _cu(lengths, device):
    import torch

    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def attention_cases(smoke: bool, device):
    """Correctness cases: name -> (q, ks, vs, dense masks, layout). Odd sizes, GQA, empty segments, masked rows."""
    import torch

    from unigendet.ops import AttentionLayout

    h = _helpers()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    cases = {}
    if smoke:
        lq, lk, heads, d = [1, 17, 0, 40, 9], [1, 17, 3, 40, 2], (4, 2), 64
        samples = [[(6, "causal"), (20, "full"), (13, "noise"), (3, "causal")], [(9, "causal"), (5, "full")]]
        smsa = ([19, 1, 6], [17, 0, 9], [19, 1, 6], 72)
    else:
        # bottom-right causal with Nq > Nk (fully masked rows), an empty query and an empty key segment
        lq, lk, heads, d = [1, 17, 0, 1000, 2049, 300, 64], [1, 17, 3, 1000, 2049, 100, 0], (28, 4), 128
        samples = [[(40, "causal"), (300, "full"), (256, "noise"), (20, "causal")],
                   [(64, "causal"), (700, "full"), (15, "causal")]]
        smsa = ([700, 300, 1], [513, 256, 0], [700, 300, 1], 72)
    cu_q, cu_k = _cu(lq, "cpu"), _cu(lk, "cpu")
    q, k, v = rand(sum(lq), heads[0], d), rand(sum(lk), heads[1], d), rand(sum(lk), heads[1], d)
    cases[f"varlen-causal-gqa{heads[0]}x{heads[1]}-d{d}"] = (
        q, [k], [v], [h.mask_varlen(cu_q, cu_k, True)], AttentionLayout.varlen(cu_q, cu_k, True))
    total = sum(n for s in samples for n, _ in s)
    q, k, v = rand(total, heads[0], d), rand(total, heads[1], d), rand(total, heads[1], d)
    cases[f"bagel-packed-d{d}"] = (q, [k], [v], [h.mask_from_splits_vectorised(samples)],
                                   AttentionLayout.from_splits(samples))
    lq, lgen, ldet, d72 = smsa
    cu_q, cu_gen, cu_det = _cu(lq, "cpu"), _cu(lgen, "cpu"), _cu(ldet, "cpu")
    q = rand(sum(lq), 16, d72)
    ks = [rand(sum(lgen), 16, d72), rand(sum(ldet), 16, d72), None]
    vs = [rand(sum(lgen), 16, d72), rand(sum(ldet), 16, d72), None]
    masks = [h.mask_varlen(cu_q, cu_gen, False), h.mask_varlen(cu_q, cu_det, False), None]
    cases["smsa-3src-txt-absent-d72"] = (q, ks, vs, masks, AttentionLayout.smsa(cu_q, [cu_gen, cu_det, None]))
    return cases


def check_attention_case(q, ks, vs, masks, layout, dtype, device, deterministic: bool, backend: str):
    """The flash-attention rule for out/lse/dq/dk/dv of one case; returns the measured errors and bounds."""
    import torch

    from unigendet.ops import packed_attention

    h = _helpers()
    present = [i for i, k in enumerate(ks) if k is not None]
    lay = layout.to(device)
    qd = q.to(device, dtype).requires_grad_()
    kd = [None if k is None else k.to(device, dtype).requires_grad_() for k in ks]
    vd = [None if v is None else v.to(device, dtype).requires_grad_() for v in vs]
    empty = torch.zeros(0, ks[present[0]].shape[1], q.shape[-1], device=device, dtype=dtype)
    kk = [empty if t is None else t for t in kd]
    vv = [empty if t is None else t for t in vd]
    arg_k = kk if len(kk) > 1 else kk[0]
    arg_v = vv if len(vv) > 1 else vv[0]
    out, lse = packed_attention(qd, arg_k, arg_v, lay, return_lse=True, deterministic=deterministic,
                                backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = [qd, *(kd[i] for i in present), *(vd[i] for i in present)]
    grads = torch.autograd.grad(out, leaves, dout)

    def dense(prec, reorder):
        ls = [t.detach().to(prec).requires_grad_() for t in leaves]
        n = len(present)
        o, l_ = h.dense_attention(ls[0], ls[1:1 + n], ls[1 + n:], [masks[i].to(device) for i in present],
                                  dtype=prec, reorder=reorder)
        return o, l_, torch.autograd.grad(o, ls, dout.to(prec))

    ref_o, ref_l, ref_g = dense(torch.float64, False)
    pt_o, pt_l, pt_g = dense(dtype, True)
    res, ok = {}, True
    names = ["out", "lse", "dq", *(f"dk{i}" for i in present), *(f"dv{i}" for i in present)]
    triples = [(out, ref_o, pt_o, 2.0, dtype), (lse, ref_l, pt_l.float(), 2.0, torch.float32),
               *((g, r, p, 3.0, dtype) for g, r, p in zip(grads, ref_g, pt_g))]
    for name, (got, ref, pt, factor, dt) in zip(names, triples):
        err, base = h.max_err(got, ref), h.max_err(pt, ref)
        bound = factor * base + h.noise_floor(ref, dt) + (1e-6 if dt == torch.float32 else 1e-4)
        finite = bool(torch.isfinite(got[torch.isfinite(ref)]).all()) if name != "lse" else True
        res[name] = {"err": err, "pytorch_err": base, "bound": bound, "pass": err <= bound and finite}
        ok &= res[name]["pass"]
    # fully masked rows: out 0 and lse -inf, exactly where the reference has -inf
    res["masked_rows_match"] = bool(torch.equal(torch.isinf(lse), torch.isinf(ref_l.to(lse.device))))
    ok &= res["masked_rows_match"]
    return ok, res, (out.detach(), grads)


def step_correctness(rep: Report, device) -> None:
    import torch

    sec = rep.section("correctness")
    att = sec.setdefault("attention", {})
    backend = "triton"
    if rep.smoke:
        dtypes = [torch.float32, torch.float16]  # the interpreter cannot multiply bf16
    else:
        dtypes = [torch.bfloat16, torch.float16]
    cases = attention_cases(rep.smoke, device)
    for dtype in dtypes:
        for name, (q, ks, vs, masks, layout) in cases.items():
            for det in (True, False):
                key = f"{name}-{str(dtype).replace('torch.', '')}-{'deterministic' if det else 'atomic-dq'}"
                if not rep.can_start(f"correctness/{key}", 5 if rep.smoke else 8):
                    continue
                with guarded(rep, att, key):
                    t = time.perf_counter()
                    ok, res, first = check_attention_case(q, ks, vs, masks, layout, dtype, device, det, backend)
                    if det:  # two runs, bit for bit (forward and the deterministic backward)
                        _, _, second = check_attention_case(q, ks, vs, masks, layout, dtype, device, det, backend)
                        same = torch.equal(first[0], second[0]) and all(
                            torch.equal(a, b) for a, b in zip(first[1], second[1]))
                        res["bitwise_repeatable"] = same
                        ok &= same
                    att[key] = {"pass": ok, "seconds": round(time.perf_counter() - t, 2), **res}
                    rep.log("correctness", case=key, passed=ok)
    diga = sec.setdefault("diga", {})
    ext_backend = "cuda" if device.type == "cuda" else "cpp"
    if not wait_extension(rep, 120 if device.type == "cuda" else 30):
        diga["skipped"] = rep.data.get("extension", {}).get("status", "extension not built")
        return
    for dtype in ([torch.float32, torch.bfloat16, torch.float16]):
        key = f"diga-{str(dtype).replace('torch.', '')}"
        if not rep.can_start(f"correctness/{key}", 3):
            continue
        with guarded(rep, diga, key):
            diga[key] = check_diga(dtype, device, ext_backend, rep.smoke)
            rep.log("correctness", case=key, passed=diga[key]["pass"])


def check_diga(dtype, device, backend: str, smoke: bool) -> dict:
    import torch

    from unigendet.ops import diga_loss

    n_img, sg, tg, dim = (2, (5, 7), (4, 9), 64) if smoke else (8, (32, 32), (37, 37), 3584)
    s_grids, t_grids = [sg] * n_img, [tg] * n_img
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, dim, generator=g)
    s = (torch.randn(n_img * sg[0] * sg[1], dim, generator=g) + base)
    t = (torch.randn(n_img * tg[0] * tg[1], dim, generator=g) + base)
    s[0] = 0  # a zero student row: the gradient of the clamped norm

    def run(x, y, be):
        x = x.clone().requires_grad_()
        loss = diga_loss(x, y, s_grids, t_grids, backend=be)
        loss.backward()
        return loss.detach(), x.grad

    ref, ref_g = run(s.double().to(device), t.double().to(device), "torch")
    pt, pt_g = run(s.to(device, dtype), t.to(device, dtype), "torch")
    out, gr = run(s.to(device, dtype), t.to(device, dtype), backend)
    out2, gr2 = run(s.to(device, dtype), t.to(device, dtype), backend)
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=device)
    keep[0] = False  # the zero row's ~1e8 entries are compared by themselves below

    def err(a, b):
        return float((a.double() - b.double()).abs().max())

    e, e_pt = err(out, ref), err(pt, ref)
    ge, ge_pt = err(gr[keep], ref_g[keep]), err(pt_g[keep], ref_g[keep])
    floor = 2 * err(ref.to(dtype), ref) + 1e-7
    gfloor = 2 * err(ref_g[keep].to(dtype), ref_g[keep]) + 1e-9
    ok = e <= 2 * e_pt + floor and ge <= 3 * ge_pt + gfloor and bool(torch.isfinite(gr).all())
    return {"pass": ok and torch.equal(out, out2) and torch.equal(gr, gr2), "loss_err": e, "pytorch_loss_err": e_pt,
            "grad_err": ge, "pytorch_grad_err": ge_pt, "bitwise_repeatable": torch.equal(out, out2)
            and torch.equal(gr, gr2), "zero_row_grad_finite": bool(torch.isfinite(gr[0]).all())}


# --------------------------------------------------------------------------------------------------
# The compiled extension (built in the background: nvcc takes a while)
# --------------------------------------------------------------------------------------------------


def start_extension_build(rep: Report) -> None:
    code = "from unigendet import _ext; s = _ext.load(); print(s)"
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", ROOT)
    rep._ext = subprocess.Popen([sys.executable, "-c", code], stdout=rep._bg_log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env)
    rep.log("extension", status="building or loading in the background")


def wait_extension(rep: Report, max_wait_s: float) -> bool:
    """Wait for the background build (at most ``max_wait_s`` and the budget); load it here when it succeeded."""
    from unigendet import _ext

    proc = getattr(rep, "_ext", None)
    info = rep.data.setdefault("extension", {})
    if proc is not None:
        try:
            proc.wait(timeout=max(1.0, min(max_wait_s, rep.remaining() - 10)))
        except subprocess.TimeoutExpired:
            info["status"] = "still building when the report needed it"
            return False
        rep._ext = None
    status = _ext.load()
    info.update(status=f"{status.how}: loaded" if status.loaded else f"not loaded: {status.reason[:300]}",
                with_cuda=status.with_cuda)
    rep.log("extension", **info)
    return status.loaded


# --------------------------------------------------------------------------------------------------
# Compiling the Triton kernels in parallel (their on-disk cache is shared by processes)
# --------------------------------------------------------------------------------------------------

# (dtype, head dim, sources) of every kernel variant the report launches. The kernels are specialised on
# dtypes, constexprs and pointer alignment only (never on lengths or head counts), so tiny launches compile
# exactly the kernels the large ones use.
WARM_SPECS = [(dt, hd, ns) for dt in ("bfloat16", "float16") for hd, ns in ((128, 1), (128, 3), (72, 3), (72, 1))]


def warm_worker(index: int, count: int) -> int:
    """Launch (and so compile) every kernel variant of the specs assigned to this worker, both backwards."""
    import torch

    from unigendet.ops import AttentionLayout, packed_attention

    dev = torch.device("cuda")
    for i, (dt, hd, ns) in enumerate(WARM_SPECS):
        if i % count != index:
            continue
        dtype = getattr(torch, dt)
        cu = _cu([37, 91], dev)
        if ns == 1:
            layout = AttentionLayout.varlen(cu, cu, True, total_q=128, total_k=128, max_seqlen_q=91, max_seqlen_k=91)
            kv = [torch.randn(128, 2, hd, device=dev, dtype=dtype) for _ in range(2)]
        else:
            layout = AttentionLayout.smsa(cu, [cu, cu, cu], total_q=128, total_k=(128, 128, 128), max_seqlen_q=91,
                                          max_seqlen_k=(91, 91, 91))
            kv = [[torch.randn(128, 2, hd, device=dev, dtype=dtype) for _ in range(3)] for _ in range(2)]
        for det in (True, False):
            q = torch.randn(128, 4, hd, device=dev, dtype=dtype, requires_grad=True)
            out = packed_attention(q, kv[0], kv[1], layout, deterministic=det, backend="triton")
            out.sum().backward()
        torch.cuda.synchronize()
        print(f"warm-up worker {index}: compiled {dt} head dim {hd}, {ns} source(s)", flush=True)
    return 0


def start_warmup(rep: Report) -> None:
    n = max(1, min(len(WARM_SPECS), (os.cpu_count() or 2) - 2))
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", ROOT)
    rep._warm = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", rep.out, "--warm-worker",
                                   f"{i}/{n}"], stdout=rep._bg_log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
                 for i in range(n)]
    rep.log("warm-up", workers=n, variants=len(WARM_SPECS))


def wait_warmup(rep: Report, max_wait_s: float) -> None:
    t = time.monotonic()
    for proc in getattr(rep, "_warm", []):
        left = max(0.0, min(max_wait_s - (time.monotonic() - t), rep.remaining() - 30))
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
    codes = [p.returncode for p in getattr(rep, "_warm", [])]
    rep.data["warm_up"] = {"workers": len(codes), "exit_codes": codes, "seconds": round(time.monotonic() - t, 1)}
    rep.log("warm-up done", **rep.data["warm_up"])


# --------------------------------------------------------------------------------------------------
# 3. Attention speed
# --------------------------------------------------------------------------------------------------


def _bench_module(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    return __import__(name)


def attention_workloads(smoke: bool):
    """name -> (kind, heads, kv heads, head dim, samples or lengths)."""
    ba = _bench_module("bench_attention")
    if smoke:
        samples, _ = ba.fakeclue_samples(600, seed=1, lo=150, hi=300)
        return {"varlen-causal-d64": ("varlen", 4, 2, 64, True, [sum(n for n, _ in s) for s in samples]),
                "packed-600-d64": ("packed", 4, 1, 64, samples),
                "smsa-det-d64": ("smsa", 4, 2, 64, [40, 40], [30, 30], [10, 12])}
    samples, _ = ba.fakeclue_samples(33_000)
    return {
        "varlen-bagel7b-causal-33k-d128": ("varlen", 28, 4, 128, True, [sum(n for n, _ in s) for s in samples]),
        "packed-fakeclue-33k-d128": ("packed", 28, 4, 128, samples),
        "smsa-det512x8-d128": ("smsa", 28, 4, 128, [1371] * 8, [1026] * 8, [240 + 5 * i for i in range(8)]),
        "varlen-siglip-d72": ("varlen", 16, 16, 72, False, [729, 4900, 1024, 2304, 4096, 1600, 3136, 729, 4900]),
    }


def _providers(kind: str, smoke: bool):
    """(ours, peers) of a workload kind. On a CPU ours is the torch backend (timing the Triton interpreter would
    say nothing); the interpreter's results are checked in ``correctness``."""
    if smoke:
        ours = ["ours-torch"]
        peers = {"varlen": ["sdpa-math", "reference-code"], "packed": ["reference-code"],
                 "smsa": ["cat+ours", "reference-code"]}[kind]
        return ours, peers
    ours = ["ours-triton", "ours-triton-atomic"]
    peers = {"varlen": ["sdpa-flash", "sdpa-cudnn", "torch-varlen", "flash-attn", "xformers", "reference-code",
                        "flex"],
             "packed": ["reference-code", "flex"],
             "smsa": ["cat+ours", "reference-code"]}[kind]
    return ours, peers


def _build_attention(rep: Report, name: str, spec, device, dtype):
    """Inputs, layout, visible pairs and the FLOP count of one workload."""
    import torch

    from unigendet.ops import AttentionLayout

    ba = _bench_module("bench_attention")
    kind = spec[0]
    g = torch.Generator().manual_seed(3)
    if kind == "varlen":
        _, h, hkv, d, causal, lengths = spec
        total = sum(lengths)
        cu = _cu(lengths, device)
        layout = AttentionLayout.varlen(cu, cu, causal, total_q=total, total_k=total, max_seqlen_q=max(lengths),
                                        max_seqlen_k=max(lengths))
        host = AttentionLayout.varlen(cu.cpu(), cu.cpu(), causal)
        kv = [(total, hkv, d)] * 2
        extra = {"cu": cu, "lengths": lengths, "causal": causal, "samples": [[(n, "causal" if causal else "full")]
                                                                              for n in lengths]}
    elif kind == "packed":
        _, h, hkv, d, samples = spec
        total = sum(n for s in samples for n, _ in s)
        host = AttentionLayout.from_splits(samples)
        layout = host.to(device)
        kv = [(total, hkv, d)] * 2
        extra = {"samples": samples}
    else:
        _, h, hkv, d, lq, lgen, ltxt = spec
        cus = [_cu(x, device) for x in (lgen, lq, ltxt)]
        cu_q = _cu(lq, device)
        host = AttentionLayout.smsa(cu_q.cpu(), [c.cpu() for c in cus])
        layout = host.to(device)
        total = sum(lq)
        kv = [(sum(x), hkv, d) for x in (lgen, lgen, lq, lq, ltxt, ltxt)]
        extra = {"cu_q": cu_q, "cus": cus, "lq": lq, "lens": (lgen, lq, ltxt)}
    pairs = ba.visible_pairs(host.plan_cpu)
    q = (torch.randn(total, h, d, generator=g)).to(device, dtype)
    kvs = [(torch.randn(*shape, generator=g)).to(device, dtype) for shape in kv]
    return {"kind": kind, "h": h, "hkv": hkv, "d": d, "layout": layout, "q": q, "kv": kvs, "pairs": pairs,
            "flops_fwd": ba.attention_flops(pairs, h, d, "fwd"), "tokens": total, **extra}


def _attention_fn(provider: str, w: dict, device):
    """A callable (q, *kv) -> out for one provider, or a string saying why it cannot run here."""
    import torch
    import torch.nn.functional as F

    from unigendet.ops import packed_attention

    ba = _bench_module("bench_attention")
    kind, h, hkv, d, layout = w["kind"], w["h"], w["hkv"], w["d"], w["layout"]
    scale = d**-0.5
    if provider.startswith("ours"):
        backend = "torch" if provider == "ours-torch" else "triton"
        det = not provider.endswith("-atomic")
        if kind == "smsa":
            return lambda q, kg, vg, kd, vd, kt, vt: packed_attention(q, [kg, kd, kt], [vg, vd, vt], layout, scale,
                                                                      deterministic=det, backend=backend)
        return lambda q, k, v: packed_attention(q, k, v, layout, scale, deterministic=det, backend=backend)
    if provider == "cat+ours":
        return ba.smsa_cat_then_ours(w["cu_q"], w["cus"], scale, "triton" if device.type == "cuda" else "torch")
    if provider == "reference-code":
        if kind == "smsa":
            return ba.smsa_reference_code(w["lq"], w["cus"], h, hkv, scale)
        masks = ba.reference_code_masks(w["samples"], device, w["q"].dtype)
        return lambda q, k, v: ba.reference_code_attention(q, k, v, masks, scale)
    if provider == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "FlexAttention is not in this torch"
        flex = ba.flex_bagel(w["samples"], w["tokens"], h, device)
        return flex and (lambda q, k, v: flex(q, k, v, scale)) or "FlexAttention unavailable"
    if provider in ("sdpa-flash", "sdpa-cudnn", "sdpa-math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                  "sdpa-math": SDPBackend.MATH}[provider]
        lengths, causal = w["lengths"], w["causal"]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]

        def run(q, k, v):
            outs = []
            with sdpa_kernel(kernel):
                for s0, n in zip(starts, lengths):
                    qs = q[s0:s0 + n].transpose(0, 1).unsqueeze(0)
                    ks = k[s0:s0 + n].transpose(0, 1).unsqueeze(0)
                    vs = v[s0:s0 + n].transpose(0, 1).unsqueeze(0)
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=h != hkv)
                    outs.append(o.squeeze(0).transpose(0, 1))
            return torch.cat(outs, 0)
        return run
    if provider == "torch-varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as e:
            return f"torch.nn.attention.varlen unavailable: {e}"
        cu, mx = w["cu"], max(w["lengths"])
        ws = (-1, 0) if w["causal"] else (-1, -1)
        return lambda q, k, v: varlen_attn(q, k, v, cu, cu, mx, mx, scale=scale, window_size=ws)
    if provider in ("flash-attn", "xformers"):
        mod = {"flash-attn": "flash_attn", "xformers": "xformers"}[provider]
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
        try:
            return ba._varlen_peer(provider, w["cu"], max(w["lengths"]), w["causal"], h, hkv, w["lengths"], device,
                                   scale)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - pytest.skip raises an outcome that is not an Exception
            return f"{provider}: {e}"
    return f"unknown provider {provider}"


def _time_fwd_bwd(fn, w: dict, device, rep: Report) -> dict:
    import torch

    inputs = [w["q"], *w["kv"]]
    with torch.no_grad():
        fwd = time_fn(lambda: fn(*inputs), device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    bwd = time_fn(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), device)
    res = {"fwd_ms": fwd["median_s"] * 1e3, "bwd_ms": bwd["median_s"] * 1e3,
           "fwd_tflops": w["flops_fwd"] / fwd["median_s"] / 1e12,
           "bwd_tflops": 2.5 * w["flops_fwd"] / bwd["median_s"] / 1e12}
    mem = peak_memory(lambda: torch.autograd.grad(fn(*leaves), leaves, dout), device)
    if mem is not None:
        res["peak_mem_mib"] = round(mem / 2**20, 1)
    gemm = rep.data.get("ceilings", {}).get("gemm_tflops")
    if gemm:
        res["fwd_pct_of_gemm"] = 100 * res["fwd_tflops"] / gemm
        res["bwd_pct_of_gemm"] = 100 * res["bwd_tflops"] / gemm
    return res


def step_attention(rep: Report, device) -> None:
    import torch

    sec = rep.section("attention")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, spec in attention_workloads(rep.smoke).items():
        if not rep.can_start(f"attention/{name}", 10):
            continue
        res = sec.setdefault(name, {"providers": {}})
        with guarded(rep, res, "setup"):
            w = _build_attention(rep, name, spec, device, dtype)
            res.update(tokens=w["tokens"], visible_pairs=w["pairs"], heads=w["h"], kv_heads=w["hkv"],
                       head_dim=w["d"], gflop_fwd=w["flops_fwd"] / 1e9)
        if "error" in res.get("setup", {}):
            continue
        ours, peers = _providers(spec[0], rep.smoke)
        for provider in [*ours, *peers]:
            if not rep.can_start(f"attention/{name}/{provider}", 60 if provider == "flex" else 8):
                continue
            with guarded(rep, res["providers"], provider):
                fn = _attention_fn(provider, w, device)
                if isinstance(fn, str):
                    res["providers"][provider] = {"skipped": fn}
                    rep.log("attention", workload=name, provider=provider, skipped=fn)
                    continue
                res["providers"][provider] = _time_fwd_bwd(fn, w, device, rep)
                rep.log("attention", workload=name, provider=provider, **{
                    k: round(v, 3) for k, v in res["providers"][provider].items() if isinstance(v, float)})
        _speedups(res)
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _speedups(res: dict) -> None:
    """Our time against every peer, forward and backward (peer time / our time)."""
    provs = res.get("providers", {})
    ours = next((p for p in ("ours-triton", "ours-torch") if "fwd_ms" in provs.get(p, {})), None)
    if ours is None:
        return
    sp = {}
    for p, r in provs.items():
        if p == ours or "fwd_ms" not in r:
            continue
        sp[p] = {"fwd": r["fwd_ms"] / provs[ours]["fwd_ms"], "bwd": r["bwd_ms"] / provs[ours]["bwd_ms"]}
    res["ours"] = ours
    res["speedup_vs"] = sp


# --------------------------------------------------------------------------------------------------
# 4. DIGA speed
# --------------------------------------------------------------------------------------------------


def step_diga(rep: Report, device) -> None:
    import torch

    sec = rep.section("diga")
    if not wait_extension(rep, 60):
        sec["skipped"] = rep.data.get("extension", {}).get("status", "extension not built")
        return
    cases = ({"cpu-2x32x32-t37-d3584-fp32": (torch.float32, 2, (32, 32), (37, 37), 3584)} if rep.smoke else
             {"8x32x32-t37-d3584-bf16": (torch.bfloat16, 8, (32, 32), (37, 37), 3584),
              "8x64x64-t70-d3584-bf16": (torch.bfloat16, 8, (64, 64), (70, 70), 3584)})
    for name, case in cases.items():
        _diga_case(rep, sec.setdefault(name, {"providers": {}}), name, case, device)
        rep.save()


def _diga_case(rep: Report, res: dict, name: str, case, device) -> None:
    import torch

    from unigendet.ops import diga_loss

    bd = _bench_module("bench_diga_loss")
    dtype, n_img, sg, tg, dim = case
    backend = "cuda" if device.type == "cuda" else "cpp"
    copy = rep.data.get("ceilings", {}).get("copy_gbps")
    s_grids, t_grids = [sg] * n_img, [tg] * n_img
    n, m = n_img * sg[0] * sg[1], n_img * tg[0] * tg[1]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, dim, generator=g).to(device, dtype)
    teacher = torch.randn(m, dim, generator=g).to(device, dtype)
    es = student.element_size()
    # minimum traffic: the forward reads student and teacher; the backward reads both and writes the gradient
    bytes_fwd, bytes_bwd = (n + m) * dim * es, (2 * n + m) * dim * es
    res.update(tokens=n, teacher_tokens=m, dim=dim, dtype=str(dtype).replace("torch.", ""))

    def ours(x):
        return diga_loss(x, teacher, s_grids, t_grids, backend=backend)

    def eager(x):
        return bd.plain_diga_loss(x, teacher, s_grids, t_grids)

    fns = {"ours": ours, "eager": eager}
    if not rep.smoke:
        compiled = torch.compile(bd.plain_diga_loss)
        fns["compile"] = lambda x: compiled(x, teacher, s_grids, t_grids)
    for provider, fn in fns.items():
        if not rep.can_start(f"diga/{name}/{provider}", 60 if provider == "compile" else 5):
            continue
        with guarded(rep, res["providers"], provider):
            res["providers"][provider] = r = _time_loss(fn, student, device)
            r.update(fwd_gbps=bytes_fwd / r["fwd_ms"] / 1e6, bwd_gbps=bytes_bwd / r["bwd_ms"] / 1e6)
            if copy:
                r.update(fwd_pct_of_copy=100 * r["fwd_gbps"] / copy, bwd_pct_of_copy=100 * r["bwd_gbps"] / copy)
            rep.log("diga", case=name, provider=provider, **{k: round(v, 3) for k, v in r.items()})
    provs = res["providers"]
    if "fwd_ms" in provs.get("ours", {}):
        res["ours"] = "ours"
        res["speedup_vs"] = {p: {"fwd": r["fwd_ms"] / provs["ours"]["fwd_ms"],
                                 "bwd": r["bwd_ms"] / provs["ours"]["bwd_ms"]}
                             for p, r in provs.items() if p != "ours" and "fwd_ms" in r}


def _time_loss(fn, student, device) -> dict:
    """Forward (no grad) and backward (of one retained graph) of a loss, in ms."""
    import torch

    with torch.no_grad():
        fwd = time_fn(lambda: fn(student), device)
    x = student.detach().requires_grad_()
    loss = fn(x)
    bwd = time_fn(lambda: torch.autograd.grad(loss, x, retain_graph=True), device)
    return {"fwd_ms": fwd["median_s"] * 1e3, "bwd_ms": bwd["median_s"] * 1e3}


# --------------------------------------------------------------------------------------------------
# 5. Training step and 6. projection
# --------------------------------------------------------------------------------------------------


def step_train(rep: Report, device) -> None:
    import torch

    from unigendet.models import get_config
    from unigendet.models.config import LLMConfig
    from unigendet.models.qwen2_mot import Qwen2MoTModel
    from unigendet.models.reference import reference_decoder
    from unigendet.ops import packed_attention

    ba, bt = _bench_module("bench_attention"), _bench_module("bench_train_step")
    sec = rep.section("train_step")
    if rep.smoke:
        llm = get_config("tiny").llm
        samples, total = ba.fakeclue_samples(1024, seed=0, lo=60, hi=200)
        amp = torch.bfloat16
    else:
        llm = LLMConfig(**{**get_config("bagel-7b-mot").llm.__dict__, "num_hidden_layers": 2})
        samples, total = ba.fakeclue_samples(16384, seed=0)
        amp = torch.bfloat16
    pack = bt.decoder_pack(samples, total, device)
    pairs = ba.visible_pairs(pack.layout.plan_cpu)
    sec.update(width="tiny" if rep.smoke else "bagel-7b-mot", layers=llm.num_hidden_layers, tokens=total,
               visible_pairs=pairs, compute_dtype="bf16", master_dtype="fp32", samples=len(samples))
    torch.manual_seed(0)
    model = Qwen2MoTModel(llm).to(device=device, dtype=torch.float32)  # fp32 master weights
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    h = torch.randn(total, llm.hidden_size, device=device) * 0.02
    hu0, hg0 = h[: pack.num_und], h[pack.num_und:]

    def make_step(provider):
        def attn(q, k, v):
            return packed_attention(q, k, v, pack.layout)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp):
                hu, hg = hu0.detach().requires_grad_(), hg0.detach().requires_grad_()
                if provider == "reference-code":
                    und, gen = reference_decoder(model, hu, hg, pack, final_norm=False)
                else:
                    o = model(hu, hg, pack.position_ids, attn, final_norm=False)
                    und, gen = o["und"], o["gen"]
                loss = und.float().square().mean() + gen.float().square().mean()
            loss.backward()
            opt.step()
        return step

    import projection as proj

    layer_fwd = proj.layer_fwd_flops(llm, total, pairs)
    for provider in ("unigendet", "reference-code"):
        if not rep.can_start(f"train_step/{provider}", 20):
            continue
        with guarded(rep, sec.setdefault("providers", {}), provider):
            step = make_step(provider)
            t = time_fn(step, device, warmup=1, min_reps=3, max_reps=10, target_s=1.0)
            per_layer = t["median_s"] / llm.num_hidden_layers
            r = {"step_ms": t["median_s"] * 1e3, "tokens_per_s": total / t["median_s"],
                 "achieved_tflops": 3.0 * layer_fwd / per_layer / 1e12, "seconds_per_layer_fwd_bwd": per_layer}
            mem = peak_memory(step, device)
            if mem is not None:
                r["peak_mem_gib"] = round(mem / 2**30, 2)
            sec["providers"][provider] = r
            rep.log("train_step", provider=provider, **{k: round(v, 3) for k, v in r.items()})
    provs = sec.get("providers", {})
    if "step_ms" in provs.get("unigendet", {}) and "step_ms" in provs.get("reference-code", {}):
        sec["speedup_vs_reference_code"] = provs["reference-code"]["step_ms"] / provs["unigendet"]["step_ms"]
    sec["layer_fwd_flops"] = layer_fwd


def step_projection(rep: Report, device) -> None:
    import projection as proj
    import torch

    from unigendet.ops import AttentionLayout
    from unigendet.train.flops import PaperSchedule

    ba = _bench_module("bench_attention")
    ts = rep.data.get("train_step", {})
    ours = ts.get("providers", {}).get("unigendet", {})
    sec = rep.section("projection")
    if "seconds_per_layer_fwd_bwd" not in ours:
        sec["skipped"] = "no measured training step"
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured = {"device": name, "width": ts["width"], "dtype": "bf16 compute / fp32 masters",
                "tokens": ts["tokens"], "visible_pairs": ts["visible_pairs"], "layers_timed": ts["layers"],
                "seconds_per_layer_fwd_bwd": ours["seconds_per_layer_fwd_bwd"],
                "layer_fwd_flops": ts["layer_fwd_flops"],
                "achieved_tflops": ours["achieved_tflops"]}
    sched = PaperSchedule()
    per_gpu = sched.tokens_per_step // 8
    samples, total = ba.fakeclue_samples(per_gpu, seed=0)
    pairs_per_token = ba.visible_pairs(AttentionLayout.from_splits(samples).plan_cpu) / total
    flops = proj.step_flops(per_gpu, pairs_per_token)
    sec.update(measured=measured, step_flops=flops, projection=proj.project(measured, flops, sched),
               paper_hours=sched.paper_hours_gduf + sched.paper_hours_diga)
    rep.log("projection", **{k: round(v["total_hours"], 2) for k, v in sec["projection"].items()})


# --------------------------------------------------------------------------------------------------
# Markdown and chart
# --------------------------------------------------------------------------------------------------


def _f(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def markdown(d: dict) -> str:
    env, c = d.get("environment", {}), d.get("ceilings", {})
    lines = [f"# unigendet report ({d.get('date')}, {d.get('mode')})", "",
             f"`{d.get('command')}`", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, python "
             f"{env.get('python')}; device {env.get('gpu', env.get('device'))}; autotune {env.get('autotune')}; "
             f"{d.get('elapsed_s')} s of a {d.get('budget_s')} s budget."]
    if c:
        lines.append(f"Ceilings measured: copy {c.get('copy_gbps')} GB/s, GEMM ({c.get('gemm')}) "
                     f"{c.get('gemm_tflops')} TFLOP/s.")
    peers = env.get("peers", {})
    if peers:
        lines.append("Peers: " + "; ".join(f"{k} {v}" for k, v in peers.items()) + ".")
    corr = d.get("correctness", {})
    if corr:
        lines += ["", "## Correctness", "", "| case | pass | worst err / bound | repeatable |",
                  "| --- | --- | ---: | --- |"]
        for group in ("attention", "diga"):
            for k, r in corr.get(group, {}).items():
                if not isinstance(r, dict):
                    continue
                if "error" in r:
                    lines.append(f"| {k} | ERROR | {r['error'][:80]} | |")
                    continue
                ratios = [v["err"] / v["bound"] for v in r.values() if isinstance(v, dict) and v.get("bound")]
                worst = max(ratios) if ratios else None
                if group == "diga":
                    worst = None
                lines.append(f"| {k} | {'yes' if r.get('pass') else 'NO'} | {_f(worst, 2)} | "
                             f"{_f(r.get('bitwise_repeatable', '-'))} |")
    for sec_name, unit in (("attention", "tflops"), ("diga", "gbps")):
        sec = d.get(sec_name, {})
        if not sec or not isinstance(sec, dict):
            continue
        lines += ["", f"## {sec_name.capitalize()}", ""]
        if "skipped" in sec:
            lines.append(f"skipped: {sec['skipped']}")
            continue
        pct = "gemm" if unit == "tflops" else "copy"
        lines += [f"| workload | provider | fwd ms | bwd ms | fwd {unit} | bwd {unit} | fwd % {pct} | bwd % {pct} | "
                  "ours speed-up fwd / bwd |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for wname, res in sec.items():
            if not isinstance(res, dict):
                continue
            for p, r in res.get("providers", {}).items():
                if "skipped" in r or "error" in r:
                    lines.append(f"| {wname} | {p} | {r.get('skipped') or r.get('error', '')[:70]} | | | | | | |")
                    continue
                sp = res.get("speedup_vs", {}).get(p)
                sps = f"{sp['fwd']:.2f}x / {sp['bwd']:.2f}x" if sp else ("(ours)" if p == res.get("ours") else "-")
                lines.append(f"| {wname} | {p} | {_f(r['fwd_ms'])} | {_f(r['bwd_ms'])} | {_f(r.get('fwd_' + unit))} | "
                             f"{_f(r.get('bwd_' + unit))} | {_f(r.get('fwd_pct_of_' + pct), 2)} | "
                             f"{_f(r.get('bwd_pct_of_' + pct), 2)} | {sps} |")
    ts = d.get("train_step", {})
    if ts.get("providers"):
        lines += ["", "## Training step", "",
                  f"{ts.get('layers')} MoT decoder layers of {ts.get('width')} width, {ts.get('tokens')} tokens, "
                  "bf16 compute over fp32 master weights, forward + backward + AdamW.", "",
                  "| provider | step ms | tokens/s | TFLOP/s | peak GiB |", "| --- | ---: | ---: | ---: | ---: |"]
        for p, r in ts["providers"].items():
            if "error" in r:
                lines.append(f"| {p} | {r['error'][:80]} | | | |")
                continue
            lines.append(f"| {p} | {_f(r['step_ms'])} | {_f(r['tokens_per_s'])} | {_f(r['achieved_tflops'])} | "
                         f"{_f(r.get('peak_mem_gib'))} |")
        if "speedup_vs_reference_code" in ts:
            lines.append(f"\nSpeed-up over the public code's decoder path: {ts['speedup_vs_reference_code']:.2f}x.")
    pr = d.get("projection", {})
    if pr.get("projection"):
        lines += ["", "## Projection of the paper's schedule", "", "| hardware | GDUF h | DIGA h | total h |",
                  "| --- | ---: | ---: | ---: |"]
        for label, r in pr["projection"].items():
            lines.append(f"| {label} | {r['gduf_hours']:.1f} | {r['diga_hours']:.1f} | {r['total_hours']:.1f} |")
        lines.append(f"\nPaper: {pr.get('paper_hours')} h on 8x A100.")
    if d.get("skipped"):
        lines += ["", "## Not run", ""] + [f"- {k}: {v}" for k, v in d["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_chart(path: str, d: dict) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, fwd, bwd = [], [], []
    for sec_name in ("attention", "diga"):
        for wname, res in (d.get(sec_name) or {}).items():
            if not isinstance(res, dict):
                continue
            for peer, sp in res.get("speedup_vs", {}).items():
                labels.append(f"{wname}\nvs {peer}")
                fwd.append(sp["fwd"])
                bwd.append(sp["bwd"])
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(labels)), 5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], fwd, 0.4, label="forward", color="tab:blue")
    ax.bar([i + 0.2 for i in x], bwd, 0.4, label="backward", color="tab:orange")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of unigendet (peer time / our time, log scale)")
    ax.set_title(f"unigendet against its peers ({d.get('environment', {}).get('gpu', 'CPU')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the report's files (created)")
    p.add_argument("--budget-s", type=float, default=360.0, help="start no step after this many seconds")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Triton under the interpreter")
    p.add_argument("--full-autotune", action="store_true", help="time every candidate configuration")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--warm-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warm_worker:
        sys.path.insert(0, ROOT)
        i, n = (int(x) for x in args.warm_worker.split("/"))
        return warm_worker(i, n)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown step(s) {sorted(unknown)}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.full_autotune:
        os.environ["UNIGENDET_TRITON_AUTOTUNE"] = "on"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("report.py: error: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    rep = Report(args.out, args.budget_s, args.smoke)
    device = torch.device("cpu" if args.smoke else "cuda")
    start_extension_build(rep)
    if not args.smoke and ({"correctness", "attention"} & only):
        start_warmup(rep)
    steps = [("environment", step_environment, 1), ("ceilings", step_ceilings, 5),
             ("correctness", step_correctness, 10), ("attention", step_attention, 10), ("diga", step_diga, 5),
             ("train_step", step_train, 20), ("projection", step_projection, 3)]
    for name, fn, need in steps:
        if name not in only:
            continue
        if not rep.can_start(name, need):
            continue
        if name in ("correctness", "attention") and getattr(rep, "_warm", None):
            wait_warmup(rep, 120)
            rep._warm = None
        rep.log("step", name=name)
        with guarded(rep, rep.data, f"{name}_failure"):
            fn(rep, device)
    if getattr(rep, "_ext", None) is not None:
        rep._ext.kill()
    rep.close()
    print(open(os.path.join(args.out, "report.md")).read())
    failed = [k for k, r in rep.data.get("correctness", {}).get("attention", {}).items()
              if isinstance(r, dict) and not r.get("pass")]
    failed += [k for k, r in rep.data.get("correctness", {}).get("diga", {}).items()
               if isinstance(r, dict) and not r.get("pass")]
    if failed:
        print(f"report.py: {len(failed)} correctness check(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
