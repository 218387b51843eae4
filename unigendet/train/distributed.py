"""Process groups and model wrapping for ``torchrun`` launches.

One process: nothing to do. Several processes (``torchrun --nproc-per-node N``): NCCL on GPUs, gloo on
CPUs. ``parallel=auto`` shards with FSDP2 on GPUs and uses DDP on CPUs; both run on CPUs with gloo, so the
multi-process paths are exercised on machines without GPUs. ``wrap_model(..., "fsdp")`` applies FSDP2 in place
(``fully_shard`` per decoder block, then the root; bf16 parameters with fp32 gradient reduction on GPUs, fp32 on
CPUs; the frozen VAE stays replicated).

Checkpoints of a sharded model are gathered into the same full-tensor files a single process writes
(:func:`full_model_state`, :func:`full_optimizer_state`, :func:`full_tensors`) and scattered back on resume (the
weights load into the model before it is sharded; :func:`load_full_optimizer_state`, :func:`shard_like`), so a
checkpoint does not depend on how the run was parallelised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "full_model_state",
    "full_optimizer_state",
    "full_tensors",
    "init_distributed",
    "is_sharded",
    "load_full_optimizer_state",
    "shard_like",
    "shutdown_distributed",
    "wrap_model",
]


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


def shutdown_distributed(info: DistInfo, *, wait: bool = True) -> None:
    """End the process group: wait for every rank (``wait``), then destroy it.

    Without this, a rank that finishes first (the others are still exporting or evaluating on rank 0) exits with
    live communicator threads, which can abort the process and make the launcher kill the others.
    """
    if info.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded in place by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "auto", blocks: list[nn.Module] | None = None,
               param_dtype: torch.dtype | None = None, ignored: list[nn.Module] | None = None) -> nn.Module:
    """Wrap ``model`` for data parallelism; returns the module to call (``model`` itself when single-process).

    ``fsdp`` shards ``model`` in place (each of ``blocks``, then the root; the parameters of ``ignored`` modules
    stay whole on every rank) and is idempotent: a model that is already sharded is returned as is, so stages can
    change which parameters train (``requires_grad``) without re-sharding. ``param_dtype`` defaults to bf16 on
    GPUs and fp32 on CPUs; gradients are reduced in fp32.
    """
    if not info.distributed or parallel == "none":
        return model
    if parallel == "auto":
        parallel = "fsdp" if info.device.type == "cuda" else "ddp"
    if parallel == "fsdp":
        if is_sharded(model):
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if param_dtype is None:
            param_dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks or []:
            fully_shard(block, mp_policy=mp)
        skip = {p for m in (ignored or []) if m is not None for p in m.parameters()}
        fully_shard(model, mp_policy=mp, ignored_params=skip or None)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    raise ValueError(f"parallel must be auto, fsdp, ddp or none, got {parallel!r}")


# ------------------------------------------------------------------ full-tensor views of a sharded model


def _options(all_ranks: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers to rank 0 only (the others get an empty dict); without it every rank gets full tensors.
    return StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks, **kw)


def full_model_state(model: nn.Module, *, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict. Collective for a sharded model: every rank must call it.

    Returns full tensors on rank 0 (on the CPU) and an empty dict on the others, or, with ``all_ranks``, full
    tensors on every rank (on the model's device). Unsharded models return their own ``state_dict()``.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(all_ranks))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in ``opt.state_dict()`` numbering (group order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state with full tensors, in ``opt.state_dict()``'s format (integer parameter ids).

    Collective for a sharded model; rank 0 gets the state, the other ranks ``None``.
    """
    if not is_sharded(model):
        return opt.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_options(False))
    if dist.get_rank() != 0:
        return None
    ids = {n: i for i, n in enumerate(_param_names(model, opt))}
    groups = []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [ids[n] for n in g["params"]]})
    return {"state": {ids[n]: v for n, v in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from :func:`full_optimizer_state` (or a plain ``opt.state_dict()``), present on every rank."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, opt)
    osd = {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    # strict=False: parameters that never received a gradient (e.g. diga_mlp during GDUF) have no state yet.
    set_optimizer_state_dict(model, opt, osd, options=_options(True, strict=False))


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather every DTensor shard of ``tensors`` into a full CPU tensor (collective when any is a DTensor)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (present on every rank) laid out like ``like``: sharded the same way when ``like`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full
