"""``attn_implementation="unigendet"`` in Hugging Face decoders, against ``"sdpa"`` with explicit masks.

Tiny randomly initialised Qwen2 and Llama models (2 layers, hidden 64, 4 heads, 2 KV heads, head dim 32,
vocab 100). Each case runs the same weights three times: ours at the test precision, ``sdpa`` at the
test precision with the equivalent dense mask (block-diagonal causal, padding, sliding window) built
here from the rules, and ``sdpa`` in fp64 as the reference. Pass rule (flash-attention's):
``max|ours - ref64| <= 2x (logits) / 3x (parameter gradients) max|sdpa - ref64|`` plus a small floor.

The torch backend runs everywhere; ``interpret`` cases run the Triton kernels under the interpreter
(fp32/fp16 only); ``gpu`` cases add bf16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from attention_helpers import assert_within
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unigendet import _backend
from unigendet.integrations import transformers as ut

interpret = pytest.mark.interpret
gpu = pytest.mark.gpu
VOCAB = 100


def _config(kind: str, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, use_cache=False)
    common.update(over)
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**common)


def _models(kind: str, dtype, device="cpu", **over):
    """(ours, sdpa at dtype, sdpa in fp64): one set of random weights, separate configs."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(kind, **over), attn_implementation="sdpa")
    state = base.state_dict()

    def build(impl, dt):
        m = AutoModelForCausalLM.from_config(_config(kind, **over), attn_implementation=impl)
        m.load_state_dict(state)
        return m.to(device=device, dtype=dt).eval()

    return build("unigendet", dtype), build("sdpa", dtype), build("sdpa", torch.float64)


def _run(model, ids, weight, keep, **inputs):
    """Logits at the kept positions and the gradients of sum(weight * logits) over every parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **inputs).logits[keep]
    (logits.double() * weight).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _floor(dtype) -> float:
    return {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]


def _compare(kind, dtype, ours_inputs, sdpa_inputs, ids, keep, device="cpu", **over):
    ours, plain, ref = _models(kind, dtype, device, **over)
    ids = ids.to(device)
    weight = torch.randn(int(keep.sum()), VOCAB, dtype=torch.float64, device=device)
    keep = keep.to(device)
    mv = lambda d: {k: (v.to(device) if isinstance(v, torch.Tensor) else
                        {a: b.to(device) for a, b in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}
    got, got_g = _run(ours, ids, weight, keep, **mv(ours_inputs))
    pt, pt_g = _run(plain, ids, weight, keep, **mv(sdpa_inputs))
    r, r_g = _run(ref, ids, weight, keep, **mv(sdpa_inputs))
    assert torch.isfinite(got).all()
    assert_within("logits", got, r, pt, 2, dtype, _floor(dtype))
    assert got_g.keys() == r_g.keys()
    for name in r_g:
        assert torch.isfinite(got_g[name]).all(), name
        assert_within(f"grad {name}", got_g[name], r_g[name], pt_g[name], 3, dtype, _floor(dtype))


# --------------------------------------------------------------------------------------------------
# Batches and their dense masks, written from the rules
# --------------------------------------------------------------------------------------------------


def packed_batch(rows):
    """``rows``: per row, the document lengths (rows of equal total). -> ids, position_ids, 4-D bool mask."""
    total = sum(rows[0])
    assert all(sum(r) == total for r in rows)
    pos, masks = [], []
    for r in rows:
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(r)])
        pos.append(torch.cat([torch.arange(n) for n in r]))
        t = torch.arange(total)
        masks.append((doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None]))
    ids = torch.randint(0, VOCAB, (len(rows), total))
    return ids, torch.stack(pos), torch.stack(masks)[:, None]


def window_mask(mask4d, window: int):
    """Restrict a causal mask to keys less than ``window`` positions back (transformers' sliding rule)."""
    t = torch.arange(mask4d.shape[-1])
    return mask4d & ((t[:, None] - t[None, :]) < window)


def padded_batch(lengths, total, left: bool):
    """Rows of ``lengths`` valid tokens padded to ``total`` -> ids, 2-D mask, 4-D mask for sdpa."""
    pad = torch.zeros(len(lengths), total, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            pad[b, total - n:] = True
        else:
            pad[b, :n] = True
    t = torch.arange(total)
    causal = t[None, :] <= t[:, None]
    # Padded query rows attend to themselves so that sdpa stays finite; they are excluded from the loss.
    mask4d = (causal[None] & pad[:, None, :]) | torch.eye(total, dtype=torch.bool)[None]
    ids = torch.randint(0, VOCAB, (len(lengths), total))
    return ids, pad.long(), mask4d[:, None]


PACKED_ROWS = [[7, 12, 5]]


# --------------------------------------------------------------------------------------------------
# Torch backend
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_documents(torch_backend, kind, dtype):
    """Documents packed in one row attend only to themselves (position_ids restart at 0)."""
    ids, pos, mask = packed_batch(PACKED_ROWS)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    _compare(kind, dtype, dict(position_ids=pos), dict(position_ids=pos, attention_mask=mask), ids, keep)


def test_packed_rows_and_flash_kwargs(torch_backend):
    """Two packed rows; the same batch as one flattened row with cu_seq_lens_* / max_length_* kwargs."""
    rows = [[5, 9, 2], [10, 6]]
    ids, pos, mask = packed_batch(rows)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    _compare("qwen2", torch.float32, dict(position_ids=pos), dict(position_ids=pos, attention_mask=mask), ids, keep)
    lens = [n for r in rows for n in r]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    flat = dict(position_ids=pos.reshape(1, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens),
                max_length_k=max(lens))
    big = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    big[0, 0, :16, :16], big[0, 0, 16:, 16:] = mask[0, 0], mask[1, 0]
    _compare("llama", torch.float32, flat, dict(position_ids=pos.reshape(1, -1), attention_mask=big),
             ids.reshape(1, -1), torch.ones(1, 32, dtype=torch.bool))


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_padding(torch_backend, kind, left):
    ids, pad, mask = padded_batch([9, 5, 14], 14, left)
    _compare(kind, torch.float32, dict(attention_mask=pad), dict(attention_mask=mask), ids, pad.bool())


def _sliding(window):
    cfg = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    assert _config("qwen2", **cfg).layer_types == ["full_attention", "sliding_attention"]
    return cfg


def test_sliding_window_packed(torch_backend):
    """Qwen2 with a sliding-window second layer (window 4) over packed documents longer than the window."""
    cfg = _sliding(4)
    ids, pos, mask = packed_batch(PACKED_ROWS)
    masks = {"full_attention": mask, "sliding_attention": window_mask(mask, 4)}
    keep = torch.ones(ids.shape, dtype=torch.bool)
    _compare("qwen2", torch.float32, dict(position_ids=pos), dict(position_ids=pos, attention_mask=masks), ids, keep,
             **cfg)


def test_sliding_window_padded(torch_backend):
    cfg = _sliding(3)
    ids, pad, mask = padded_batch([11, 6], 11, left=False)
    masks = {"full_attention": mask, "sliding_attention": window_mask(mask, 3)}
    _compare("qwen2", torch.float32, dict(attention_mask=pad), dict(attention_mask=masks), ids, pad.bool(), **cfg)


def test_generate_with_cache_matches_sdpa(torch_backend):
    """Greedy decoding with a KV cache (bottom-right causal, left padding): same tokens and logits as sdpa."""
    torch.manual_seed(0)
    ours, plain, _ = _models("llama", torch.float32, use_cache=True)
    ids, pad, _ = padded_batch([4, 7], 7, left=True)
    kw = dict(attention_mask=pad, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    a, b = ours.generate(ids, **kw), plain.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Registration, masks, errors
# --------------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_from_config_works():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ut.register() == ut.register() == "unigendet"
    assert ALL_ATTENTION_FUNCTIONS["unigendet"] is ut.unigendet_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["unigendet"] is ut.unigendet_mask
    model = AutoModelForCausalLM.from_config(_config("qwen2"), attn_implementation="unigendet")
    assert model.config._attn_implementation == "unigendet"


def test_no_dense_mask_is_built():
    """The model hands the attention None (no padding, packed or not) or the 2-D padding mask."""
    cfg = _config("qwen2")
    cfg._attn_implementation = "unigendet"
    emb = torch.zeros(2, 6, 64)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    assert create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos) is None
    full = torch.ones(2, 6, dtype=torch.long)
    assert create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=full, cache=None) is None
    pad = full.clone()
    pad[1, :2] = 0
    m = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=pad, cache=None)
    assert m.shape == (2, 6) and m.dtype == torch.bool and torch.equal(m, pad.bool())


def test_unsupported_mask_overlays_raise():
    cfg = _config("qwen2")
    cfg._attn_implementation = "unigendet"
    emb = torch.zeros(1, 6, 64)
    with pytest.raises(NotImplementedError, match="custom mask functions"):
        create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None,
                           or_mask_function=lambda b, h, q, k: q == k)
    with pytest.raises(NotImplementedError, match="block"):
        create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None,
                           block_sequence_ids=torch.tensor([[0, 0, 1, 1, 1, -1]]))


def _module(causal=True):
    m = torch.nn.Module()
    m.is_causal = causal
    return m


def test_unsupported_features_raise(torch_backend):
    q = torch.randn(1, 4, 5, 32)
    k = v = torch.randn(1, 2, 5, 32)
    f = ut.unigendet_attention_forward
    with pytest.raises(NotImplementedError, match="dropout"):
        f(_module(), q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        f(_module(), q, k, v, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        f(_module(), q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="bidirectional sliding"):
        f(_module(causal=False), q, k, v, None, sliding_window=2)
    with pytest.raises(ValueError, match="2-D padding mask"):
        f(_module(), q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        f(_module(), q, k, v, None, position_ids=torch.zeros(3, 1, 5, dtype=torch.long))
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q\[-1\] = 4 must equal"):
        f(_module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2)


def test_training_with_attention_dropout_raises(torch_backend):
    cfg = _config("llama", attention_dropout=0.1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="unigendet").train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model(input_ids=torch.randint(0, VOCAB, (1, 6)))
    model.eval()(input_ids=torch.randint(0, VOCAB, (1, 6)))  # no dropout at evaluation


def test_bidirectional_and_value_head_dim(torch_backend):
    """Direct calls: a non-causal module over padded rows, and values with a smaller head dim (zero-padded)."""
    from attention_helpers import dense_attention

    torch.manual_seed(1)
    q = torch.randn(2, 4, 6, 32, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 32, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, weights = ut.unigendet_attention_forward(_module(causal=False), q, k, v, pad, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 4, 16)
    for b in range(2):
        n = int(pad[b].sum())
        ref, _ = dense_attention(q[b, :, :n].transpose(0, 1), [k[b, :, :n].transpose(0, 1)],
                                 [v[b, :, :n].transpose(0, 1)], [torch.ones(n, n, dtype=torch.bool)], scale=0.3)
        torch.testing.assert_close(out[b, :n], ref)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


def test_geometry_is_computed_once_per_forward(torch_backend, monkeypatch):
    calls = []
    orig = ut._from_positions
    monkeypatch.setattr(ut, "_from_positions", lambda *a: calls.append(1) or orig(*a))
    ids, pos, _ = packed_batch(PACKED_ROWS)
    model = AutoModelForCausalLM.from_config(_config("qwen2"), attn_implementation="unigendet")
    model(input_ids=ids, position_ids=pos)
    assert len(calls) == 1
    model(input_ids=ids, position_ids=pos.clone())
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# Triton kernels: interpreter (CPU) and GPU
# --------------------------------------------------------------------------------------------------


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpret_packed(triton_backend, dtype):
    ids, pos, mask = packed_batch(PACKED_ROWS)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    _compare("qwen2", dtype, dict(position_ids=pos), dict(position_ids=pos, attention_mask=mask), ids, keep)


@interpret
def test_interpret_padding(triton_backend):
    ids, pad, mask = padded_batch([9, 5], 9, left=True)
    _compare("llama", torch.float32, dict(attention_mask=pad), dict(attention_mask=mask), ids, pad.bool())


@interpret
def test_interpret_sliding_window(triton_backend):
    cfg = _sliding(4)
    ids, pos, mask = packed_batch([[3, 9]])
    masks = {"full_attention": mask, "sliding_attention": window_mask(mask, 4)}
    keep = torch.ones(ids.shape, dtype=torch.bool)
    _compare("qwen2", torch.float32, dict(position_ids=pos), dict(position_ids=pos, attention_mask=masks), ids, keep,
             **cfg)


@gpu
@pytest.mark.parametrize("window", [None, 16])
def test_gpu_packed_bf16(triton_backend, window):
    rows = [[37, 120, 64, 35], [256]]
    ids, pos, mask = packed_batch(rows)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    sdpa_mask = mask
    cfg = {}
    if window is not None:
        cfg = _sliding(window)
        sdpa_mask = {"full_attention": mask, "sliding_attention": window_mask(mask, window)}
    _compare("qwen2", torch.bfloat16, dict(position_ids=pos), dict(position_ids=pos, attention_mask=sdpa_mask), ids,
             keep, device="cuda", **cfg)
