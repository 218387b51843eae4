"""Benchmarks of the fused DIGA loss, forward + backward (student gradient).

Providers: ``ours`` (the compiled kernels: ``cpp`` on CPU, ``cuda`` on GPU), ``eager`` (what a training script
writes: per image ``F.interpolate`` + ``F.cosine_similarity``, REPA-style) and ``compile`` (``torch.compile`` of
that).

``extra_info["gbps"]`` counts the minimum traffic of one forward + backward: read the student and the teacher
once and write the student gradient, ``(2 N + M) * D * itemsize`` bytes; ``peak_mem_bytes`` is the peak
device memory of one step above what was allocated before it (CUDA only).

    python -m pytest benchmarks/bench_diga_loss.py --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, mean_seconds, peak_memory_bytes, run_pedantic

from unigendet._backend import extension_unavailable_reason
from unigendet.ops import diga_loss


def plain_diga_loss(student, teacher, s_grids, t_grids):
    """The loss as a training script writes it (no fused kernel): interpolate each teacher grid, then cosine."""
    dim, losses, s_off, t_off = student.shape[1], [], 0, 0
    for (hs, ws), (ht, wt) in zip(s_grids, t_grids):
        t = teacher[t_off:t_off + ht * wt].reshape(1, ht, wt, dim).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(hs, ws), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, dim)
        losses.append(1 - F.cosine_similarity(student[s_off:s_off + hs * ws], t, dim=-1, eps=1e-8))
        s_off += hs * ws
        t_off += ht * wt
    return torch.cat(losses).mean()

PROVIDERS = ["ours", "eager", "compile"]

# name: (device, dtype, images, student grid, teacher grid, dim)
CASES = {
    # Two cores are enough for this one: 2 x 32x32 student tokens against 37x37 teacher grids.
    "cpu-2x32x32-t37-d3584-fp32": ("cpu", torch.float32, 2, (32, 32), (37, 37), 3584),
    "cuda-8x32x32-t37-d3584-bf16": ("cuda", torch.bfloat16, 8, (32, 32), (37, 37), 3584),
    "cuda-8x64x64-t70-d3584-bf16": ("cuda", torch.bfloat16, 8, (64, 64), (70, 70), 3584),
}


def _make_step(provider: str, device: str, student: torch.Tensor, teacher: torch.Tensor, s_grids, t_grids):
    if provider == "ours":
        backend = "cuda" if device == "cuda" else "cpp"
        why = extension_unavailable_reason("unigendet::diga_loss_fwd", "CUDA" if device == "cuda" else "CPU")
        if why:
            pytest.skip(why)

        def fn(x):
            return diga_loss(x, teacher, s_grids, t_grids, backend=backend)
    elif provider == "eager":
        def fn(x):
            return plain_diga_loss(x, teacher, s_grids, t_grids)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(plain_diga_loss)

        def fn(x):
            return compiled(x, teacher, s_grids, t_grids)

    x = student.detach().clone().requires_grad_(True)

    def step():
        x.grad = None
        loss = fn(x)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_diga_loss_fwd_bwd(benchmark, case, provider):
    device, dtype, n_images, s_grid, t_grid, dim = CASES[case]
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    s_grids, t_grids = [s_grid] * n_images, [t_grid] * n_images
    n = n_images * s_grid[0] * s_grid[1]
    m = n_images * t_grid[0] * t_grid[1]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, dim, generator=g).to(device=device, dtype=dtype)
    teacher = torch.randn(m, dim, generator=g).to(device=device, dtype=dtype)

    step = _make_step(provider, device, student, teacher, s_grids, t_grids)
    rounds = 20 if device == "cuda" else 5
    run_pedantic(benchmark, step, device, rounds=rounds, warmup_rounds=2)

    seconds = mean_seconds(benchmark)
    nbytes = (2 * n + m) * dim * student.element_size()
    benchmark.group = f"diga_loss fwd+bwd {case}"
    benchmark.extra_info.update(provider=provider, case=case, tokens=n, teacher_tokens=m, dim=dim,
                                dtype=str(dtype).replace("torch.", ""), gbps=nbytes / seconds / 1e9)
    peak = peak_memory_bytes(step, device)
    if peak is not None:
        benchmark.extra_info["peak_mem_bytes"] = peak
