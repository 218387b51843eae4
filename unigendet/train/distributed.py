"""Process groups and model wrapping for ``torchrun`` launches.

One process: nothing to do. Several processes (``torchrun --nproc-per-node N``): NCCL on GPUs, gloo on
CPUs. ``parallel=auto`` uses DDP (also on CPUs, with gloo, so the multi-process path is exercised on machines
without GPUs). ``wrap_model(..., "fsdp")`` applies FSDP2 (``fully_shard`` per decoder block, then the root, bf16
parameters with fp32 gradient reduction); the trainer refuses it until its checkpoints gather sharded weights.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "init_distributed", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "auto", blocks: list[nn.Module] | None = None,
               param_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Wrap ``model`` for data parallelism; returns the module to call (``model`` itself when single-process)."""
    if not info.distributed or parallel == "none":
        return model
    if parallel == "auto":
        # FSDP2 is wired below but the trainer cannot yet checkpoint sharded weights, so auto means DDP.
        parallel = "ddp"
    if parallel == "fsdp":
        if info.device.type != "cuda":
            raise ValueError("parallel='fsdp' needs CUDA devices; use parallel='ddp' on CPUs")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks or []:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    raise ValueError(f"parallel must be auto, fsdp, ddp or none, got {parallel!r}")
