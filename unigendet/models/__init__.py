"""The UniGenDet model (BAGEL-7B-MoT backbone, SigLIP NaViT, FLUX VAE, detection and DIGA heads)."""

from .checkpoint import LoadReport, build_model, checkpoint_state_dict, load_pretrained, save_checkpoint
from .config import PRESETS, LLMConfig, UniGenDetConfig, VAEConfig, ViTConfig, get_config, load_config, save_config
from .smsa import SMSA_MODES, smsa_layout
from .unigendet import UniGenDet, diga_losses, flow_mse, gduf_losses

__all__ = [
    "PRESETS",
    "SMSA_MODES",
    "LLMConfig",
    "LoadReport",
    "UniGenDet",
    "UniGenDetConfig",
    "VAEConfig",
    "ViTConfig",
    "build_model",
    "checkpoint_state_dict",
    "diga_losses",
    "flow_mse",
    "gduf_losses",
    "get_config",
    "load_config",
    "load_pretrained",
    "save_checkpoint",
    "save_config",
    "smsa_layout",
]
