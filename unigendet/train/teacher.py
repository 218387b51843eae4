"""The frozen models a run builds beside the one it trains: the DIGA authenticity teacher and whole copies.

* the end-of-GDUF snapshot of each round (``round<r>/gduf_model``), from which a resumed DIGA stage rebuilds its
  teacher and the end of a co-evolution run rebuilds round 1's detector;
* :func:`build_teacher`: the frozen teacher of a DIGA stage (a copy, so it cannot drift while the generator trains),
  stored in the compute dtype (it only runs forward);
* :func:`plain_copy`: an unsharded copy holding a given state (a sharded model's sampling, teacher and detector
  comparisons need whole weights), built on the meta device so only the copy's own weights are allocated.
"""

from __future__ import annotations

import os

import torch

from .distributed import full_model_state, is_sharded
from .state import load_sharded

__all__ = ["build_teacher", "compute_dtype", "plain_copy", "snapshot_dir", "weights_state"]


def snapshot_dir(out_dir: str, rnd: int) -> str:
    """Where round ``rnd``'s end-of-GDUF weights are kept."""
    return os.path.join(out_dir, f"round{rnd}", "gduf_model")


def weights_state(model) -> dict[str, torch.Tensor]:
    """The weights to save, without the frozen VAE (collective when sharded; full tensors on rank 0)."""
    return {k: v for k, v in full_model_state(model).items() if not k.startswith("vae.")}


def compute_dtype(frozen, amp_dtype: torch.dtype | None):
    """A frozen, forward-only copy (the DIGA teacher) needs no fp32 masters: store it in the compute dtype."""
    if amp_dtype is None:
        return frozen
    vae = getattr(frozen, "vae", None)
    frozen.vae = None  # shared with the trained model: never cast it here
    frozen = frozen.to(dtype=amp_dtype)
    frozen.vae = vae
    return frozen


def plain_copy(model, state: dict[str, torch.Tensor], *, device: torch.device, amp_dtype: torch.dtype | None,
               teacher: bool = False):
    """An unsharded copy of ``model`` (or of its DIGA teacher part) holding ``state``, sharing the VAE."""
    from unigendet.models import UniGenDet

    with torch.device("meta"):
        copy = UniGenDet(model.config, build_vae_module=False)
    if teacher:
        copy = copy.make_diga_teacher()
    copy = copy.to_empty(device=device).to(dtype=(amp_dtype or model.dtype) if teacher else model.dtype)
    copy.reset_fixed_buffers()
    missing, unexpected = copy.load_state_dict({k: v for k, v in state.items() if not k.startswith("vae.")},
                                               strict=False)
    missing = [k for k in missing if "pos_embed" not in k]
    if missing:
        raise RuntimeError(f"gathered state lacks {missing[:5]} (of {len(missing)})")
    copy.requires_grad_(False)
    copy.vae = model.vae  # frozen by the trainer
    return copy.eval()


def build_teacher(model, folder: str | None, *, device: torch.device, amp_dtype: torch.dtype | None):
    """The frozen DIGA teacher: the weights in snapshot ``folder``, or ``model``'s current ones when ``None``."""
    if is_sharded(model):
        # Every rank holds a whole teacher (it only runs forward), built from the snapshot or, without one, from the
        # gathered current weights (collective: every rank takes the same branch).
        state = load_sharded(folder) if folder is not None else full_model_state(model, all_ranks=True)
        return plain_copy(model, state, device=device, amp_dtype=amp_dtype, teacher=True)
    if folder is None:
        return compute_dtype(model.make_diga_teacher(), amp_dtype)
    # state_dict() tensors share storage with the parameters: copy them before loading over them.
    current = {k: v.clone() for k, v in weights_state(model).items()}
    model.load_state_dict(load_sharded(folder), strict=False)
    teacher = model.make_diga_teacher()
    model.load_state_dict(current, strict=False)
    return compute_dtype(teacher, amp_dtype)
