"""Model-independent sampling: text-decoding logits processors and the flow-matching Euler sampler.

Text decoding
-------------
The processors follow the Hugging Face ``transformers`` semantics so that settings carry over unchanged:

* :func:`apply_repetition_penalty` (CTRL rule): for every token already present in the sequence, a positive
  logit is divided by the penalty and a negative logit multiplied by it.
* :func:`apply_temperature`: ``logits / T``.
* :func:`apply_top_k`: keep the ``k`` largest logits (ties with the k-th value are kept).
* :func:`apply_top_p`: nucleus filtering; keep the smallest set of tokens whose cumulative probability reaches
  ``p``, and always at least one token.

:func:`process_logits` chains them in the order ``transformers`` uses (repetition penalty, temperature, top-k,
top-p) and :func:`sample_next_token` draws the next token, greedily or from the processed distribution with an
optional ``torch.Generator`` for reproducibility; :func:`decode_tokens` runs the loop around a model step.
:class:`SamplingConfig` carries the settings and has presets:
``SamplingConfig.greedy()`` (the reference detector's default), ``SamplingConfig.reference_sampling()``
(plain temperature 0.3 over the full vocabulary) and ``SamplingConfig.paper()`` (T=0.7, top-p 0.8, top-k 20,
repetition penalty 1.05).

Flow-matching sampler
---------------------
:func:`flow_euler_sample` integrates a rectified-flow ODE from noise (``t = 1``) to data (``t = 0``) with BAGEL's
shifted schedule, text/image classifier-free guidance, a CFG interval and velocity renormalisation. The model is
reached through one callable that evaluates every requested guidance branch at once (see
:data:`VelocityFn`), so an implementation can run the branches as segments of a single packed forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "BRANCH_COND",
    "BRANCH_IMG",
    "BRANCH_UNCOND",
    "SamplingConfig",
    "VelocityFn",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "combine_guidance",
    "decode_tokens",
    "flow_euler_sample",
    "flow_timesteps",
    "greedy_token",
    "process_logits",
    "sample_next_token",
]


# --------------------------------------------------------------------------------------------------------------
# Text decoding
# --------------------------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by a temperature.

    Args:
        logits: ``(B, V)`` float scores.
        temperature: strictly positive; ``1.0`` returns the input unchanged.

    Returns:
        ``(B, V)`` tensor ``logits / temperature``.
    """
    _check_logits(logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row and set the rest to ``-inf``.

    As in ``transformers``' ``TopKLogitsWarper``, a token is removed when its logit is strictly below the k-th
    largest value, so ties with the k-th value survive. ``top_k == 0`` disables the filter.

    Args:
        logits: ``(B, V)`` float scores.
        top_k: number of tokens to keep; ``0`` keeps all.
        min_tokens_to_keep: lower bound on ``top_k``.

    Returns:
        ``(B, V)`` filtered logits (a new tensor).
    """
    _check_logits(logits)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k == 0:
        return logits
    k = min(max(int(top_k), min_tokens_to_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose cumulative probability is at least ``top_p``.

    Implements ``transformers``' ``TopPLogitsWarper``: tokens are sorted by ascending logit, and every token
    whose ascending cumulative probability is ``<= 1 - top_p`` is removed; the ``min_tokens_to_keep`` most
    likely tokens are always kept. ``top_p == 1`` disables the filter.

    Args:
        logits: ``(B, V)`` float scores.
        top_p: in ``(0, 1]``.
        min_tokens_to_keep: at least this many tokens survive.

    Returns:
        ``(B, V)`` filtered logits (a new tensor).
    """
    _check_logits(logits)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, generated_ids: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Penalise tokens that already occur in each sequence (CTRL / ``transformers`` rule).

    For every token id present in row ``b`` of ``generated_ids``, a positive logit is divided by ``penalty`` and
    a negative one multiplied by it (each token once, however often it occurs). ``penalty > 1`` discourages
    repetition; ``1.0`` is a no-op.

    Args:
        logits: ``(B, V)`` float scores.
        generated_ids: ``(B, L)`` integer token ids of the sequence so far (prompt included if it should count),
            or ``None``. Negative ids are treated as padding and ignored.
        penalty: strictly positive.

    Returns:
        ``(B, V)`` penalised logits (a new tensor).
    """
    _check_logits(logits)
    if not penalty > 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if penalty == 1.0 or generated_ids is None or generated_ids.numel() == 0:
        return logits
    if generated_ids.dim() != 2 or generated_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"generated_ids must have shape (batch={logits.shape[0]}, length), got {tuple(generated_ids.shape)}"
        )
    if generated_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"generated_ids must be an integer tensor, got dtype {generated_ids.dtype}")
    ids = generated_ids.to(device=logits.device, dtype=torch.int64)
    if (ids >= logits.shape[-1]).any():
        raise ValueError(f"generated_ids contains ids >= vocab size {logits.shape[-1]}")
    valid = ids >= 0
    # Count occurrences with scatter_add so duplicates and padding cannot race each other.
    seen = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    seen.scatter_add_(-1, ids.clamp(min=0), valid.to(torch.int32))
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen > 0, penalised, logits)


@dataclass(frozen=True)
class SamplingConfig:
    """Text-decoding settings.

    Attributes:
        do_sample: sample from the processed distribution; ``False`` takes the arg-max (greedy).
        temperature: softmax temperature (sampling only).
        top_k: keep the ``top_k`` most likely tokens; ``0`` disables (sampling only).
        top_p: nucleus mass in ``(0, 1]``; ``1.0`` disables (sampling only).
        repetition_penalty: CTRL penalty; ``1.0`` disables. Applies to greedy decoding too, as in
            ``transformers``.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def greedy(cls) -> SamplingConfig:
        """Arg-max decoding (the reference detector's default)."""
        return cls(do_sample=False)

    @classmethod
    def reference_sampling(cls, temperature: float = 0.3) -> SamplingConfig:
        """Plain temperature sampling over the full vocabulary, as the reference ``--do_sample`` path does."""
        return cls(do_sample=True, temperature=temperature)

    @classmethod
    def paper(cls) -> SamplingConfig:
        """Qwen-style settings quoted for the paper: T=0.7, top-p 0.8, top-k 20, repetition penalty 1.05."""
        return cls(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def process_logits(logits: torch.Tensor, generated_ids: torch.Tensor | None, config: SamplingConfig) -> torch.Tensor:
    """Apply the configured processors in ``transformers`` order: repetition penalty, temperature, top-k, top-p.

    Args:
        logits: ``(B, V)`` next-token scores (any float dtype; computed in float32 or wider).
        generated_ids: ``(B, L)`` ids seen so far for the repetition penalty, or ``None``.
        config: the settings; when ``config.do_sample`` is false only the repetition penalty is applied.

    Returns:
        ``(B, V)`` processed scores in float32 (or the input dtype if wider); filtered tokens are ``-inf``.
    """
    _check_logits(logits)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    out = apply_repetition_penalty(logits, generated_ids, config.repetition_penalty)
    if not config.do_sample:
        return out
    out = apply_temperature(out, config.temperature)
    out = apply_top_k(out, config.top_k)
    out = apply_top_p(out, config.top_p)
    return out


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """Arg-max token of each row: ``(B, V)`` -> ``(B,)`` int64."""
    _check_logits(logits)
    return torch.argmax(logits, dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    config: SamplingConfig,
    generated_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token of each row.

    Args:
        logits: ``(B, V)`` next-token scores.
        config: decoding settings.
        generated_ids: ``(B, L)`` ids so far (only used by the repetition penalty).
        generator: optional ``torch.Generator`` on ``logits.device`` for reproducible sampling.

    Returns:
        ``(B,)`` int64 token ids.
    """
    scores = process_logits(logits, generated_ids, config)
    if not config.do_sample:
        return greedy_token(scores)
    if generator is not None and generator.device != scores.device:
        raise ValueError(f"generator is on {generator.device} but logits are on {scores.device}")
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_tokens(
    step: Callable[[torch.Tensor], torch.Tensor],
    start_tokens: torch.Tensor,
    config: SamplingConfig,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    history: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 1,
) -> torch.Tensor:
    """Autoregressive decoding loop around a model step: the one loop every text decoder of the package runs.

    ``step(tokens)`` feeds one token per sequence, ``(B,)`` int64, to the model (which keeps its own KV cache) and
    returns the next-token logits ``(B, V)``. Starting from ``start_tokens``, each iteration feeds the current
    tokens and picks the next with :func:`sample_next_token`. A sequence that emits ``eos_token_id`` is finished:
    its later positions hold ``pad_token_id`` (default: ``eos_token_id``), and the loop stops when every sequence
    has finished (tested every ``check_every`` steps, one host sync each time) or after ``max_new_tokens`` new
    tokens. The repetition-penalty history lives in one preallocated buffer, and only when the penalty is active.

    Args:
        step: the model step.
        start_tokens: ``(B,)`` first tokens fed to the model (e.g. ``<|im_start|>``).
        config: decoding settings.
        max_new_tokens: upper bound on generated tokens.
        eos_token_id: end-of-answer token (e.g. ``<|im_end|>``), or ``None`` to always run to the limit.
        pad_token_id: filler after EOS.
        history: ``(B, L)`` ids (e.g. the prompt) that count for the repetition penalty; negative ids are ignored.
        generator: optional ``torch.Generator`` for reproducible sampling.
        check_every: steps between "has every sequence finished?" tests.

    Returns:
        ``(B, T)`` int64 generated tokens (``T <= max_new_tokens``), the start tokens excluded; EOS is included.
    """
    if start_tokens.dim() != 1:
        raise ValueError(f"start_tokens must have shape (batch,), got {tuple(start_tokens.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    tokens = start_tokens.to(torch.int64)
    n = tokens.shape[0]
    # Repetition-penalty history: [history, start token, decoded tokens...]; -1 marks unused slots (ignored).
    hist, width = None, 0
    if config.repetition_penalty != 1.0:
        width = (0 if history is None else history.shape[1]) + 1
        hist = torch.full((n, width + max_new_tokens), -1, dtype=torch.int64, device=tokens.device)
        if history is not None:
            hist[:, : width - 1] = history.to(tokens.device, torch.int64)
        hist[:, width - 1] = tokens
    finished = torch.zeros_like(tokens, dtype=torch.bool)
    out = []
    for s in range(max_new_tokens):
        logits = step(tokens)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"step must return (batch={n}, vocab) logits, got {tuple(logits.shape)}")
        nxt = sample_next_token(logits, config, None if hist is None else hist[:, : width + s], generator)
        if pad is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        if hist is not None:
            hist[:, width + s] = nxt
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if (s + 1) % check_every == 0 and bool(finished.all()):
                break
        tokens = nxt
    return torch.stack(out, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Flow-matching Euler sampler
# --------------------------------------------------------------------------------------------------------------

BRANCH_COND = "cond"
"""Fully conditioned velocity (text prompt and any context images)."""
BRANCH_UNCOND = "uncond"
"""Text-unconditional velocity for text CFG (BAGEL's ``cfg_text`` context: the prompt text dropped)."""
BRANCH_IMG = "img"
"""Image-CFG velocity (BAGEL's ``cfg_img`` context: context images dropped, text kept)."""

VelocityFn = Callable[[torch.Tensor, torch.Tensor, tuple[str, ...]], Mapping[str, torch.Tensor]]
"""``velocity(x, t, branches) -> {branch: v}``.

* ``x``: the current latent, any shape (e.g. ``(N_tokens, C)`` packed latent tokens).
* ``t``: 0-d float tensor on ``x.device``, the (shifted) time in ``(0, 1]``; ``t = 1`` is pure noise.
* ``branches``: the branch names needed at this step, always starting with :data:`BRANCH_COND`, then
  :data:`BRANCH_UNCOND` when text CFG is active and :data:`BRANCH_IMG` when image CFG is active. Outside the
  CFG interval only ``("cond",)`` is requested, so a model can skip the extra passes there.
* returns a mapping holding at least the requested branches, each a tensor shaped like ``x``. The velocity
  points from data to noise (``v = eps - x0`` for ``x_t = (1 - t) x0 + t eps``).

A model implementation typically packs the requested branches as segments of one forward pass.
"""

RenormType = Literal["global", "channel", "text_channel", "none"]


def flow_timesteps(
    num_steps: int, shift: float = 3.0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """BAGEL's shifted time grid: ``t = linspace(1, 0, num_steps)``, then ``t' = s t / (1 + (s - 1) t)``.

    Args:
        num_steps: number of grid points (``>= 2``); the sampler takes ``num_steps - 1`` Euler steps.
        shift: the shift ``s > 0``; ``s > 1`` spends more steps near the noise end.

    Returns:
        ``(num_steps,)`` decreasing tensor from 1 to 0.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps, device=device, dtype=dtype)
    return shift * t / (1.0 + (shift - 1.0) * t)


def _norm(v: torch.Tensor, channel: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True) if channel else torch.linalg.vector_norm(v)


def combine_guidance(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    v_img: torch.Tensor | None = None,
    *,
    text_scale: float = 1.0,
    img_scale: float = 1.0,
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Combine guidance branches into one velocity, exactly as BAGEL's ``_forward_flow``.

    With ``text_scale <= 1`` no guidance is applied and ``v_cond`` is returned. Otherwise
    ``v_txt = v_uncond + text_scale (v_cond - v_uncond)``; if ``img_scale > 1``,
    ``v = v_img + img_scale (v_txt - v_img)``, else ``v = v_txt``. The result is then rescaled by
    ``clamp(||v_cond|| / ||v||, renorm_min, 1)``:

    * ``"global"``: norms over the whole tensor (so the batch of packed tokens shares one scale);
    * ``"channel"``: norms over the last dimension, one scale per token;
    * ``"text_channel"``: the per-token rescale is applied to ``v_txt`` before image guidance;
    * ``"none"``: no rescale.

    Args:
        v_cond, v_uncond, v_img: velocities of equal shape ``(..., C)``.

    Returns:
        The guided velocity, shaped like ``v_cond``.
    """
    if text_scale <= 1.0:
        return v_cond
    if v_uncond is None:
        raise ValueError("v_uncond is required when text_scale > 1")
    if v_uncond.shape != v_cond.shape:
        raise ValueError(f"v_uncond shape {tuple(v_uncond.shape)} != v_cond shape {tuple(v_cond.shape)}")
    use_img = img_scale > 1.0
    if use_img:
        if v_img is None:
            raise ValueError("v_img is required when img_scale > 1")
        if v_img.shape != v_cond.shape:
            raise ValueError(f"v_img shape {tuple(v_img.shape)} != v_cond shape {tuple(v_cond.shape)}")
    v_txt = v_uncond + text_scale * (v_cond - v_uncond)
    if renorm_type == "text_channel":
        scale = (_norm(v_cond, True) / (_norm(v_txt, True) + 1e-8)).clamp(min=renorm_min, max=1.0)
        v_txt = v_txt * scale
        return v_img + img_scale * (v_txt - v_img) if use_img else v_txt
    v = v_img + img_scale * (v_txt - v_img) if use_img else v_txt
    if renorm_type == "none":
        return v
    if renorm_type not in ("global", "channel"):
        raise ValueError(f"renorm_type must be 'global', 'channel', 'text_channel' or 'none', got {renorm_type!r}")
    channel = renorm_type == "channel"
    # The 1e-8 guard matches the reference; the ratio is clamped to at most 1 so guidance never grows the norm.
    scale = (_norm(v_cond, channel) / (_norm(v, channel) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return v * scale


@torch.no_grad()
def flow_euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    *,
    num_steps: int = 50,
    shift: float = 3.0,
    text_scale: float = 1.0,
    img_scale: float = 1.0,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
    segments: int = 1,
    progress: bool = False,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate the flow ODE from ``noise`` at ``t = 1`` to a sample at ``t = 0`` with Euler steps.

    The grid is :func:`flow_timesteps` ``(num_steps, shift)``; for each ``t_i`` except the last,
    ``x <- x - v(x, t_i) (t_i - t_{i+1})``. Guidance (see :func:`combine_guidance`) is active only when
    ``cfg_interval[0] < t_i <= cfg_interval[1]`` and ``text_scale > 1``; image guidance additionally needs
    ``img_scale > 1``. These are BAGEL's rules (``text_scale=4, cfg_interval=(0, 1), renorm_min=0`` for the
    LAION/GenEval scripts; ``text_scale=4, img_scale=1.5, cfg_interval=(0.4, 1)`` in its demo). The window is
    tested on a host copy of the grid (no device sync per step). With ``segments > 1``, ``x`` holds that many
    equal parts along its first dimension (e.g. the latent tokens of several images, image-major) and guidance is
    combined per part, so the ``"global"`` renormalisation is per image, as when the reference samples one image
    per call.

    Args:
        velocity: see :data:`VelocityFn`.
        noise: initial latent ``x_1``, any shape ``(..., C)``; the update keeps its dtype.
        num_steps: grid points (``num_steps - 1`` model evaluations).
        shift: schedule shift ``s``.
        text_scale, img_scale: guidance scales (``<= 1`` disables).
        cfg_interval: ``(lo, hi)`` time window where guidance is applied.
        renorm_type, renorm_min: velocity renormalisation after guidance.
        segments: equal parts of ``x`` along dim 0 that are guided and renormalised separately.
        progress: show a progress bar.
        return_trajectory: also return the list of states ``[x_1, ..., x_0]``.

    Returns:
        The final latent ``x_0`` (shaped like ``noise``), and the trajectory if requested.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError("noise must be a floating-point torch.Tensor")
    if len(cfg_interval) != 2 or not cfg_interval[0] <= cfg_interval[1]:
        raise ValueError(f"cfg_interval must be (lo, hi) with lo <= hi, got {tuple(cfg_interval)}")
    if renorm_type not in ("global", "channel", "text_channel", "none"):
        raise ValueError(f"renorm_type must be 'global', 'channel', 'text_channel' or 'none', got {renorm_type!r}")
    if segments < 1 or noise.dim() < 1 or noise.shape[0] % segments:
        raise ValueError(f"segments must be >= 1 and divide noise.shape[0] = "
                         f"{noise.shape[0] if noise.dim() else None}, got {segments}")
    t_host = flow_timesteps(num_steps, shift)
    lo, hi = float(cfg_interval[0]), float(cfg_interval[1])
    # Window flags from the host grid, compared in its dtype (the bounds rounded as the reference rounds them).
    windows = [bool((t > lo) & (t <= hi)) for t in t_host[:-1]]
    timesteps = t_host.to(noise.device)
    dts = timesteps[:-1] - timesteps[1:]
    x = noise
    trajectory = [x] if return_trajectory else None
    steps = range(num_steps - 1)
    if progress:
        from unigendet._progress import progress_iter

        steps = progress_iter(steps, desc="flow sampling", total=num_steps - 1, leave=False)
    per = x.shape[0] // segments
    for i in steps:
        t = timesteps[i]
        use_text = windows[i] and text_scale > 1.0
        use_img = use_text and img_scale > 1.0
        branches: tuple[str, ...] = (BRANCH_COND,)
        if use_text:
            branches += (BRANCH_UNCOND,)
        if use_img:
            branches += (BRANCH_IMG,)
        out = velocity(x, t, branches)
        missing = [b for b in branches if b not in out]
        if missing:
            raise ValueError(f"velocity callable did not return branches {missing} (requested {branches})")
        for name in branches:
            if out[name].shape != x.shape:
                raise ValueError(f"velocity for branch {name!r} has shape {tuple(out[name].shape)}, "
                                 f"expected {tuple(x.shape)}")
        v_cond = out[BRANCH_COND]
        if use_text:
            v_unc, v_img = out[BRANCH_UNCOND], out.get(BRANCH_IMG) if use_img else None
            parts = [
                combine_guidance(
                    v_cond[j * per : (j + 1) * per],
                    v_unc[j * per : (j + 1) * per],
                    None if v_img is None else v_img[j * per : (j + 1) * per],
                    text_scale=text_scale,
                    img_scale=img_scale if use_img else 1.0,
                    renorm_type=renorm_type,
                    renorm_min=renorm_min,
                )
                for j in range(segments)
            ]
            v = parts[0] if segments == 1 else torch.cat(parts)
        else:
            v = v_cond
        # dts[i] is a 0-d float32 tensor, so type promotion keeps x's dtype (as the reference update does).
        x = x - v.to(x.dtype) * dts[i]
        if trajectory is not None:
            trajectory.append(x)
    if trajectory is not None:
        return x, trajectory
    return x
