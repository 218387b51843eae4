"""Tests for text-decoding processors and the flow-matching Euler sampler."""

import math

import pytest
import torch

from unigendet.sampling import (
    BRANCH_COND,
    BRANCH_IMG,
    BRANCH_UNCOND,
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    combine_guidance,
    decode_tokens,
    flow_euler_sample,
    flow_timesteps,
    greedy_token,
    process_logits,
    sample_next_token,
)

# ------------------------------------------------------------------------------------------------------------
# Text decoding
# ------------------------------------------------------------------------------------------------------------


def _kept(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(x[0])).flatten().tolist())


def test_temperature_divides():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), torch.tensor([[2.0, -4.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5, 0.0]])
    assert _kept(apply_top_k(logits, 2)) == {1, 4}
    assert _kept(apply_top_k(logits, 3)) == {1, 3, 4}
    assert _kept(apply_top_k(logits, 0)) == set(range(6))
    assert _kept(apply_top_k(logits, 100)) == set(range(6))
    # Ties with the k-th value are kept, as in transformers.
    tied = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert _kept(apply_top_k(tied, 1)) == {1, 2}
    # Kept values are unchanged.
    out = apply_top_k(logits, 2)
    assert out[0, 1] == 3.0 and out[0, 4] == 2.5


def test_top_p_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    # Cumulative mass in descending order: 0.5, 0.75, 0.90, 0.97, 1.0.
    assert _kept(apply_top_p(logits, 0.5)) == {0}
    assert _kept(apply_top_p(logits, 0.6)) == {0, 1}
    assert _kept(apply_top_p(logits, 0.8)) == {0, 1, 2}
    assert _kept(apply_top_p(logits, 0.95)) == {0, 1, 2, 3}
    assert _kept(apply_top_p(logits, 1.0)) == {0, 1, 2, 3, 4}
    # Always at least one token, even for a tiny p.
    assert _kept(apply_top_p(logits, 1e-6)) == {0}
    # Order of the vocabulary does not matter.
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert _kept(apply_top_p(logits[:, perm], 0.8)) == {1, 3, 4}


def test_top_p_matches_transformers_when_available():
    tf = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g) * 3
    for p in (0.3, 0.8, 0.95):
        ref = tf.TopPLogitsWarper(p)(None, logits.clone())
        torch.testing.assert_close(apply_top_p(logits, p), ref)
    for k in (1, 5, 20):
        ref = tf.TopKLogitsWarper(k)(None, logits.clone())
        torch.testing.assert_close(apply_top_k(logits, k), ref)
    ids = torch.randint(0, 50, (4, 7), generator=g)
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, 1.3), ref)


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -2.0, 4.0]])
    ids = torch.tensor([[0, 1, 1], [3, 2, -1]])  # -1 is padding
    out = apply_repetition_penalty(logits, ids, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 1.0, -4.0, 2.0]])
    torch.testing.assert_close(out, expected)
    # Repeated occurrences are penalised once.
    assert apply_repetition_penalty(logits, torch.tensor([[0, 0, 0], [0, 0, 0]]), 2.0)[0, 0] == 1.0
    # Penalty 1 and no history are no-ops.
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, 1.0), logits)
    torch.testing.assert_close(apply_repetition_penalty(logits, None, 2.0), logits)
    with pytest.raises(ValueError, match="generated_ids"):
        apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    with pytest.raises(ValueError, match="vocab"):
        apply_repetition_penalty(logits, torch.tensor([[0], [4]]), 2.0)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.2)
    assert sample_next_token(logits, cfg, torch.tensor([[0]])).item() == 1
    assert sample_next_token(logits, SamplingConfig.greedy(), torch.tensor([[0]])).item() == 0


def test_greedy_is_argmax():
    logits = torch.randn(5, 31)
    torch.testing.assert_close(greedy_token(logits), logits.argmax(-1))
    torch.testing.assert_close(sample_next_token(logits, SamplingConfig.greedy()), logits.argmax(-1))


def test_seeded_sampling_reproducible_and_within_filter():
    logits = torch.randn(3, 64)
    cfg = SamplingConfig.paper()
    a = [sample_next_token(logits, cfg, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(a[0], a[1])
    allowed = torch.isfinite(process_logits(logits, None, cfg))
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        tok = sample_next_token(logits, cfg, generator=g)
        assert allowed[torch.arange(3), tok].all()
    assert int(allowed.sum(-1).max()) <= 20


def test_sampling_distribution_matches_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    cfg = SamplingConfig.reference_sampling(temperature=0.7)
    g = torch.Generator().manual_seed(0)
    n = 20000
    toks = sample_next_token(logits.expand(n, 4), cfg, generator=g)
    freq = torch.bincount(toks, minlength=4).double() / n
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    # 5 standard errors of a binomial proportion.
    tol = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert (freq - expected).abs().le(tol).all(), (freq, expected)


def test_paper_preset_values_and_validation():
    cfg = SamplingConfig.paper()
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="logits"):
        process_logits(torch.zeros(3), None, cfg)


# ------------------------------------------------------------------------------------------------------------
# Flow-matching sampler
# ------------------------------------------------------------------------------------------------------------


def test_flow_timesteps_schedule():
    t = flow_timesteps(50, 3.0, dtype=torch.float64)
    base = torch.linspace(1, 0, 50, dtype=torch.float64)
    torch.testing.assert_close(t, 3 * base / (1 + 2 * base))
    assert t[0] == 1 and t[-1] == 0 and (t[:-1] > t[1:]).all()
    torch.testing.assert_close(flow_timesteps(5, 1.0), torch.linspace(1, 0, 5))


def gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """Exact marginal velocity for x0 ~ N(mu, sigma^2) per dimension and x_t = (1 - t) x0 + t eps.

    (x_t, eps, x0) are jointly Gaussian: Var(x_t) = (1-t)^2 sigma^2 + t^2, Cov(eps, x_t) = t,
    Cov(x0, x_t) = (1-t) sigma^2, so
    E[eps - x0 | x_t] = -mu + (t - (1-t) sigma^2) (x_t - (1-t) mu) / Var(x_t).
    """

    def v(x, t, branches):
        t = t.to(torch.float64)
        var = (1 - t) ** 2 * sigma**2 + t**2
        vel = -mu + (t - (1 - t) * sigma**2) * (x - (1 - t) * mu) / var
        return {b: vel for b in branches}

    return v


def _affine_map_error(x0, noise, mu, sigma):
    # Error against the exact flow map, scaled so that tail samples (large |noise|) are not over-weighted.
    return ((x0 - (mu + sigma * noise)).abs() / (1 + noise.abs())).max().item()


def test_flow_reaches_gaussian_target():
    mu = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.5, 0.1], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 20000
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x0 = flow_euler_sample(gaussian_velocity(mu, sigma), noise, num_steps=200, shift=3.0)
    # The exact flow for Gaussians is the monotone affine map x1 -> mu + sigma x1; Euler is first order.
    assert _affine_map_error(x0, noise, mu, sigma) < 1.2e-2
    # Statistics within sampling tolerance (5 standard errors) plus a small discretisation allowance.
    se_mean = sigma / math.sqrt(n)
    assert ((x0.mean(0) - mu).abs() <= 5 * se_mean + 5e-3).all(), x0.mean(0)
    se_std = sigma / math.sqrt(2 * n)
    assert ((x0.std(0) - sigma).abs() <= 5 * se_std + 2e-2).all(), x0.std(0)


def test_flow_euler_first_order_convergence():
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    sigma = torch.tensor([0.8, 1.2], dtype=torch.float64)
    noise = torch.randn(4096, 2, dtype=torch.float64)
    errs = [
        _affine_map_error(flow_euler_sample(gaussian_velocity(mu, sigma), noise, num_steps=n), noise, mu, sigma)
        for n in (51, 101)
    ]
    # The default 50-point schedule is already accurate, and doubling the steps halves the error.
    assert errs[0] < 5e-2
    assert 0.4 < errs[1] / errs[0] < 0.6, errs


def test_flow_point_mass_exact():
    c = torch.tensor([[0.3, -1.7, 4.0]], dtype=torch.float64)

    def v(x, t, branches):
        # sigma -> 0 limit of the Gaussian velocity: v = (x - c) / t; constant along straight paths.
        vel = (x - c) / t.to(torch.float64)
        return {b: vel for b in branches}

    noise = torch.randn(16, 3, dtype=torch.float64)
    out, traj = flow_euler_sample(v, noise, num_steps=7, shift=3.0, return_trajectory=True)
    torch.testing.assert_close(out, c.expand(16, 3), atol=1e-12, rtol=0)
    assert len(traj) == 7 and traj[0] is noise


def _const_velocity(values, log=None):
    def v(x, t, branches):
        if log is not None:
            log.append((float(t), branches))
        return {b: torch.full_like(x, values[b]) for b in branches}

    return v


def test_cfg_with_equal_branches_equals_no_cfg():
    mu = torch.tensor([2.0, -1.0], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.5], dtype=torch.float64)
    noise = torch.randn(64, 2, dtype=torch.float64)
    base = flow_euler_sample(gaussian_velocity(mu, sigma), noise, num_steps=20)
    for renorm in ("global", "channel", "text_channel"):
        guided = flow_euler_sample(
            gaussian_velocity(mu, sigma), noise, num_steps=20, text_scale=4.0, img_scale=1.5, renorm_type=renorm
        )
        # Equal only up to the reference's 1e-8 guard in the renorm denominator.
        torch.testing.assert_close(guided, base, atol=1e-6, rtol=0)


def test_cfg_interval_and_branch_requests():
    log = []
    vals = {BRANCH_COND: 1.0, BRANCH_UNCOND: 0.0, BRANCH_IMG: 0.0}
    flow_euler_sample(
        _const_velocity(vals, log),
        torch.zeros(2, 2),
        num_steps=11,
        shift=1.0,
        text_scale=2.0,
        img_scale=1.5,
        cfg_interval=(0.4, 1.0),
    )
    assert len(log) == 10
    for t, branches in log:
        # The window test happens in the schedule's float32, as in the reference: t = float32(0.4) is outside.
        t32 = torch.tensor(t, dtype=torch.float32)
        if (t32 > 0.4) and (t32 <= 1.0):
            assert branches == (BRANCH_COND, BRANCH_UNCOND, BRANCH_IMG)
        else:
            assert branches == (BRANCH_COND,)
    assert [b for t, b in log if abs(t - 0.4) < 1e-6] == [(BRANCH_COND,)]
    assert sum(len(b) == 3 for _, b in log) == 6  # t = 1.0, 0.9, ..., 0.5
    log.clear()
    flow_euler_sample(_const_velocity(vals, log), torch.zeros(2, 2), num_steps=4, text_scale=1.0, img_scale=2.0)
    assert all(b == (BRANCH_COND,) for _, b in log)


def test_cfg_single_step_hand_computed():
    # v_cond = 1, v_uncond = 0, v_img = 0.5 everywhere; one Euler step from t=1 to t=0 (dt = 1).
    vals = {BRANCH_COND: 1.0, BRANCH_UNCOND: 0.0, BRANCH_IMG: 0.5}
    x1 = torch.zeros(3, 4, dtype=torch.float64)
    # Text CFG 3 -> v_txt = 3; global renorm clamps ||v_cond||/||v|| = 1/3 to at least renorm_min.
    out = flow_euler_sample(_const_velocity(vals), x1, num_steps=2, text_scale=3.0, renorm_min=0.0)
    torch.testing.assert_close(out, torch.full_like(x1, -1.0))
    out = flow_euler_sample(_const_velocity(vals), x1, num_steps=2, text_scale=3.0, renorm_min=1.0)
    torch.testing.assert_close(out, torch.full_like(x1, -3.0))
    out = flow_euler_sample(_const_velocity(vals), x1, num_steps=2, text_scale=3.0, renorm_type="none")
    torch.testing.assert_close(out, torch.full_like(x1, -3.0))
    # Image CFG on top: v = 0.5 + 2 (3 - 0.5) = 5.5.
    out = flow_euler_sample(_const_velocity(vals), x1, num_steps=2, text_scale=3.0, img_scale=2.0, renorm_min=1.0)
    torch.testing.assert_close(out, torch.full_like(x1, -5.5))


def test_combine_guidance_renorm_variants():
    g = torch.Generator().manual_seed(0)
    vc, vu, vi = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    v_txt = vu + 4 * (vc - vu)
    v = vi + 1.5 * (v_txt - vi)
    s = (vc.norm() / (v.norm() + 1e-8)).clamp(0.2, 1.0)
    torch.testing.assert_close(
        combine_guidance(vc, vu, vi, text_scale=4, img_scale=1.5, renorm_type="global", renorm_min=0.2), v * s
    )
    s = (vc.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(combine_guidance(vc, vu, vi, text_scale=4, img_scale=1.5, renorm_type="channel"), v * s)
    s = (vc.norm(dim=-1, keepdim=True) / (v_txt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(
        combine_guidance(vc, vu, vi, text_scale=4, img_scale=1.5, renorm_type="text_channel"),
        vi + 1.5 * (v_txt * s - vi),
    )
    with pytest.raises(ValueError, match="v_uncond"):
        combine_guidance(vc, None, text_scale=2.0)


def test_flow_rejects_missing_branch():
    def v(x, t, branches):
        return {BRANCH_COND: torch.zeros_like(x)}

    with pytest.raises(ValueError, match="uncond"):
        flow_euler_sample(v, torch.zeros(2, 2), num_steps=3, text_scale=2.0)


def test_decode_tokens_greedy_stops_at_eos():
    # A toy "model": next token = (current + 1) mod 6, token 4 is EOS; sequences start at different tokens.
    vocab = 6

    def step(tokens):
        return torch.nn.functional.one_hot((tokens + 1) % vocab, vocab).float() * 5

    out = decode_tokens(
        step, torch.tensor([0, 2]), SamplingConfig.greedy(), max_new_tokens=10, eos_token_id=4, pad_token_id=-1
    )
    torch.testing.assert_close(out, torch.tensor([[1, 2, 3, 4], [3, 4, -1, -1]]))
    out = decode_tokens(step, torch.tensor([0]), SamplingConfig.greedy(), max_new_tokens=3)
    torch.testing.assert_close(out, torch.tensor([[1, 2, 3]]))


def test_decode_tokens_repetition_penalty_uses_history_and_seeded_sampling():
    # Constant logits favour token 0 slightly; a strong penalty on seen tokens walks through the vocabulary.
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7]])
    cfg = SamplingConfig(repetition_penalty=2.0)
    out = decode_tokens(lambda t: logits, torch.tensor([0]), cfg, max_new_tokens=3)
    torch.testing.assert_close(out, torch.tensor([[1, 2, 3]]))
    out = decode_tokens(lambda t: logits, torch.tensor([3]), cfg, max_new_tokens=1, history=torch.tensor([[1, -1]]))
    torch.testing.assert_close(out, torch.tensor([[0]]))
    cfg = SamplingConfig.paper()
    runs = [
        decode_tokens(
            lambda t: logits.expand(4, 4),
            torch.zeros(4, dtype=torch.long),
            cfg,
            max_new_tokens=8,
            generator=torch.Generator().manual_seed(11),
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1])


def test_decode_tokens_checks_for_the_end_every_few_steps():
    vocab = 6

    def step(tokens):
        return torch.nn.functional.one_hot((tokens + 1) % vocab, vocab).float() * 5

    every = decode_tokens(step, torch.tensor([2]), SamplingConfig.greedy(), max_new_tokens=10, eos_token_id=4)
    third = decode_tokens(step, torch.tensor([2]), SamplingConfig.greedy(), max_new_tokens=10, eos_token_id=4,
                          check_every=3)
    assert every.tolist() == [[3, 4]]
    assert third.tolist() == [[3, 4, 4]]  # ran on to the first check, padding with EOS after it
    with pytest.raises(ValueError, match="check_every"):
        decode_tokens(step, torch.tensor([2]), SamplingConfig.greedy(), max_new_tokens=2, check_every=0)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_flow_segments_guide_each_part_as_its_own_sample(renorm):
    # Two "images" sampled together with segments=2 equal each sampled alone: the global renorm is per image.
    g = torch.Generator().manual_seed(3)
    w = {b: torch.randn(4, 4, generator=g, dtype=torch.float64) for b in (BRANCH_COND, BRANCH_UNCOND, BRANCH_IMG)}

    def v(x, t, branches):
        return {b: x @ w[b] + t for b in branches}

    noise = torch.randn(10, 4, generator=g, dtype=torch.float64)
    kw = dict(num_steps=6, text_scale=4.0, img_scale=1.5, renorm_type=renorm, renorm_min=0.1)
    joint = flow_euler_sample(v, noise, segments=2, **kw)
    alone = torch.cat([flow_euler_sample(v, noise[:5], **kw), flow_euler_sample(v, noise[5:], **kw)])
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-12)
    if renorm == "global":  # one shared scale differs from per-image scales
        assert not torch.allclose(flow_euler_sample(v, noise, **kw), alone)
    with pytest.raises(ValueError, match="segments"):
        flow_euler_sample(v, noise, segments=3, **kw)


def test_flow_rejects_a_branch_of_the_wrong_shape():
    def v(x, t, branches):
        return {b: torch.zeros(x.shape[0] + (b == BRANCH_UNCOND), x.shape[1]) for b in branches}

    with pytest.raises(ValueError, match="'uncond' has shape"):
        flow_euler_sample(v, torch.zeros(2, 2), num_steps=3, text_scale=2.0)
