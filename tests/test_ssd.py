"""Specification of cheems_mlx.ssd: state space duality with RoPE on B and C
(docs/architecture.md section 2).

Every reference value comes from numpy written here from the math, in float64:

    S_t = exp(dt_t * A) * S_{t-1} + (dt_t * X_t) (outer) B_t        S: (b, h, p, n)
    y_t = S_t @ C_t

Tolerances: the code under test runs in float32 while the references run in float64.
The inputs are O(1), A < 0 and dt = softplus(O(1)), so states stay O(1-10); float32
rounding then leaves errors around 1e-6 relative. Each comparison allows
``RTOL_F32 = 2e-5`` of the reference's largest magnitude (about 10x the observed error):
small enough that a wrong decay, a missing term or an off-by-one position is caught
(those give errors of order 1e-1 and more).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache

from cheems_mlx.model import ModelArgs
from cheems_mlx.ssd import StateSpaceDuality, segsum, ssd_chunked_scan, ssd_states, ssd_step

RTOL_F32 = 2e-5


def assert_close(ours, ref, rtol=RTOL_F32):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    assert err <= rtol * scale, f"max|diff| {err:.3g} > {rtol:g} * {scale:.3g}"


# ----------------------------------------------------------------------------- references


def recurrence_ref(x, dt, A, B, C, initial_state=None, mask=None):
    """Token-by-token SSD recurrence in float64. x: (b,l,h,p), dt: (b,l,h), A: (h,),
    B, C: (b,l,h,n), initial_state: (b,h,p,n), mask: (b,l) bool (a masked position
    neither decays nor writes the state). Returns y (b,l,h,p) and the final state."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = np.zeros((b, h, p, n)) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros((b, l, h, p))
    for t in range(l):
        decay = np.exp(dt[:, t] * A)  # (b, h)
        write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b,h,p,n)
        if mask is not None:
            on = mask[:, t]
            decay = np.where(on[:, None], decay, 1.0)
            write = np.where(on[:, None, None, None], write, 0.0)
        S = decay[..., None, None] * S + write
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, C[:, t])
    return y, S


def segsum_ref(x):
    """out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i, -inf for j > i (float64)."""
    x = np.asarray(x, np.float64)
    T = x.shape[-1]
    out = np.full(x.shape + (T,), -np.inf)
    for i in range(T):
        for j in range(i + 1):
            out[..., i, j] = x[..., j + 1 : i + 1].sum(-1)
    return out


def rope_ref(x, positions, theta, layout="rotate_half"):
    """RoPE over the last axis. x: (b, l, h, P); positions: (b, l). ``rotate_half`` pairs
    dims (i, i + P/2) (the layout the doc requires); ``interleaved`` pairs (2i, 2i + 1)
    and exists only to show the tests can tell the two apart."""
    P = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, P, 2, dtype=np.float64) / P)  # (P/2,)
    ang = np.asarray(positions, np.float64)[..., None] * inv_freq  # (b, l, P/2)
    if layout == "interleaved":
        c, s = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out
    cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, :, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, :, None, :]
    half = P // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def softplus(z):
    return np.logaddexp(0.0, z)


def scan_inputs(rng, b, l, h=3, p=4, n=4):
    x = rng.normal(size=(b, l, h, p)).astype(np.float32)
    dt = softplus(rng.normal(size=(b, l, h))).astype(np.float32)
    A = -rng.uniform(0.1, 1.5, size=(h,)).astype(np.float32)
    B = rng.normal(size=(b, l, h, n)).astype(np.float32)
    C = rng.normal(size=(b, l, h, n)).astype(np.float32)
    return x, dt, A, B, C


def run_chunked(x, dt, A, B, C, chunk, initial_state=None, mask=None):
    y, S = ssd_chunked_scan(
        mx.array(x), mx.array(dt), mx.array(A), mx.array(B), mx.array(C), chunk,
        None if initial_state is None else mx.array(initial_state),
        None if mask is None else mx.array(mask),
    )
    assert y.dtype == mx.float32 and S.dtype == mx.float32
    return np.array(y), np.array(S)


# ----------------------------------------------------------------------------- segsum


@pytest.mark.parametrize("T", [1, 5, 8])
def test_segsum_matches_definition(T):
    rng = np.random.default_rng(T)
    x = rng.normal(size=(2, 3, T)).astype(np.float32)
    ours, ref = np.array(segsum(mx.array(x))), segsum_ref(x)
    # the -inf pattern (strictly above the diagonal) must match exactly
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    # float32 sums of <= 8 O(1) numbers: errors ~1e-6
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=0, atol=1e-5)
    # the diagonal is an empty sum
    np.testing.assert_array_equal(np.diagonal(ours, axis1=-2, axis2=-1), 0.0)


def test_segsum_is_accurate_near_the_diagonal_for_long_chunks():
    """A 256-token chunk of large decays (sum ~ -1.3e4): segments of a few tokens must
    still be exact to float32 precision of the segment itself, not of the whole cumsum
    (a difference of two large cumsums would be off by ~1e-3 there)."""
    T = 256
    rng = np.random.default_rng(0)
    x = -rng.uniform(40.0, 60.0, size=(T,)).astype(np.float32)
    ours, ref = np.array(segsum(mx.array(x))), segsum_ref(x)
    i, j = np.tril_indices(T)
    near = (i - j) <= 4  # segments of at most 4 tokens, |value| <= ~240
    # float32 relative precision of a sum of <= 4 numbers: ~3e-7 * 240 ~ 1e-4 absolute
    np.testing.assert_allclose(ours[i[near], j[near]], ref[i[near], j[near]], rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- chunked scan


@pytest.mark.parametrize("chunk", [4, 8, 16])
@pytest.mark.parametrize("length_of", ["1", "Q-1", "Q", "Q+1", "3Q+5"])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_scan_matches_recurrence(chunk, length_of, with_initial_state):
    l = {"1": 1, "Q-1": chunk - 1, "Q": chunk, "Q+1": chunk + 1, "3Q+5": 3 * chunk + 5}[length_of]
    rng = np.random.default_rng(chunk * 100 + l)
    x, dt, A, B, C = scan_inputs(rng, 2, l)
    S0 = rng.normal(size=(2, 3, 4, 4)).astype(np.float32) if with_initial_state else None
    y, S = run_chunked(x, dt, A, B, C, chunk, S0)
    y_ref, S_ref = recurrence_ref(x, dt, A, B, C, S0)
    assert_close(y, y_ref)
    assert_close(S, S_ref)


def test_chunked_scan_result_does_not_depend_on_chunk_size():
    rng = np.random.default_rng(1)
    x, dt, A, B, C = scan_inputs(rng, 2, 37)
    y_ref, S_ref = recurrence_ref(x, dt, A, B, C)
    for chunk in (1, 3, 37, 64):
        y, S = run_chunked(x, dt, A, B, C, chunk)
        assert_close(y, y_ref)
        assert_close(S, S_ref)


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_scan_masked_positions_neither_decay_nor_write(chunk, with_initial_state):
    l = 3 * 4 + 5
    rng = np.random.default_rng(7)
    x, dt, A, B, C = scan_inputs(rng, 3, l)
    mask = np.ones((3, l), bool)
    mask[0, :5] = False  # left padding
    mask[1, 6:10] = False  # a hole across a chunk boundary
    mask[1, -3:] = False  # right padding
    mask[2, :] = False  # a row with no token at all: the state must come out untouched
    S0 = rng.normal(size=(3, 3, 4, 4)).astype(np.float32) if with_initial_state else None
    y, S = run_chunked(x, dt, A, B, C, chunk, S0, mask)
    y_ref, S_ref = recurrence_ref(x, dt, A, B, C, S0, mask)
    # outputs at masked positions are unspecified; the state after them is not
    assert_close(y[mask], y_ref[mask])
    assert_close(S, S_ref)
    np.testing.assert_allclose(S[2], 0.0 if S0 is None else S0[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_per_position_states_match_the_recurrence(with_initial_state):
    """ssd_states (what a rollback cache keeps): the state after every position of a short
    call, masked positions included, equals the float64 recurrence stopped there."""
    l = 9
    rng = np.random.default_rng(11)
    x, dt, A, B, C = scan_inputs(rng, 2, l)
    mask = np.ones((2, l), bool)
    mask[1, 6:] = False  # right padding
    S0 = rng.normal(size=(2, 3, 4, 4)).astype(np.float32) if with_initial_state else None
    y, states = ssd_states(*(mx.array(a) for a in (x, dt, A, B, C)),
                           None if S0 is None else mx.array(S0), mx.array(mask))
    assert states.shape == (2, l, 3, 4, 4) and states.dtype == mx.float32
    y_ref, _ = recurrence_ref(x, dt, A, B, C, S0, mask)
    assert_close(np.array(y)[mask], y_ref[mask])
    for t in range(l):
        _, S_ref = recurrence_ref(x[:, : t + 1], dt[:, : t + 1], A, B[:, : t + 1], C[:, : t + 1], S0, mask[:, : t + 1])
        assert_close(np.array(states[:, t]), S_ref)


def test_chunked_scan_masked_inputs_have_no_influence():
    rng = np.random.default_rng(8)
    x, dt, A, B, C = scan_inputs(rng, 2, 11)
    mask = np.ones((2, 11), bool)
    mask[:, 3:6] = False
    y1, S1 = run_chunked(x, dt, A, B, C, 4, None, mask)
    garbage = [a.copy() for a in (x, dt, B)]
    for a in garbage:
        a[:, 3:6] = 100.0 * rng.normal(size=a[:, 3:6].shape)
    y2, S2 = run_chunked(garbage[0], np.abs(garbage[1]), A, garbage[2], C, 4, None, mask)
    assert_close(y2[mask], y1[mask])
    assert_close(S2, S1)


# ----------------------------------------------------------------------------- one-step recurrence


@pytest.mark.parametrize("with_mask", [False, True])
def test_step_matches_recurrence(with_mask):
    l = 9
    rng = np.random.default_rng(3)
    x, dt, A, B, C = scan_inputs(rng, 2, l)
    S0 = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    mask = None
    if with_mask:
        mask = np.ones((2, l), bool)
        mask[0, [1, 4, 5]] = False
    y_ref, S_ref = recurrence_ref(x, dt, A, B, C, S0, mask)
    state = mx.array(S0)
    for t in range(l):
        y, state = ssd_step(
            mx.array(x[:, t]), mx.array(dt[:, t]), mx.array(A), mx.array(B[:, t]),
            mx.array(C[:, t]), state, None if mask is None else mx.array(mask[:, t]),
        )
        on = np.ones(2, bool) if mask is None else mask[:, t]
        assert_close(np.array(y)[on], y_ref[:, t][on])
    assert state.dtype == mx.float32
    assert_close(np.array(state), S_ref)


def test_step_from_empty_state_matches_recurrence():
    rng = np.random.default_rng(4)
    x, dt, A, B, C = scan_inputs(rng, 2, 1)
    y, S = ssd_step(
        mx.array(x[:, 0]), mx.array(dt[:, 0]), mx.array(A), mx.array(B[:, 0]), mx.array(C[:, 0]), None
    )
    y_ref, S_ref = recurrence_ref(x, dt, A, B, C)
    assert_close(np.array(y), y_ref[:, 0])
    assert_close(np.array(S), S_ref)


# ----------------------------------------------------------------------------- the module

D, H, CHUNK, THETA = 32, 4, 8, 10000.0
P = D // H


def make_ssd(seed=0):
    """A StateSpaceDuality layer with random projections and a random A < 0, plus the same
    numbers as numpy float64 arrays for the reference."""
    args = ModelArgs(
        vocab_size=16, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=H, layer_types=["ssd"], ssd_chunk_size=CHUNK, rope_theta=THETA,
    )
    layer = StateSpaceDuality(args)
    rng = np.random.default_rng(seed)
    w = {
        "c": rng.normal(0, 0.2, (H * P, D)), "b": rng.normal(0, 0.2, (H * P, D)),
        "x": rng.normal(0, 0.2, (H * P, D)), "dt": rng.normal(0, 0.3, (H, D)),
        "out": rng.normal(0, 0.2, (D, H * P)), "A": -rng.uniform(0.1, 1.5, (H,)),
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    layer.c_proj.weight, layer.b_proj.weight = mx.array(w["c"]), mx.array(w["b"])
    layer.x_proj.weight, layer.dt_proj.weight = mx.array(w["x"]), mx.array(w["dt"])
    layer.out_proj.weight, layer.A = mx.array(w["out"]), mx.array(w["A"])
    return layer, w


def ssd_module_ref(w, x, positions=None, mask=None, initial_state=None, layout="rotate_half"):
    """Projection + RoPE on B and C + recurrence + out_proj, in float64. x: (b, l, d)."""
    x = np.asarray(x, np.float64)
    b, l, _ = x.shape
    if mask is not None:
        x = x * mask[..., None]
    if positions is None:
        positions = np.broadcast_to(np.arange(l), (b, l))
    C = rope_ref((x @ w["c"].T).reshape(b, l, H, P), positions, THETA, layout)
    B = rope_ref((x @ w["b"].T).reshape(b, l, H, P), positions, THETA, layout)
    X = (x @ w["x"].T).reshape(b, l, H, P)
    dt = softplus(x @ w["dt"].T)
    y, S = recurrence_ref(X, dt, w["A"], B, C, initial_state, mask)
    return y.reshape(b, l, H * P) @ w["out"].T, S


@pytest.mark.parametrize("l", [5, CHUNK, 2 * CHUNK + 3])
def test_module_matches_projection_rope_recurrence(l):
    layer, w = make_ssd()
    x = np.random.default_rng(l).normal(size=(2, l, D)).astype(np.float32)
    ref, _ = ssd_module_ref(w, x)
    assert_close(np.array(layer(mx.array(x))), ref)


def test_module_rope_layout_is_rotate_half_not_interleaved_or_absent():
    """The module matches the rotate-half reference (test above) and is far from the
    interleaved layout and from no RoPE at all, so that test does discriminate."""
    layer, w = make_ssd()
    x = np.random.default_rng(0).normal(size=(1, 12, D)).astype(np.float32)
    ours = np.array(layer(mx.array(x)))
    interleaved, _ = ssd_module_ref(w, x, layout="interleaved")
    no_rope, _ = ssd_module_ref(w, x, positions=np.zeros((1, 12)))
    for wrong in (interleaved, no_rope):
        assert np.max(np.abs(ours - wrong)) > 100 * RTOL_F32 * max(1.0, np.max(np.abs(wrong)))


def test_module_prefill_then_decode_matches_full_forward():
    layer, w = make_ssd()
    l, l0 = 2 * CHUNK + 3, CHUNK + 2
    x = np.random.default_rng(5).normal(size=(2, l, D)).astype(np.float32)
    ref, S_ref = ssd_module_ref(w, x)
    cache = ArraysCache(2)
    outs = [np.array(layer(mx.array(x[:, :l0]), cache))]
    for t in range(l0, l):
        outs.append(np.array(layer(mx.array(x[:, t : t + 1]), cache)))
    assert_close(np.concatenate(outs, axis=1), ref)
    assert_close(np.array(cache[0]), S_ref)  # the cache holds the state S_L
    np.testing.assert_array_equal(np.array(cache[1]), [l, l])  # and each row's RoPE position


def test_module_output_depends_only_on_relative_positions():
    """C_t . R(t - s) B_s: starting every position at 7 instead of 0 (through the cache
    offset, with an empty state) leaves the output unchanged, while the state, which
    holds absolutely rotated B, does change."""
    layer, w = make_ssd()
    x = np.random.default_rng(6).normal(size=(2, 13, D)).astype(np.float32)
    plain = ArraysCache(2)
    out0 = np.array(layer(mx.array(x), plain))
    shifted = ArraysCache(2)
    shifted[1] = mx.array([7, 7], dtype=mx.int32)
    out7 = np.array(layer(mx.array(x), shifted))
    assert_close(out7, out0)
    ref7, S7 = ssd_module_ref(w, x, positions=7 + np.broadcast_to(np.arange(13), (2, 13)))
    assert_close(out7, ref7)
    assert_close(np.array(shifted[0]), S7)
    assert np.max(np.abs(np.array(shifted[0]) - np.array(plain[0]))) > 1e-2


def test_module_left_padded_rows_match_unpadded_rows():
    """A left-padded batch (mlx-lm's ArraysCache(left_padding=...)) gives each row's real
    tokens the outputs of that row run alone, in the prefill and in the decode step after
    it; the pads take no RoPE positions (as in mlx-lm's BatchKVCache), so the cached state and
    offset are the row's alone too."""
    layer, w = make_ssd()
    l = CHUNK + 4
    pads = [0, 3, CHUNK + 1]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, l + 1, D)).astype(np.float32)
    cache = ArraysCache(2, left_padding=pads)
    out = np.array(layer(mx.array(x[:, :l]), cache))
    step = np.array(layer(mx.array(x[:, l:]), cache))
    for row, pad in enumerate(pads):
        alone, _ = ssd_module_ref(w, x[row : row + 1, pad:])
        assert_close(out[row, pad:], alone[0, :-1])
        assert_close(step[row], alone[0, -1:])
        _, S_alone = ssd_module_ref(w, x[row : row + 1, pad:])
        assert_close(np.array(cache[0])[row], S_alone[0])
    assert np.array(cache[1]).tolist() == [l + 1 - pad for pad in pads]
