"""Training configuration: a typed dataclass, named presets, JSON/YAML files and ``--key=value`` overrides.

    cfg = load_config("tiny", ["--lr=3e-4", "--gduf.steps=200"])

Nested sections are addressed with dots (``--optim.lr``); top-level fields of a section may also be given
without the section when the name is unique (``--lr`` means ``--optim.lr``). Values are parsed as the
field's type (``true``/``false`` for booleans, comma-separated lists for tuples).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

__all__ = [
    "DataConfig",
    "OptimConfig",
    "StageConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "preset",
    "PRESETS",
    "RESUME_MUTABLE",
]


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    #: after the warm-up: "constant", or "cosine" decay to ``min_lr_ratio`` x lr at the end of each stage
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    clip_grad_norm: float = 1.0
    #: "auto": NVIDIA apex FusedAdam when installed, else torch's fused AdamW on CUDA, else foreach AdamW.
    impl: str = "auto"


@dataclass(kw_only=True)
class StageConfig:
    steps: int = 100
    #: weights of the GDUF losses (paper: all 1; the public code used 0.2 on the detection label)
    w_det: float = 1.0
    w_text: float = 1.0
    w_flow: float = 1.0
    #: DIGA: weight of the alignment term and the layer whose states are aligned
    w_diga: float = 0.5
    diga_layer: int | None = None


@dataclass(kw_only=True)
class DataConfig:
    #: "embedded" builds the default data set on first use; otherwise a FakeClue root and a LAION manifest
    source: str = "embedded"
    fakeclue_root: str | None = None
    laion_manifest: str | None = None
    backend: str = "torch"  # "torch" (PIL DataLoader) or "dali"
    num_workers: int = 0
    #: token budgets per pack; None keeps the model preset's packing defaults
    expected_tokens: int | None = None
    max_tokens: int | None = None
    max_tokens_per_sample: int | None = None
    #: generation : detection samples per pack (paper 1:1, public code 1:5)
    gen_ratio: int = 1
    det_ratio: int = 1
    cfg_text_dropout: float = 0.1
    balance_classes: bool = True


@dataclass(kw_only=True)
class TrainConfig:
    name: str = "tiny"
    #: a model preset ("tiny", "bagel-7b-mot") or a checkpoint folder
    model: str = "tiny"
    #: base checkpoint folder (BAGEL-7B-MoT layout) to start from; None builds the preset from scratch
    model_path: str | None = None
    #: "paper", "reference" or "off" (see unigendet.models)
    smsa: str = "paper"
    stage: str = "all"  # gduf | diga | all
    rounds: int = 1
    seed: int = 0
    device: str = "auto"
    #: "auto" (with several processes: FSDP2 on GPUs, DDP on CPUs; nothing with one), "fsdp" (FSDP2, also on CPUs
    #: with gloo), "ddp" or "none"
    parallel: str = "auto"
    dtype: str = "auto"  # bf16 autocast on GPUs, fp32 on CPUs
    grad_checkpointing: bool = False
    ema: float = 0.0  # 0 disables the EMA copy
    #: packs per optimizer step and process (the global batch is grad_accum x world size packs)
    grad_accum: int = 1
    timestep_shift: float = 1.0
    out_dir: str = "runs/tiny"
    resume: bool = False
    #: resume even when the configuration differs from the checkpoint's (the differences are logged)
    allow_config_change: bool = False
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    max_nonfinite: int = 10
    #: held-out detection samples evaluated at the end (0: none) and their explanation length limit
    eval_samples: int = 200
    eval_max_new_tokens: int = 48
    #: images in the final sample grid, and flow steps for samples and co-evolution fakes
    sample_images: int = 8
    sample_steps: int = 20
    #: self-generated fakes added to the detector's data in each co-evolution round after the first
    coevolution_fakes: int = 64
    gduf: StageConfig = field(default_factory=lambda: StageConfig(steps=300))
    diga: StageConfig = field(default_factory=lambda: StageConfig(steps=100))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _tiny() -> TrainConfig:
    # Sized for two CPU cores: a 1024-token GDUF step takes about 0.15 s there, so 1000 GDUF steps, DIGA and the
    # final evaluation take three to four minutes. A model trained from scratch needs a higher learning rate than
    # the paper's fine-tuning value (with a cosine decay to the end of each stage), and the detection head learns
    # from the detection samples only, so packs are twice the tiny packing default, hold three detection samples
    # per generation sample, and the head's loss is weighted 5.
    return TrainConfig(
        gduf=StageConfig(steps=1000, w_det=5.0),
        diga=StageConfig(steps=60),
        optim=OptimConfig(lr=5e-4, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1),
        data=DataConfig(expected_tokens=1024, max_tokens=1280, max_tokens_per_sample=512, det_ratio=3, gen_ratio=1),
    )


def _bagel_7b() -> TrainConfig:
    # The paper's schedule: GDUF 1000 steps and DIGA 500 steps of 16384 x 8 tokens on 8 GPUs, AdamW lr 1e-4,
    # weight decay 1e-2; DIGA aligns layer 8 with weight 0.5.
    return TrainConfig(
        name="bagel-7b-mot",
        model="bagel-7b-mot",
        out_dir="runs/bagel-7b-mot",
        ema=0.99,
        grad_checkpointing=True,
        save_every=200,
        gduf=StageConfig(steps=1000),
        diga=StageConfig(steps=500, diga_layer=8),
        data=DataConfig(source="files", expected_tokens=16384, max_tokens=17000, max_tokens_per_sample=16384,
                        num_workers=4, det_ratio=1, gen_ratio=1),
    )


PRESETS = {"tiny": _tiny, "bagel-7b-mot": _bagel_7b}

#: Fields that may differ between a run and the checkpoint it resumes without counting as a configuration change:
#: they steer where and how often the run reports and saves, and the end-of-run outputs, never the training itself.
RESUME_MUTABLE = frozenset({
    "resume", "allow_config_change", "out_dir", "save_every", "keep_last", "log_every", "max_nonfinite",
    "eval_samples", "eval_max_new_tokens", "sample_images", "data.num_workers",
})


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"config: unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_value(raw: str, typ, key: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _parse_value(raw, non_none[0], key)
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config: --{key} expects a boolean, got {raw!r}")
    if origin is tuple:
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        if len(parts) != len(args):
            raise ValueError(f"config: --{key} expects {len(args)} comma-separated values, got {raw!r}")
        return tuple(_parse_value(p.strip(), a, key) for a, p in zip(args, parts))
    try:
        return typ(raw)
    except (TypeError, ValueError):
        raise ValueError(f"config: --{key} expects {getattr(typ, '__name__', typ)}, got {raw!r}") from None


def _fields(obj) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _resolve(cfg, key: str):
    """(owner dataclass, field) for a dotted or unique short key."""
    parts = key.split(".")
    obj = cfg
    for p in parts[:-1]:
        fs = _fields(obj)
        if p not in fs or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ValueError(f"config: unknown section {p!r} in --{key}")
        obj = getattr(obj, p)
    name = parts[-1]
    fs = _fields(obj)
    if name in fs and not dataclasses.is_dataclass(getattr(obj, name)):
        return obj, fs[name]
    if len(parts) == 1:
        hits = [(getattr(cfg, s), _fields(getattr(cfg, s))[name]) for s, f in _fields(cfg).items()
                if dataclasses.is_dataclass(getattr(cfg, s)) and name in _fields(getattr(cfg, s))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"config: --{key} is ambiguous; say which section, e.g. --gduf.{key}")
    raise ValueError(f"config: unknown option --{key}")


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict) -> TrainConfig:
    """Apply ``--key=value`` strings (or a {key: value} dict of strings/values) in place; returns ``cfg``."""
    items = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for o in overrides:
            if not o.startswith("--") or "=" not in o:
                raise ValueError(f"config: overrides look like --key=value, got {o!r}")
            k, v = o[2:].split("=", 1)
            items.append((k.replace("-", "_"), v))
    for key, value in items:
        owner, f = _resolve(cfg, key)
        if isinstance(value, str):
            value = _parse_value(value, f.type, key)
        elif dataclasses.is_dataclass(getattr(owner, f.name)) and isinstance(value, dict):
            apply_overrides(getattr(owner, f.name), value)
            continue
        elif typing.get_origin(f.type) is tuple and isinstance(value, list):
            value = tuple(value)
        setattr(owner, f.name, value)
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(source: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name or a JSON/YAML file (a preset named by its ``preset`` key, then its values), then overrides."""
    source = source or "tiny"
    if source in PRESETS:
        cfg = preset(source)
    elif os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            if source.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f) or {}
            else:
                data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"config: {source} must hold a mapping")
        cfg = preset(data.pop("preset", "tiny"))
        flat = _flatten(data)
        apply_overrides(cfg, {k: v for k, v in flat.items()})
    else:
        raise ValueError(f"config: {source!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.stage not in ("gduf", "diga", "all"):
        raise ValueError(f"config: stage must be gduf, diga or all, got {cfg.stage!r}")
    if cfg.smsa not in ("paper", "reference", "off"):
        raise ValueError(f"config: smsa must be paper, reference or off, got {cfg.smsa!r}")
    if cfg.rounds < 1:
        raise ValueError("config: rounds must be >= 1")
    if cfg.parallel not in ("auto", "fsdp", "ddp", "none"):
        raise ValueError(f"config: parallel must be auto, fsdp, ddp or none, got {cfg.parallel!r}")
    if cfg.data.backend not in ("torch", "dali"):
        raise ValueError(f"config: data.backend must be torch or dali, got {cfg.data.backend!r}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError("config: ema must be in [0, 1)")
    if cfg.keep_last < 1:
        raise ValueError("config: keep_last must be >= 1")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"config: optim.schedule must be constant or cosine, got {cfg.optim.schedule!r}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ValueError("config: optim.min_lr_ratio must be in [0, 1]")
