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

from unigendet.prompts import DIGA_PROMPT_STYLES

__all__ = [
    "DataConfig",
    "OptimConfig",
    "StageConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "field_docs",
    "load_config",
    "preset",
    "PRESETS",
    "RESUME_MUTABLE",
]


# Every field carries a ``#:`` comment: it is the field's help text in ``python -m unigendet.train --help``.


@dataclass(kw_only=True)
class OptimConfig:
    #: peak learning rate (AdamW)
    lr: float = 1e-4
    #: AdamW weight decay (not applied to biases and norms)
    weight_decay: float = 1e-2
    #: AdamW betas
    betas: tuple[float, float] = (0.9, 0.95)
    #: AdamW epsilon
    eps: float = 1e-8
    #: linear warm-up steps at the start of each stage
    warmup_steps: int = 0
    #: after the warm-up: "constant", or "cosine" decay to min_lr_ratio x lr at the end of each stage
    schedule: str = "constant"
    #: final learning rate of the cosine schedule, as a fraction of lr
    min_lr_ratio: float = 0.1
    #: learning rate of the generation side (generation expert, timestep embedder, latent connectors, DIGA MLP) as a
    #: multiple of lr
    gen_lr_scale: float = 1.0
    #: learning rate of the stages of co-evolution rounds 2 and later as a multiple of lr (those rounds continue from
    #: the previous round's weights: a fine-tuning pass)
    round_lr_scale: float = 1.0
    #: gradient-norm clipping (0: off)
    clip_grad_norm: float = 1.0
    #: "auto": NVIDIA apex FusedAdam when installed, else torch's fused AdamW on CUDA, else foreach AdamW; "apex"
    impl: str = "auto"


@dataclass(kw_only=True)
class StageConfig:
    #: optimizer steps of the stage
    steps: int = 100
    #: optimizer steps of the stage in co-evolution rounds 2 and later (none: steps); those rounds fine-tune the
    #: previous round's weights
    round_steps: int | None = None
    #: GDUF weight of the detection-head loss (paper 1; the public code used 0.2)
    w_det: float = 1.0
    #: GDUF weight of the explanation (text) loss
    w_text: float = 1.0
    #: weight of the flow-matching loss
    w_flow: float = 1.0
    #: DIGA weight of the alignment term
    w_diga: float = 0.5
    #: DIGA: the layer whose states are aligned (none: the model configuration's)
    diga_layer: int | None = None

    def steps_in_round(self, rnd: int) -> int:
        """Optimizer steps of the stage in round ``rnd`` (1-based)."""
        return self.steps if rnd == 1 or self.round_steps is None else self.round_steps


@dataclass(kw_only=True)
class DataConfig:
    #: "embedded" builds the default data set on first use; "files" reads fakeclue_root and laion_manifest
    source: str = "embedded"
    #: FakeClue root (holding data_json/ and the images)
    fakeclue_root: str | None = None
    #: LAION manifest (final_metadata.json) of the generation samples
    laion_manifest: str | None = None
    #: image decoding: "torch" (PIL in a DataLoader) or "dali" (NVIDIA DALI)
    backend: str = "torch"
    #: loader worker processes (DALI: decoding threads)
    num_workers: int = 0
    #: tokens at which a pack is emitted (none: the model preset's packing default)
    expected_tokens: int | None = None
    #: most tokens in a pack (none: the packing default)
    max_tokens: int | None = None
    #: longer samples are skipped (none: the packing default)
    max_tokens_per_sample: int | None = None
    #: generation samples per gen_ratio + det_ratio (paper 1:1, public code 1:5)
    gen_ratio: int = 1
    #: detection samples per gen_ratio + det_ratio
    det_ratio: int = 1
    #: probability of dropping a caption (classifier-free guidance)
    cfg_text_dropout: float = 0.1
    #: keep min(#fake, #real) detection records of each class
    balance_classes: bool = True


@dataclass(kw_only=True)
class TrainConfig:
    #: run name (logged)
    name: str = "tiny"
    #: a model preset ("tiny", "bagel-7b-mot") or a checkpoint folder
    model: str = "tiny"
    #: base checkpoint folder (BAGEL-7B-MoT layout) to start from; none builds the preset from scratch
    model_path: str | None = None
    #: SMSA rule: "paper", "reference" or "off" (see unigendet.models)
    smsa: str = "paper"
    #: "gduf", "diga" or "all" (GDUF then DIGA)
    stage: str = "all"
    #: co-evolution rounds of the stages
    rounds: int = 1
    #: seeds initialisation, data order and noise
    seed: int = 0
    #: "auto" (the GPU when there is one), "cpu", "cuda"
    device: str = "auto"
    #: "auto" (several processes: FSDP2 on GPUs, DDP on CPUs), "fsdp" (also on CPUs, gloo), "ddp" or "none"
    parallel: str = "auto"
    #: "auto" (bf16 autocast on GPUs, fp32 on CPUs), "bf16", "fp16" or "fp32"
    dtype: str = "auto"
    #: recompute decoder activations in the backward pass
    grad_checkpointing: bool = False
    #: EMA decay of the exported weights (0: no EMA)
    ema: float = 0.0
    #: packs per optimizer step and process (the global batch is grad_accum x world size packs)
    grad_accum: int = 1
    #: flow-matching timestep shift in training
    timestep_shift: float = 1.0
    #: run folder: train.jsonl, checkpoints/, final/, plots, summary.json
    out_dir: str = "runs/tiny"
    #: continue from the newest checkpoint in out_dir
    resume: bool = False
    #: resume even when the configuration differs from the checkpoint's (the differences are logged)
    allow_config_change: bool = False
    #: start afresh in a non-empty out_dir, deleting the previous run's outputs there
    overwrite: bool = False
    #: checkpoint every this many steps (and at the end of each stage)
    save_every: int = 50
    #: checkpoints kept
    keep_last: int = 2
    #: train.jsonl step record every this many steps
    log_every: int = 1
    #: abort after more non-finite losses than this
    max_nonfinite: int = 10
    #: held-out detection samples evaluated at the end (0: none)
    eval_samples: int = 200
    #: answer length limit of that evaluation (decoding stops earlier at the end of every answer)
    eval_max_new_tokens: int = 48
    #: images in the final sample grid (0: none)
    sample_images: int = 8
    #: held-out scene prompts generated and scored at the end: prompt score and FID (embedded data; 0: none)
    gen_eval_samples: int = 64
    #: flow steps for the samples and the co-evolution fakes
    sample_steps: int = 20
    #: self-generated fakes added to the detector's data in each co-evolution round after the first
    coevolution_fakes: int = 64
    #: held-out scene prompts each co-evolution round also draws (not trained on), to compare the detectors on
    coevolution_heldout: int = 32
    #: the DIGA teacher's forensic prompt: "short" or "official" (the official implementation's; unigendet.prompts)
    diga_prompt: str = "short"
    gduf: StageConfig = field(default_factory=lambda: StageConfig(steps=300))
    diga: StageConfig = field(default_factory=lambda: StageConfig(steps=100))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _tiny() -> TrainConfig:
    # Sized for two CPU cores: 1000 GDUF steps of 1536-token packs, DIGA and the end-of-run evaluation take about
    # four minutes there. A model trained from scratch needs a higher learning rate than the paper's fine-tuning
    # value (with a cosine decay to the end of each stage), its generation side (trained from nothing on a task
    # with little signal per sample) four times higher again. Packs hold about three generation samples (a caption and
    # 16 latent tokens) per detection sample, so both halves see enough samples per step; the detection head learns
    # from the detection samples only, so its loss is weighted 5. The flow trains with timestep shift 3 (as it
    # samples): at shift 1 too few training steps fall at the high noise levels where the caption decides what is
    # drawn, and the generator learns backgrounds long before it learns shapes, colours and positions. Co-evolution
    # rounds after the first continue from the previous round's weights at a fifth of the learning rate: at the full
    # rate the second GDUF pass over the same photographs overfits them (real-photo accuracy 0.95 -> 0.91, seed 0).
    # Each later round adds 192 of the generator's own images as fakes, in the places of as many of the data set's
    # fakes (the classes stay balanced): with 64 the round-2 detector missed a fifth of them at seed 1.
    return TrainConfig(
        timestep_shift=3.0,
        coevolution_fakes=192,
        gduf=StageConfig(steps=1000, w_det=5.0),
        diga=StageConfig(steps=60),
        optim=OptimConfig(lr=5e-4, gen_lr_scale=4.0, round_lr_scale=0.2, warmup_steps=50, schedule="cosine",
                          min_lr_ratio=0.1),
        data=DataConfig(expected_tokens=1536, max_tokens=1792, max_tokens_per_sample=512, det_ratio=1, gen_ratio=3),
    )


def _bagel_7b() -> TrainConfig:
    # The paper's schedule: GDUF 1000 steps and DIGA 500 steps of 16384 x 8 tokens on 8 GPUs, AdamW lr 1e-4,
    # weight decay 1e-2; DIGA aligns layer 8 with weight 0.5 and its teacher reads the official forensic prompt.
    return TrainConfig(
        name="bagel-7b-mot",
        model="bagel-7b-mot",
        out_dir="runs/bagel-7b-mot",
        diga_prompt="official",
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
    "resume", "allow_config_change", "overwrite", "out_dir", "save_every", "keep_last", "log_every", "max_nonfinite",
    "eval_samples", "eval_max_new_tokens", "sample_images", "gen_eval_samples", "coevolution_heldout",
    "data.num_workers",
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


def _comments(cls) -> dict[str, str]:
    """The ``#:`` comment above each field of a dataclass, from its source."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier():
            docs[name] = " ".join(pending)
        pending = []
    return docs


def _type_label(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return "|".join(_type_label(a) if a is not type(None) else "none" for a in args)
    if origin is tuple:
        return ",".join(_type_label(a) for a in args)
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(typ, getattr(typ, "__name__", str(typ)))


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted: "lr" is "optim.lr"
    type: str  # "FLOAT", "INT|none", "FLOAT,FLOAT", ...
    help: str
    is_bool: bool


def field_docs(cfg: TrainConfig | None = None) -> list[FieldDoc]:
    """Every leaf field of :class:`TrainConfig` (sections flattened with dots), with its type and ``#:`` help."""
    cfg = cfg if cfg is not None else TrainConfig()
    out: list[FieldDoc] = []

    def walk(obj, prefix: str) -> None:
        docs = _comments(type(obj))
        for name, f in _fields(obj).items():
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{name}.")
            else:
                out.append(FieldDoc(f"{prefix}{name}", _type_label(f.type), docs.get(name, ""), f.type is bool))

    walk(cfg, "")
    return out


def get_value(cfg: TrainConfig, key: str):
    """The value of a dotted field."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


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
    import difflib

    names = [d.key for d in field_docs(cfg)]
    names += [k.rpartition(".")[2] for k in names if "." in k]
    close = difflib.get_close_matches(key, names, n=1)
    raise ValueError(f"config: unknown option --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))


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
    if cfg.diga_prompt not in DIGA_PROMPT_STYLES:
        raise ValueError(f"config: diga_prompt must be one of {', '.join(DIGA_PROMPT_STYLES)}, got {cfg.diga_prompt!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("config: resume and overwrite exclude each other (continue the run, or start it afresh)")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"config: optim.schedule must be constant or cosine, got {cfg.optim.schedule!r}")
    if not cfg.optim.gen_lr_scale > 0.0:
        raise ValueError("config: optim.gen_lr_scale must be > 0")
    for stage in ("gduf", "diga"):
        rs = getattr(cfg, stage).round_steps
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, int) or rs < 0):
            raise ValueError(f"config: {stage}.round_steps must be none or an int >= 0, got {rs!r}")
    if not cfg.optim.round_lr_scale > 0.0:
        raise ValueError("config: optim.round_lr_scale must be > 0")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ValueError("config: optim.min_lr_ratio must be in [0, 1]")
