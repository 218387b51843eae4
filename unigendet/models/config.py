"""Typed model configuration with named presets and checkpoint JSON IO.

A checkpoint folder describes the model with three JSON files:

``llm_config.json``        the language model in Hugging Face ``Qwen2Config`` format
``vit_config.json``        the vision tower in Hugging Face ``SiglipVisionConfig`` format
``unigendet_config.json``  everything else (VAE, connectors, DIGA layer, SMSA mode); optional, a BAGEL folder
                           has no such file and gets the BAGEL-7B-MoT defaults.

Every field is checked when a configuration is built, from a file or in code: its type, and for sizes a range
(:data:`LIMITS`) wide enough for any real model and narrow enough that a typo (``vocab_size`` 1e12, 100000
layers) fails at once instead of in the allocator. Errors are :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .._integrity import read_json

__all__ = [
    "ConfigError",
    "LIMITS",
    "LLMConfig",
    "ViTConfig",
    "VAEConfig",
    "UniGenDetConfig",
    "PRESETS",
    "get_config",
    "load_config",
    "save_config",
]

SMSA_MODES = ("paper", "reference", "off")


class ConfigError(ValueError):
    """A model configuration field is missing, of the wrong type or out of range (the message names the file, or
    the configuration class, and the field)."""


#: Inclusive bounds of the numeric fields, by class and field name.
LIMITS: dict[str, dict[str, tuple[float, float]]] = {
    "LLMConfig": {
        "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
        "num_key_value_heads": (1, 1024), "intermediate_size": (1, 1 << 20), "vocab_size": (1, 1 << 22),
        "head_dim": (2, 1024), "rope_theta": (1e-6, 1e12), "rms_norm_eps": (1e-12, 0.1),
        "max_position_embeddings": (1, 1 << 24),
    },
    "ViTConfig": {
        "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20), "num_hidden_layers": (1, 1024),
        "num_attention_heads": (1, 1024), "image_size": (1, 1 << 14), "patch_size": (1, 1 << 10),
        "num_channels": (1, 64), "layer_norm_eps": (1e-12, 0.1), "drop_last_layers": (0, 1023),
    },
    "VAEConfig": {
        "z_channels": (1, 1 << 12), "downsample": (1, 1 << 8), "layers_per_block": (1, 64),
        "norm_num_groups": (1, 1 << 12), "scale_factor": (-1e6, 1e6), "shift_factor": (-1e6, 1e6),
    },
    "UniGenDetConfig": {
        "latent_patch_size": (1, 64), "max_latent_size": (1, 1 << 12), "vit_max_num_patch_per_side": (1, 1 << 12),
        "timestep_shift": (1e-6, 1e6), "timestep_embed_scale": (1e-6, 1e6), "diga_layer": (1, 1024),
        "diga_mlp_ratio": (1, 64),
    },
}


def _type_ok(value, typ) -> bool:
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typ is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(typ)
        return isinstance(value, tuple) and all(_type_ok(v, args[0]) for v in value)
    return True  # nested configurations check themselves


def _type_name(typ) -> str:
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
        typ, str(typ).replace("typing.", ""))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _check_fields(obj) -> None:
    """Type and range of every field of a configuration dataclass (see :data:`LIMITS`)."""
    cls = type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    limits = LIMITS.get(cls, {})
    for f in fields(obj):
        v, typ = getattr(obj, f.name), hints[f.name]
        if not _type_ok(v, typ):
            raise ConfigError(f"{cls}: field {f.name!r} must be {_type_name(typ)}, got {v!r}")
        if typ is float and isinstance(v, int):
            v = float(v)
            setattr(obj, f.name, v)
        if f.name in limits and v is not None:
            lo, hi = limits[f.name]
            if not lo <= v <= hi:
                kind = "an integer" if typ is int or isinstance(v, int) else "a number"
                raise ConfigError(f"{cls}: field {f.name!r} must be {kind} in [{_num(lo)}, {_num(hi)}], got {v!r}")


def _from_dict(cls, d: dict, source: str, keys: dict[str, str], **extra):
    """Build ``cls`` from a JSON object: ``keys`` maps field -> JSON key; fields without a default are required."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: must hold a JSON object, got {type(d).__name__}")
    kw = dict(extra)
    for f in fields(cls):
        key = keys.get(f.name)
        if key is None or f.name in kw:
            continue
        if key in d:
            kw[f.name] = d[key]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{source}: missing required field {key!r}")
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).split(': ', 1)[-1]}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass(kw_only=True)
class LLMConfig:
    """Qwen2 decoder with two MoT experts (understanding and generation)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (Qwen2 has no head_dim field)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        _check_fields(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            _check_fields(self)
        if self.num_key_value_heads > self.num_attention_heads:
            raise ConfigError(f"LLMConfig: field 'num_key_value_heads' ({self.num_key_value_heads}) must be at most "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported (BAGEL unties lm_head)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``llm_config.json`` form (Hugging Face Qwen2 keys)."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "qk_norm": self.qk_norm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "llm_config.json") -> LLMConfig:
        """Read ``llm_config.json``. BAGEL forces ``qk_norm=True`` and untied embeddings when it loads this file.

        Raises :class:`ConfigError` naming ``source`` and the field for a missing, mistyped or out-of-range value.
        """
        keys = {f.name: f.name for f in fields(cls) if f.name not in ("qk_norm", "tie_word_embeddings")}
        extra = {"qk_norm": True, "tie_word_embeddings": False}
        if isinstance(d, dict):
            if d.get("head_dim") is None:  # Qwen2 has no head_dim: hidden_size // num_attention_heads
                extra["head_dim"] = None
            if "num_key_value_heads" not in d and "num_attention_heads" in d:
                extra["num_key_value_heads"] = d["num_attention_heads"]
        return _from_dict(cls, d, source, keys, **extra)


@dataclass(kw_only=True)
class ViTConfig:
    """SigLIP NaViT vision tower. ``num_hidden_layers`` is the count in ``vit_config.json``; ``num_layers`` used."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # BAGEL selects the penultimate layer (vit_select_layer=-2): the last `drop_last_layers` layers are not built.
    drop_last_layers: int = 1

    def __post_init__(self):
        _check_fields(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("ViT hidden_size must be a multiple of num_attention_heads")
        if self.patch_size > self.image_size:
            raise ConfigError(f"ViTConfig: field 'patch_size' ({self.patch_size}) must be at most image_size "
                              f"({self.image_size})")
        if not 0 <= self.drop_last_layers < self.num_hidden_layers:
            raise ValueError(f"drop_last_layers must be in [0, {self.num_hidden_layers}), got {self.drop_last_layers}")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"hidden_act must be gelu_pytorch_tanh or gelu, got {self.hidden_act!r}")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers - self.drop_last_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``vit_config.json`` form (Hugging Face SigLIP vision keys; the layer count as in the file)."""
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], drop_last_layers: int = 1, source: str = "vit_config.json") -> ViTConfig:
        """Read ``vit_config.json``; raises :class:`ConfigError` naming ``source`` and the field."""
        keys = {f.name: f.name for f in fields(cls) if f.name != "drop_last_layers"}
        return _from_dict(cls, d, source, keys, drop_last_layers=drop_last_layers)


@dataclass(kw_only=True)
class VAEConfig:
    """Image autoencoder.

    ``kind="flux"``: the FLUX AE through diffusers ``AutoencoderKL`` (the remaining fields are its architecture).
    ``kind="space_to_depth"``: an exactly invertible, parameter-free pixel-space stand-in for small tests: the
    latent of an image (3, H, W) is its space-to-depth rearrangement (3*d*d, H/d, W/d), d = ``downsample``.
    ``kind="dct"``: a parameter-free low-pass autoencoder (the ``tiny`` preset's): each d x d block of each channel
    keeps its k x k lowest-frequency DCT coefficients, ``z_channels = 3*k*k`` (:class:`unigendet.models.vae.DCTVAE`).
    """

    kind: str = "flux"
    z_channels: int = 16
    downsample: int = 8
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_posterior: bool = True  # BAGEL samples the diagonal Gaussian when encoding for training

    def __post_init__(self):
        if isinstance(self.block_out_channels, list):
            self.block_out_channels = tuple(self.block_out_channels)
        _check_fields(self)
        if not self.block_out_channels or not all(1 <= c <= 1 << 14 for c in self.block_out_channels):
            raise ConfigError(f"VAEConfig: field 'block_out_channels' must be 1 to 16384 channels per block, got "
                              f"{self.block_out_channels!r}")
        if self.kind not in ("flux", "dct", "space_to_depth"):
            raise ValueError(f"VAE kind must be 'flux', 'dct' or 'space_to_depth', got {self.kind!r}")
        keep = int(round((self.z_channels // 3) ** 0.5))
        if self.kind == "dct" and not (self.z_channels == 3 * keep * keep and 1 <= keep <= self.downsample):
            raise ValueError(f"dct VAE: z_channels must be 3*k*k with 1 <= k <= downsample ({self.downsample}), "
                             f"got {self.z_channels}")
        if self.kind == "space_to_depth" and self.z_channels != 3 * self.downsample**2:
            raise ValueError(f"space_to_depth needs z_channels == 3*downsample**2 = {3 * self.downsample**2}")
        if self.kind == "flux" and 2 ** (len(self.block_out_channels) - 1) != self.downsample:
            raise ValueError("flux VAE: downsample must be 2**(len(block_out_channels)-1)")


@dataclass(kw_only=True)
class UniGenDetConfig:
    """The whole model: backbone, vision tower, VAE and the BAGEL/UniGenDet heads."""

    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    #: t is multiplied by this before the sinusoidal timestep embedding. BAGEL feeds t in [0, 1] unscaled (1.0) to
    #: DiT's embedder, built for t in [0, 1000]: only its few fastest frequencies change over the whole range, a
    #: weak time signal that a pretrained model has adapted to. A model trained from scratch (the tiny preset,
    #: 1000 as DiT) learns the time dependence of the velocity far sooner with the full range.
    timestep_embed_scale: float = 1.0
    #: fresh-model init of ``vae2llm`` / ``llm2vae``: "zero" (BAGEL: ``llm2vae`` starts at zero) or "tied" (a random
    #: orthogonal ``vae2llm`` and its transpose as ``llm2vae``, so a model trained from scratch starts out passing the
    #: noisy latent through, the bulk of the velocity it must learn; the tiny preset's). Loaded weights override it.
    latent_connector_init: str = "zero"
    diga_layer: int = 8
    diga_mlp_ratio: int = 4
    smsa_mode: str = "reference"
    #: activation of ``fake_cls_head`` ("relu" as UniGenDet; the tiny preset uses "gelu", see connectors.py)
    cls_head_act: str = "relu"
    visual_gen: bool = True
    visual_und: bool = True

    def __post_init__(self):
        _check_fields(self)
        if self.latent_connector_init not in ("zero", "tied"):
            raise ValueError(f"latent_connector_init must be 'zero' or 'tied', got {self.latent_connector_init!r}")
        if self.smsa_mode not in SMSA_MODES:
            raise ValueError(f"smsa_mode must be one of {SMSA_MODES}, got {self.smsa_mode!r}")
        if not 1 <= self.diga_layer <= self.llm.num_hidden_layers:
            raise ValueError(f"diga_layer must be in [1, {self.llm.num_hidden_layers}], got {self.diga_layer}")
        if self.connector_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"connector_act must be gelu_pytorch_tanh or gelu, got {self.connector_act!r}")
        if self.vit_max_num_patch_per_side != self.vit.max_patches_per_side:
            raise ValueError(
                "vit_max_num_patch_per_side must equal vit.image_size // vit.patch_size "
                f"({self.vit.max_patches_per_side}), got {self.vit_max_num_patch_per_side}"
            )

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (VAE stride times latent patch size)."""
        return self.vae.downsample * self.latent_patch_size

    def extra_dict(self) -> dict[str, Any]:
        """The ``unigendet_config.json`` form: everything not in the two Hugging Face files."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("llm", "vit", "vae")}
        d["vae"] = asdict(self.vae)
        d["vae"]["block_out_channels"] = list(self.vae.block_out_channels)
        d["vit_drop_last_layers"] = self.vit.drop_last_layers
        return d

    def replace(self, **changes) -> UniGenDetConfig:
        return replace(self, **changes)


def _bagel_7b_mot() -> UniGenDetConfig:
    return UniGenDetConfig(
        llm=LLMConfig(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=18944,
            vocab_size=152064,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
        ),
        vit=ViTConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=980,
            patch_size=14,
            layer_norm_eps=1e-6,
            drop_last_layers=1,
        ),
        vae=VAEConfig(),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        diga_layer=8,
    )


def _tiny() -> UniGenDetConfig:
    # Same structure as BAGEL (GQA 4/2, QK-norm, two experts, SigLIP NaViT, patch-2 latents) at a few million
    # parameters.
    return UniGenDetConfig(
        llm=LLMConfig(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
            vocab_size=2048,  # the "tiny" tokenizer's table size
            rope_theta=10_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
        ),
        vit=ViTConfig(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            drop_last_layers=1,
        ),
        # 2 x 2 DCT frequencies per 8 x 8 block: 48 numbers per latent token, below the hidden size (see DCTVAE)
        vae=VAEConfig(kind="dct", z_channels=12, downsample=8, scale_factor=3.0, shift_factor=0.0),
        latent_patch_size=2,
        max_latent_size=4,
        vit_max_num_patch_per_side=4,
        diga_layer=2,
        cls_head_act="gelu",
        timestep_embed_scale=1000.0,
        latent_connector_init="tied",
    )


PRESETS = {"bagel-7b-mot": _bagel_7b_mot, "tiny": _tiny}


def get_config(name: str, **overrides) -> UniGenDetConfig:
    """A fresh copy of a named preset (``bagel-7b-mot`` or ``tiny``), with top-level fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return replace(cfg, **overrides) if overrides else cfg


def save_config(config: UniGenDetConfig, folder: str) -> None:
    """Write ``llm_config.json``, ``vit_config.json`` and ``unigendet_config.json`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, payload in (
        ("llm_config.json", config.llm.to_hf_dict()),
        ("vit_config.json", config.vit.to_hf_dict()),
        ("unigendet_config.json", config.extra_dict()),
    ):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")


def load_config(folder: str) -> UniGenDetConfig:
    """Read a checkpoint folder's JSON files. Without ``unigendet_config.json`` the BAGEL-7B-MoT extras apply.

    Raises :class:`ConfigError` naming the file and the field for truncated or invalid JSON, a missing key, a
    value of the wrong type or out of range (:data:`LIMITS`), or an unknown key in ``unigendet_config.json``.
    """
    paths = {n: os.path.join(folder, n) for n in ("llm_config.json", "vit_config.json", "unigendet_config.json")}
    for n in ("llm_config.json", "vit_config.json"):
        if not os.path.isfile(paths[n]):
            raise FileNotFoundError(f"{n} not found in {folder!r}")
    llm = LLMConfig.from_hf_dict(read_json(paths["llm_config.json"], ConfigError, mapping=False),
                                 source=paths["llm_config.json"])
    vit_raw = read_json(paths["vit_config.json"], ConfigError, mapping=False)
    src = paths["unigendet_config.json"]
    extra: dict[str, Any] = {}
    if os.path.isfile(src):
        extra = read_json(src, ConfigError)
    known = {f.name for f in fields(UniGenDetConfig)} - {"llm", "vit", "vae"}
    unknown = set(extra) - known - {"vae", "vit_drop_last_layers"}
    if unknown:
        raise ConfigError(f"{src}: unknown keys {sorted(unknown)}")
    drop = extra.pop("vit_drop_last_layers", 1)
    if not isinstance(drop, int) or isinstance(drop, bool):
        raise ConfigError(f"{src}: field 'vit_drop_last_layers' must be an integer, got {drop!r}")
    vit = ViTConfig.from_hf_dict(vit_raw, drop_last_layers=drop, source=paths["vit_config.json"])
    vae = VAEConfig()
    if "vae" in extra:
        raw = extra.pop("vae")
        if not isinstance(raw, dict):
            raise ConfigError(f"{src}: field 'vae' must be an object, got {type(raw).__name__}")
        bad = set(raw) - {f.name for f in fields(VAEConfig)}
        if bad:
            raise ConfigError(f"{src}: unknown keys in 'vae': {sorted(bad)}")
        vae = _from_dict(VAEConfig, raw, f"{src} (vae)", {f.name: f.name for f in fields(VAEConfig)})
    if "vit_max_num_patch_per_side" not in extra:
        extra["vit_max_num_patch_per_side"] = vit.max_patches_per_side
    return _from_dict(UniGenDetConfig, extra, src, {k: k for k in known}, llm=llm, vit=vit, vae=vae)
