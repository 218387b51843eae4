"""Fused ops. Each op lives in its own module with its pure-PyTorch reference beside it."""
from .attention import (  # noqa: F401
    PackedAttention,
    SMSAAttention,
    VarlenAttention,
    packed_attention,
    smsa_attention,
    varlen_attention,
)
from .diga_loss import DIGALoss, diga_loss  # noqa: F401
from .layout import AttentionLayout, KernelPlan  # noqa: F401
