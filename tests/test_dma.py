"""Specification of cheems_mlx.dma: dynamic mask attention (docs/architecture.md section 3).

    m_t   = exp(A * softplus(concat_kv_heads(V_t) @ Wdt.T))      # per key, per mask head
    score = q . k / sqrt(P) + m_key   (+ causal / padding masks, + the variant's rule)

References are numpy, written here from the doc's rules (the mask) and from plain eager
attention with an additive bias (the module), in float64.

Tolerances: ``dynamic_mask`` only selects and copies float32 values, so its output is
compared exactly. The module runs in float32 against a float64 reference with O(1)
activations; float32 rounding leaves ~1e-6 relative, and ``RTOL_F32 = 2e-5`` of the
reference's largest magnitude leaves a 10x margin while a wrong head mapping, a missing
bias or a wrongly kept key moves outputs by 1e-2 or more.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, CacheList, KVCache

from cheems_mlx.dma import DynamicMaskAttention, dynamic_mask
from cheems_mlx.model import ModelArgs

MIN = float(np.finfo(np.float32).min)  # the additive "masked" value of float32 activations
from conftest import RTOL_F32, assert_close  # noqa: E402


# ----------------------------------------------------------------------------- mask rules


def kth_smallest_ref(bias, k):
    """k-th smallest (1-based) m per (batch, head) over all T keys: (b, Hm, 1, 1)."""
    return np.sort(bias, axis=-1)[..., k - 1][..., None, None]


def dynamic_mask_ref(bias, valid, q_len, rule, W, r):
    """The additive mask (b, Hm, q_len, T) from the doc's rules. bias: (b, Hm, T);
    valid: bool broadcastable to (b, 1, q_len, T) (causal / padding), None = all keys."""
    b, hm, T = bias.shape
    m = np.broadcast_to(bias[:, :, None, :], (b, hm, q_len, T))
    allowed = np.ones((b, hm, q_len, T), bool) if valid is None else np.broadcast_to(valid, (b, hm, q_len, T))
    if rule == "keep_window":
        out = np.where(allowed, m, MIN)
        if T > W:  # keep the W largest entries of each row (masked entries count as MIN)
            top = np.argsort(-out, axis=-1, kind="stable")[..., :W]
            keep = np.zeros(out.shape, bool)
            np.put_along_axis(keep, top, True, axis=-1)
            out = np.where(keep, out, MIN)
        return out
    if rule == "cheems_ratio":
        if 0.0 < r < 1.0 and int(T * r) > 0:
            allowed = allowed & (m >= kth_smallest_ref(bias, int(T * r)))
        return np.where(allowed, m, MIN)
    if rule == "legacy_ratio":  # the remote code, step by step, in float32
        attn_mask = m.astype(np.float32)
        if T > W:
            assert 0.0 < r <= 1.0
            k = int((T - W) * r)
            if k > 0:  # kthvalue, then masked_fill(attn_mask < rate_value, min)
                rate_value = kth_smallest_ref(bias.astype(np.float32), k)
                attn_mask = np.where(attn_mask < rate_value, np.float32(MIN), attn_mask)
        with np.errstate(over="ignore"):  # + the causal mask: min + min = -inf, m + min = min
            return attn_mask + np.where(allowed, np.float32(0.0), np.float32(MIN))
    if rule == "hard":  # boolean test replaces the causal mask; m itself never added
        return np.where(m < 1.0, MIN, np.where(allowed, 0.0, MIN))
    raise AssertionError(rule)


def causal(q_len, T, window=None):
    """(1, 1, q_len, T) bool: query i (absolute position T - q_len + i) sees keys <= it,
    and with a sliding window only the last ``window`` of them."""
    qpos = np.arange(T - q_len, T)[:, None]
    kpos = np.arange(T)[None, :]
    ok = kpos <= qpos
    if window is not None:
        ok &= kpos > qpos - window
    return ok[None, None]


def random_bias(rng, b, hm, T):
    """Distinct positive m values spread across 1 (some heads mostly below, some above)."""
    return np.exp(rng.normal(0.0, 1.0, size=(b, hm, T))).astype(np.float32)


def run_mask(bias, valid, q_len, rule, W=2048, r=0.0):
    out = dynamic_mask(
        mx.array(bias), None if valid is None else mx.array(valid), q_len, rule, W, r, MIN
    )
    return np.array(out)


@pytest.mark.parametrize("q_len", [12, 1])
def test_keep_window_adds_bias_under_causal_mask_when_keys_fit_window(q_len):
    bias = random_bias(np.random.default_rng(0), 2, 3, 12)
    valid = causal(q_len, 12)
    ours = run_mask(bias, valid, q_len, "keep_window", W=12)
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, q_len, "keep_window", 12, 0.0))
    # spelled out: allowed keys get exactly m, the others the float32 minimum
    np.testing.assert_array_equal(ours, np.where(valid, bias[:, :, None, :], MIN))


@pytest.mark.parametrize("q_len", [20, 1])
def test_keep_window_keeps_top_w_biases_per_row_when_keys_exceed_window(q_len):
    T, W = 20, 7
    bias = random_bias(np.random.default_rng(1), 2, 3, T)
    valid = causal(q_len, T)
    ours = run_mask(bias, valid, q_len, "keep_window", W=W)
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, q_len, "keep_window", W, 0.0))
    kept = (ours > MIN).sum(-1)  # (b, Hm, q_len): W, or every allowed key while fewer than W
    np.testing.assert_array_equal(kept, np.broadcast_to(np.minimum(W, valid.sum(-1)), kept.shape))


def test_keep_window_top_w_is_taken_after_padding_and_causal_masking():
    """A padded or future key never takes one of the W places, however large its m."""
    T, W = 16, 5
    rng = np.random.default_rng(2)
    bias = random_bias(rng, 2, 2, T)
    bias[:, :, :3] = 1e3  # huge m on keys that row 1 treats as left padding
    bias[:, :, -1] = 1e3  # and on the last key, in the future of every row but the last
    valid = causal(T, T) & (np.arange(T) >= np.array([0, 3])[:, None])[:, None, None, :]
    ours = run_mask(bias, valid, T, "keep_window", W=W)
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, T, "keep_window", W, 0.0))
    assert np.all(ours[1, :, :, :3] == MIN)
    assert np.all(ours[:, :, :-1, -1] == MIN)


def test_keep_window_keeps_exactly_w_keys_when_biases_tie():
    """Spec: 'keep only the top-W entries of each row'. Which of several tied keys is kept
    is not specified (torch.topk's choice is implementation-defined), so only the count
    and the strictly-larger keys are checked."""
    T, W = 12, 4
    bias = np.array([[[0.5, 3.0, 2.0, 2.0, 0.1, 2.0, 5.0, 0.2, 0.3, 0.4, 0.6, 0.7]]], np.float32)
    ours = run_mask(bias, None, 1, "keep_window", W=W)
    kept = ours[0, 0, 0] > MIN
    assert kept[[1, 6]].all()  # the two biases strictly above the W-th largest (2.0)
    assert kept[[2, 3, 5]].sum() == 2  # two of the three tied 2.0s
    assert kept.sum() == W


@pytest.mark.parametrize("r", [0.25, 0.5, 0.9])
def test_cheems_ratio_masks_keys_below_kth_smallest_bias_for_every_query(r):
    T = 16
    bias = random_bias(np.random.default_rng(3), 2, 3, T)
    valid = causal(T, T)
    ours = run_mask(bias, valid, T, "cheems_ratio", r=r)
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, T, "cheems_ratio", 2048, r))
    # k = floor(T r) -> exactly k - 1 keys (distinct m) are masked in every column of the last row
    assert (ours[:, :, -1] == MIN).sum(-1).tolist() == [[int(T * r) - 1] * 3] * 2


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_cheems_ratio_outside_open_interval_masks_nothing_beyond_causal(r):
    bias = random_bias(np.random.default_rng(4), 1, 2, 10)
    valid = causal(10, 10)
    ours = run_mask(bias, valid, 10, "cheems_ratio", r=r)
    np.testing.assert_array_equal(ours, np.where(valid, bias[:, :, None, :], MIN))


def test_legacy_ratio_masks_keys_below_kth_smallest_when_keys_exceed_window():
    T, W, r = 20, 8, 0.5  # k = int((20 - 8) * 0.5) = 6
    bias = random_bias(np.random.default_rng(5), 2, 4, T)
    valid = causal(T, T)
    ours = run_mask(bias, valid, T, "legacy_ratio", W=W, r=r)
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, T, "legacy_ratio", W, r))
    # k - 1 = 5 keys (distinct m) masked in the last row, which sees every key causally
    assert (ours[:, :, -1] == MIN).sum(-1).tolist() == [[5] * 4] * 2
    # the two masks are added: a future key the dynamic rule masks too is -inf
    dyn = bias < np.sort(bias, -1)[..., 5:6]  # (b, Hm, T)
    assert np.all(ours[:, :, 0, 1:][dyn[:, :, 1:]] == -np.inf)
    assert np.all(ours[:, :, 0, 1:][~dyn[:, :, 1:]] == MIN)


def test_legacy_ratio_masks_nothing_beyond_causal_when_keys_fit_window():
    bias = random_bias(np.random.default_rng(6), 2, 2, 8)
    valid = causal(8, 8)
    ours = run_mask(bias, valid, 8, "legacy_ratio", W=8, r=0.5)
    np.testing.assert_array_equal(ours, np.where(valid, bias[:, :, None, :], MIN))


def test_legacy_ratio_masks_nothing_while_k_is_zero_and_rejects_a_ratio_outside_0_1():
    """The reference raises only for a ratio outside (0, 1]; at key lengths where
    int((T - W) * r) is 0 (T = W + 1, r = 0.5) it masks nothing beyond the causal mask."""
    bias = random_bias(np.random.default_rng(7), 1, 2, 10)
    valid = causal(10, 10)
    for T, r in ((9, 0.5), (10, 0.4)):  # int(1 * 0.5) == int(2 * 0.4) == 0
        ours = run_mask(bias[..., :T], causal(T, T), T, "legacy_ratio", W=8, r=r)
        np.testing.assert_array_equal(ours, np.where(causal(T, T), bias[..., :T][:, :, None, :], MIN))
    for r in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="dynamic_mask_ratio"):
            run_mask(bias, valid, 10, "legacy_ratio", W=8, r=r)


def test_legacy_ratio_row_with_every_causal_key_masked_is_uniform_over_keys_masked_once():
    """Query 0 sees only key 0; when the rule masks key 0 the reference's row holds min on
    key 0 and on the future keys the rule kept, -inf on the future keys it masked too:
    softmax is uniform over the former (not over every key)."""
    T, W, r = 12, 4, 1.0  # k = 8: the 7 smallest m are masked
    bias = random_bias(np.random.default_rng(9), 1, 1, T)
    bias[..., 0] = 1e-3  # key 0 is the smallest: dynamically masked
    ours = run_mask(bias, causal(T, T), T, "legacy_ratio", W=W, r=r)
    row = ours[0, 0, 0]
    kept = bias[0, 0] >= np.sort(bias[0, 0])[7]
    assert row[0] == MIN and np.all(row[1:][kept[1:]] == MIN) and np.all(row[1:][~kept[1:]] == -np.inf)
    p = np.array(mx.softmax(mx.array(row), axis=-1, precise=True))
    np.testing.assert_allclose(p, np.where(np.isfinite(row), 1.0 / np.isfinite(row).sum(), 0.0), rtol=1e-6)


def test_hard_rule_masks_keys_with_bias_below_one_instead_of_causal_mask():
    T = 10
    rng = np.random.default_rng(8)
    bias = random_bias(rng, 2, 3, T)
    bias[:, 2] = np.exp(-np.abs(rng.normal(size=(2, T))) - 0.1)  # head 2: every m < 1
    valid = causal(T, T)
    ours = run_mask(bias, valid, T, "hard")
    np.testing.assert_array_equal(ours, dynamic_mask_ref(bias, valid, T, "hard", 2048, 0.0))
    assert set(np.unique(ours)) <= {0.0, MIN}  # m itself is never added
    assert np.all(ours[:, 2] == MIN)  # an all-masked head: a finite, uniform row


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="dynamic_mask_rule"):
        run_mask(random_bias(np.random.default_rng(0), 1, 1, 4), None, 1, "nope")


# ----------------------------------------------------------------------------- the module

D, H, P, THETA, EPS = 32, 4, 8, 10000.0, 1e-6


def softplus(z):
    return np.logaddexp(0.0, z)


def rope_ref(x, positions):
    """Rotate-half RoPE over the last axis. x: (b, l, h, P); positions: (b, l)."""
    inv_freq = THETA ** (-np.arange(0, P, 2, dtype=np.float64) / P)
    ang = np.asarray(positions, np.float64)[..., None] * inv_freq
    cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, :, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, :, None, :]
    rotated = np.concatenate([-x[..., P // 2 :], x[..., : P // 2]], -1)
    return x * cos + rotated * sin


def rms_norm_ref(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def make_dma(Hkv=2, mask_heads="kv", qk_norm=False, rule="keep_window", W=2048, r=0.0,
             sliding_window=None, seed=0):
    """A DynamicMaskAttention layer with random weights and A of both signs, plus the same
    numbers (float32 values) and settings for the reference."""
    args = ModelArgs(
        vocab_size=16, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=H, num_key_value_heads=Hkv, layer_types=["attn"], rope_theta=THETA,
        rms_norm_eps=EPS, dynamic_mask_rule=rule, dynamic_mask_heads=mask_heads,
        keep_window_size=W, dynamic_mask_ratio=r, qk_norm=qk_norm, sliding_window=sliding_window,
    )
    layer = DynamicMaskAttention(args)
    Hm = Hkv if mask_heads == "kv" else H
    rng = np.random.default_rng(seed)
    w = {
        "q": rng.normal(0, 0.3, (H * P, D)), "k": rng.normal(0, 0.3, (Hkv * P, D)),
        "v": rng.normal(0, 0.3, (Hkv * P, D)), "dt": rng.normal(0, 0.5, (Hm, Hkv * P)),
        "o": rng.normal(0, 0.2, (D, H * P)),
        # alternate signs: heads with m mostly > 1 and heads with every m < 1
        "A": (rng.uniform(0.3, 1.5, (Hm,)) * np.where(np.arange(Hm) % 2, 1.0, -1.0)),
        "qn": 1 + 0.1 * rng.normal(size=(P,)), "kn": 1 + 0.1 * rng.normal(size=(P,)),
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    layer.q_proj.weight, layer.k_proj.weight = mx.array(w["q"]), mx.array(w["k"])
    layer.v_proj.weight, layer.dt_proj.weight = mx.array(w["v"]), mx.array(w["dt"])
    layer.o_proj.weight, layer.A = mx.array(w["o"]), mx.array(w["A"])
    if qk_norm:
        layer.q_norm.weight, layer.k_norm.weight = mx.array(w["qn"]), mx.array(w["kn"])
    cfg = dict(Hkv=Hkv, Hm=Hm, qk_norm=qk_norm, rule=rule, W=W, r=r, window=sliding_window)
    return layer, w, cfg


def dma_ref(w, cfg, x, kv_head_of=None, valid=None):
    """Eager attention with the additive dynamic mask, float64. x: (b, l, d).
    kv_head_of(h, group) picks the kv head (and mask head) query head h reads; the spec
    says h // group. valid: (b, 1, l, l) bool, default causal (+ sliding window)."""
    kv_head_of = kv_head_of or (lambda h, group: h // group)
    x = np.asarray(x, np.float64)
    b, l, _ = x.shape
    Hkv, Hm = cfg["Hkv"], cfg["Hm"]
    q = (x @ w["q"].T).reshape(b, l, H, P)
    k = (x @ w["k"].T).reshape(b, l, Hkv, P)
    v_flat = x @ w["v"].T  # (b, l, Hkv*P)
    v = v_flat.reshape(b, l, Hkv, P)
    m = np.exp(w["A"] * softplus(v_flat @ w["dt"].T)).transpose(0, 2, 1)  # (b, Hm, l)
    if cfg["qk_norm"]:
        q, k = rms_norm_ref(q, w["qn"]), rms_norm_ref(k, w["kn"])
    pos = np.broadcast_to(np.arange(l), (b, l))
    q, k = rope_ref(q, pos), rope_ref(k, pos)
    if valid is None:
        valid = causal(l, l, cfg["window"])
    mask = dynamic_mask_ref(m, valid, l, cfg["rule"], cfg["W"], cfg["r"])  # (b, Hm, l, l)
    out = np.zeros((b, l, H, P))
    for h in range(H):
        g, hm = kv_head_of(h, H // Hkv), kv_head_of(h, H // Hm)
        s = np.einsum("bip,bjp->bij", q[:, :, h], k[:, :, g]) / math.sqrt(P) + mask[:, hm]
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bij,bjp->bip", p, v[:, :, g])
    return out.reshape(b, l, H * P) @ w["o"].T


MODULE_CASES = {
    "gqa_4_2_keep_window": dict(Hkv=2),
    "mqa_4_1_keep_window": dict(Hkv=1),
    "mha_4_4_keep_window": dict(Hkv=4),
    "qk_norm_doge": dict(Hkv=2, qk_norm=True),
    "keys_exceed_window": dict(Hkv=2, qk_norm=True, W=5),
    "sliding_window": dict(Hkv=2, sliding_window=4),
    "cheems_ratio": dict(Hkv=2, mask_heads="attention", rule="cheems_ratio", r=0.3),
    "legacy_ratio": dict(Hkv=2, mask_heads="attention", rule="legacy_ratio", W=5, r=0.5),
    # r = 1: 8 of 13 keys masked -> early rows whose causal keys are all masked; the ratio
    # crosses k = 0 -> 1 in the decode steps of the cache test
    "legacy_ratio_whole": dict(Hkv=2, mask_heads="attention", rule="legacy_ratio", W=5, r=1.0),
    "legacy_ratio_half": dict(Hkv=2, mask_heads="attention", rule="legacy_ratio", W=7, r=0.5),
    "hard_paper_time": dict(Hkv=4, mask_heads="attention", rule="hard"),
}


@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_matches_eager_attention_with_additive_dynamic_mask(case):
    layer, w, cfg = make_dma(**MODULE_CASES[case])
    x = np.random.default_rng(11).normal(size=(2, 13, D)).astype(np.float32)
    assert_close(np.array(layer(mx.array(x))), dma_ref(w, cfg, x))


def test_query_head_reads_kv_head_h_div_group():
    """H=4, Hkv=2: query heads 0,1 read kv head 0 and 2,3 read kv head 1 (h // 2), for
    K, V and the mask heads alike; the interleaved mapping h % 2 gives another result."""
    layer, w, cfg = make_dma(Hkv=2)
    x = np.random.default_rng(12).normal(size=(2, 9, D)).astype(np.float32)
    ours = np.array(layer(mx.array(x)))
    assert_close(ours, dma_ref(w, cfg, x, kv_head_of=lambda h, group: h // group))
    wrong = dma_ref(w, cfg, x, kv_head_of=lambda h, group: h % (H // group))
    assert np.max(np.abs(ours - wrong)) > 1e-2


def test_dynamic_bias_changes_the_output():
    """Guard against a vacuous reference: with A = 0 (m = 1 for every key, a constant
    shift that softmax ignores) the output differs from the A != 0 output."""
    layer, w, cfg = make_dma(Hkv=2)
    x = np.random.default_rng(13).normal(size=(1, 9, D)).astype(np.float32)
    with_bias = np.array(layer(mx.array(x)))
    layer.A = mx.zeros_like(layer.A)
    without = np.array(layer(mx.array(x)))
    assert_close(without, dma_ref(dict(w, A=np.zeros_like(w["A"])), cfg, x))
    assert np.max(np.abs(with_bias - without)) > 1e-2


@pytest.mark.parametrize(
    "case", ["gqa_4_2_keep_window", "keys_exceed_window", "sliding_window", "qk_norm_doge"]
)
def test_prefill_then_decode_matches_full_forward(case):
    """Causal masking with a cache: prefill, then one token at a time, gives the full
    forward's outputs (the top-W rule then runs over the cached biases)."""
    layer, w, cfg = make_dma(**MODULE_CASES[case])
    l, l0 = 13, 6
    x = np.random.default_rng(14).normal(size=(2, l, D)).astype(np.float32)
    full = np.array(layer(mx.array(x)))
    cache = CacheList(KVCache(), KVCache())
    outs = [np.array(layer(mx.array(x[:, :l0]), cache))]
    for t in range(l0, l):
        outs.append(np.array(layer(mx.array(x[:, t : t + 1]), cache)))
    assert_close(np.concatenate(outs, axis=1), full)
    assert_close(full, dma_ref(w, cfg, x))


@pytest.mark.parametrize("case", ["legacy_ratio_half", "legacy_ratio_whole", "cheems_ratio"])
def test_ratio_rules_decode_each_step_as_a_full_forward_of_that_length(case):
    """The ratio rules choose over all T keys with k from T, so a full forward is not the
    prefill + decode of a shorter prompt; each decode step is the last row of the
    reference at that key length. legacy_ratio_half (W 7, r 0.5) crosses T = W + 1, where
    k = 0 masks nothing, and generates straight across the keep window."""
    layer, w, cfg = make_dma(**MODULE_CASES[case])
    l, l0 = 13, 4
    x = np.random.default_rng(16).normal(size=(2, l, D)).astype(np.float32)
    cache = CacheList(KVCache(), KVCache())
    assert_close(np.array(layer(mx.array(x[:, :l0]), cache)), dma_ref(w, cfg, x[:, :l0]))
    for t in range(l0, l):
        step = np.array(layer(mx.array(x[:, t : t + 1]), cache))
        assert_close(step[:, 0], dma_ref(w, cfg, x[:, : t + 1])[:, -1])


@pytest.mark.parametrize("case", ["gqa_4_2_keep_window", "keys_exceed_window"])
def test_left_padded_rows_match_unpadded_rows(case):
    """With mlx-lm's BatchKVCache(left_padding), pads are never attended to and never
    take a top-W place: each row's real tokens get the outputs of that row alone, in the
    prefill and in the decode steps after it."""
    layer, w, cfg = make_dma(**MODULE_CASES[case])
    l, steps, pads = 10, 3, [0, 2, 7]
    x = np.random.default_rng(15).normal(size=(3, l + steps, D)).astype(np.float32)
    cache = CacheList(BatchKVCache(pads), BatchKVCache(pads))
    outs = [np.array(layer(mx.array(x[:, :l]), cache))]
    for t in range(l, l + steps):
        outs.append(np.array(layer(mx.array(x[:, t : t + 1]), cache)))
    out = np.concatenate(outs, axis=1)
    for row, pad in enumerate(pads):
        alone = dma_ref(w, cfg, x[row : row + 1, pad:])
        assert_close(out[row, pad:], alone[0])


LONG_PROMPT_RULES = {
    "keep_window": dict(Hkv=2, qk_norm=True, W=100),
    "keep_window_sliding": dict(Hkv=2, W=100, sliding_window=150),
    "cheems_ratio": dict(Hkv=2, mask_heads="attention", rule="cheems_ratio", r=0.3),
    "legacy_ratio": dict(Hkv=2, rule="legacy_ratio", W=100, r=0.5),
    "hard": dict(Hkv=4, mask_heads="attention", rule="hard"),
}


@pytest.mark.parametrize("case", LONG_PROMPT_RULES)
def test_prefill_in_query_blocks_equals_the_whole_mask(case, monkeypatch):
    """The ops path builds the mask one block of query rows at a time: exact, because the
    ratio rules select over all T keys whatever the rows and keep_window's top-W is per row.
    A 600-token prompt (blocks of 64, the last one partial), whole and through a cache in two
    steps, against the float64 reference and against one mask of all the rows."""
    from cheems_mlx import dma

    layer, w, cfg = make_dma(**LONG_PROMPT_RULES[case])
    # half-unit activations keep the 600-key scores O(1), so float32 rounding stays within RTOL_F32
    x = (0.5 * np.random.default_rng(5).normal(size=(1, 600, D))).astype(np.float32)

    def run():
        whole = np.array(layer(mx.array(x)))
        cache = CacheList(KVCache(), KVCache())
        first = layer(mx.array(x[:, :350]), cache)
        return whole, np.concatenate([np.array(first), np.array(layer(mx.array(x[:, 350:]), cache))], axis=1)

    monkeypatch.setattr(dma, "QUERY_BLOCK", 64)
    blocked, blocked_cached = run()
    monkeypatch.setattr(dma, "QUERY_BLOCK", 10**6)
    unblocked, unblocked_cached = run()
    ref = dma_ref(w, cfg, x)
    assert_close(blocked, ref)
    if cfg["rule"] == "keep_window":  # the other rules see other keys in a 350-token first step
        assert_close(blocked_cached, ref)
    assert_close(blocked, unblocked, rtol=1e-6)
    assert_close(blocked_cached, unblocked_cached, rtol=1e-6)
