"""FLOP counts of the MoT backbone, used to turn measured throughput into utilisation and projected wall time."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperSchedule", "active_params_per_token", "project_schedule", "train_flops_per_token"]


def active_params_per_token(llm) -> int:
    """Weights one token multiplies in one expert pass of the decoder (projections + MLP + LM head share).

    ``llm`` is a :class:`unigendet.models.LLMConfig`. Each token goes through one expert per layer, so the
    active count is one expert's layer stack (the MoT model holds twice as many parameters).
    """
    h, d = llm.hidden_size, llm.head_dim
    q = h * llm.num_attention_heads * d
    kv = 2 * h * llm.num_key_value_heads * d
    o = llm.num_attention_heads * d * h
    mlp = 3 * h * llm.intermediate_size
    return llm.num_hidden_layers * (q + kv + o + mlp)


def train_flops_per_token(llm, mean_context: float, recompute: bool = False) -> float:
    """Training FLOPs per token: 6 x active weights (forward 2, backward 4), plus attention.

    Attention adds ``4 * context * heads * head_dim`` FLOPs per token per layer forward (QK^T and PV over the
    ``mean_context`` keys a token sees), times 3.5 with backward (flash-attention's convention: backward = 2.5x
    forward). With activation recomputation the forward is paid twice (8x weights instead of 6x).
    """
    weights = active_params_per_token(llm)
    attn_fwd = 4.0 * mean_context * llm.num_attention_heads * llm.head_dim * llm.num_hidden_layers
    return (8.0 if recompute else 6.0) * weights + 3.5 * attn_fwd


@dataclass(frozen=True)
class PaperSchedule:
    """The paper's training budget: GDUF 1000 steps and DIGA 500 steps of 16384 x 8 tokens (8 A100, 12 h + 6 h)."""

    gduf_steps: int = 1000
    diga_steps: int = 500
    tokens_per_step: int = 16384 * 8
    paper_hours_gduf: float = 12.0
    paper_hours_diga: float = 6.0


def project_schedule(tokens_per_second: float, schedule: PaperSchedule = PaperSchedule(), *,
                     diga_cost_factor: float = 1.3) -> dict:
    """Hours the paper's schedule would take at ``tokens_per_second`` of the *same* model on the same hardware.

    ``diga_cost_factor`` accounts for the DIGA teacher's extra no-grad pass over the first layers and the ViT
    (about 0.3 of a training step at BAGEL's shapes: 8 of 28 layers forward only plus SigLIP).
    """
    gduf_tokens = schedule.gduf_steps * schedule.tokens_per_step
    diga_tokens = schedule.diga_steps * schedule.tokens_per_step
    if tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    gduf_h = gduf_tokens / tokens_per_second / 3600
    diga_h = diga_tokens * diga_cost_factor / tokens_per_second / 3600
    return {
        "gduf_hours": gduf_h,
        "diga_hours": diga_h,
        "total_hours": gduf_h + diga_h,
        "paper_hours": schedule.paper_hours_gduf + schedule.paper_hours_diga,
        "assumptions": (
            f"{schedule.gduf_steps} GDUF + {schedule.diga_steps} DIGA steps of {schedule.tokens_per_step} tokens; "
            f"DIGA steps cost {diga_cost_factor}x a GDUF step (teacher pass)."
        ),
    }
