"""The dynamic mask attention Metal kernels (metal_kernels/dma_decode.metal with
dma_decode_combine.metal, and dma_prefill.metal) against the ops path of cheems_mlx.dma,
run on the CPU Metal emulator (tests/metal_emulator).

The kernel tests call ``kernel_attention`` (selection in MLX, then the kernels) with the
cache's strided K / V / bias views and mlx-lm's own masks (``create_causal_mask`` with
offsets, sliding windows and left padding), and compare with the ops path:
``dynamic_mask`` + clip + repeat to H + the cast to the activation dtype T +
``scaled_dot_product_attention``, evaluated in float32 on the same T values (the kernels
accumulate in float32). A masked key's additive value is ``mask_min(T)``; the ops path in T
arithmetic absorbs q.k into it, so a row with no kept key is uniform; in float32 arithmetic
-3e4 (float16's value) would not absorb q.k, so the float32 reference uses float32's
minimum for masked keys, which the ops path in T gives anyway (checked against the true
same-dtype ops path in ``test_rows_with_no_kept_key_are_uniform_as_in_ops_path``).

Tolerances, relative to max(1, max|reference|), by activation dtype T:
- float32 ``2e-5``: both sides compute in float32; only the summation order differs
  (online softmax over tiles / blocks vs one softmax): ~2e-7 observed.
- float16 ``2e-3``: the kernel's output is rounded to float16 (2^-11 relative) and its
  float32 intermediates differ from the reference's in order only: ~3e-4 observed.
- bfloat16 ``2e-2``: the same with bfloat16's 2^-8 relative output rounding: ~3e-3 observed.
The module tests compare the kernel path with the ops path in the module's dtype, where the
ops path itself rounds the scores to T before the softmax (CPU SDPA), hence looser bounds
there: float16 ``5e-3``, bfloat16 ``3e-2`` (~9e-4 and ~5e-3 observed), float32 ``2e-5``.
A wrongly kept key or a wrong head mapping moves outputs by 1e-1 and more.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, CacheList, KVCache, QuantizedKVCache

from cheems_mlx import kernels
from cheems_mlx.dma import _normalize_valid, dynamic_mask, kernel_attention, key_selection, mask_min

from conftest import KERNEL_DTYPES as DTYPES, KERNEL_TOL as TOL  # noqa: E402
from metal_emulator import EmulatorError, make_factory

MODULE_TOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}
F32_MIN = float(np.finfo(np.float32).min)

factory = make_factory  # one emulator factory per (schedule, sanitizer), kernels built once each


def assert_close(ours, ref, tol, what=""):
    ours = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, np.float64)
    ref = np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values (unwritten output?)"
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * {scale:.3g}"


# ----------------------------------------------------------------------------- inputs


def make_inputs(B, H, Hkv, Hm, L, T, P, dtype, seed, ties=False, capacity=8):
    """q (B, H, L, P) as the module's transposed view; k, v (B, Hkv, T, P) and bias
    (B, Hm, T) as strided slices of a larger cache buffer, like KVCache.update_and_fetch."""
    rng = np.random.default_rng(seed)
    q = mx.array(rng.normal(size=(B, L, H, P)).astype(np.float32)).astype(dtype).transpose(0, 2, 1, 3)
    kbuf = mx.array(rng.normal(size=(B, Hkv, T + capacity, P)).astype(np.float32)).astype(dtype)
    vbuf = mx.array(rng.normal(size=(B, Hkv, T + capacity, P)).astype(np.float32)).astype(dtype)
    m = np.exp(rng.normal(0.0, 0.8, size=(B, Hm, T + capacity, 1)))
    if ties:  # equal tokens give equal m: ties straddling the W-th place
        m = np.round(m * 2) / 2
    bbuf = mx.array(m.astype(np.float32))
    return q, kbuf[:, :, :T], vbuf[:, :, :T], bbuf[:, :, :T, 0]


def ops_reference(q, k, v, bias, valid, rule, W, r):
    """The ops path of DynamicMaskAttention on these inputs, in float32: (B, L, H, P)."""
    dt = q.dtype
    B, H, L, P = q.shape
    min_value = mask_min(dt)
    mask = dynamic_mask(bias, _normalize_valid(valid), L, rule, W, r, min_value)
    mask = mx.clip(mask, min_value, -min_value)
    mask = mx.repeat(mask, H // mask.shape[1], axis=1).astype(dt).astype(mx.float32)
    mask = mx.where(mask <= min_value, F32_MIN, mask)  # masked: absorbs q.k, as in T arithmetic
    f = lambda x: x.astype(mx.float32)  # noqa: E731
    out = mx.fast.scaled_dot_product_attention(f(q), f(k), f(v), scale=q.shape[-1] ** -0.5, mask=mask)
    return out.transpose(0, 2, 1, 3)


def run_kernels(fac, q, k, v, bias, valid, rule, W=2048, r=0.0, window=None, **launch):
    with kernels.backend(fac):
        out = kernel_attention(
            q, k, v, bias, valid, rule, W, r, window, q.shape[-1] ** -0.5, mask_min(q.dtype), **launch
        )
        assert out is not None, "the kernel path declined these inputs"
        mx.eval(out)
    return out


def padded_valid(L, T, pads=None, window=None):
    """mlx-lm's mask for L new queries after T - L cached keys: (L, T), or (B, 1, L, T)
    with left padding."""
    return create_causal_mask(L, T - L, window_size=window, left_padding=None if pads is None else mx.array(pads))


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("seed", range(4))
def test_key_selection_keeps_exactly_the_keys_dynamic_mask_keeps(seed):
    """The kernels' form of the rules (m > thr or m == thr and j < jlim) selects the same
    keys as ``dynamic_mask`` for every rule but ``hard``: ties, padding, windows, T <= W and
    T > W, one query row and many."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        B, Hm = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        T = int(rng.integers(1, 40))
        L = int(rng.integers(1, T + 1))
        rule = str(rng.choice(["keep_window", "cheems_ratio", "legacy_ratio"]))
        W = int(rng.integers(1, 20))
        r = float(rng.choice([0.0, 0.3, 0.5, 0.9]))
        if rule == "legacy_ratio" and T > W and int((T - W) * r) < 1:
            r = 0.9
            if int((T - W) * r) < 1:
                continue
        bias = np.round(np.exp(rng.normal(size=(B, Hm, T))) * 2) / 2  # many ties
        window = int(rng.integers(1, 10)) if rng.random() < 0.3 else None
        pads = [int(p) for p in rng.integers(0, T, size=B)] if rng.random() < 0.5 else None
        valid = _normalize_valid(padded_valid(L, T, pads, window))
        bm = mx.array(bias.astype(np.float32))
        ref = np.array(dynamic_mask(bm, valid, L, rule, W, r, F32_MIN)) > F32_MIN
        thr, jlim, _ = key_selection(bm, valid, rule, W, r, window)
        thr, jlim = np.array(thr)[..., None], np.array(jlim)[..., None]
        m = bias[:, :, None, :]
        kept = np.array(valid) & ((m > thr) | ((m == thr) & (np.arange(T) < jlim)))
        np.testing.assert_array_equal(np.broadcast_to(kept, ref.shape), ref)


# ----------------------------------------------------------------------------- decode

# name: (B, H, Hkv, Hm, T, P, rule, W, r, window, pads, ties)
DECODE_CASES = {
    # GQA 2, batch 3 with left padding, T = 37 not a multiple of the block (16)
    "gqa2_left_padding": (3, 4, 2, 2, 37, 8, "keep_window", 2048, 0.0, None, [0, 3, 9], False),
    # MQA (GQA 4): top-W of the cached biases with ties at the W-th place
    "gqa4_top_w_ties": (2, 4, 1, 1, 37, 8, "keep_window", 7, 0.0, None, None, True),
    # MHA (GQA 1) with 3 heads, sliding window 9 > W = 4: top-W inside the window; head dim
    # 40 (2 per lane, the second partly idle)
    "gqa1_window_top_w_p40": (2, 3, 3, 3, 29, 40, "keep_window", 4, 0.0, 9, None, False),
    # one mask head per query head, Cheems ratio rule, padding; T = 48, a multiple of 16
    "cheems_ratio_mask_per_head": (2, 4, 2, 4, 48, 8, "cheems_ratio", 2048, 0.6, None, [0, 5], False),
    # legacy ratio rule (T > W), T shorter than one block
    "legacy_ratio_short": (2, 4, 2, 4, 13, 8, "legacy_ratio", 6, 0.5, None, None, False),
}


@pytest.mark.parametrize("schedule", ["inorder", "random:7"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel_matches_ops_path(case, dtype, schedule):
    B, H, Hkv, Hm, T, P, rule, W, r, window, pads, ties = DECODE_CASES[case]
    q, k, v, bias = make_inputs(B, H, Hkv, Hm, 1, T, P, DTYPES[dtype], seed=len(case), ties=ties)
    valid = padded_valid(1, T, pads, window)
    if pads is None and window is None:
        valid = None  # what KVCache.make_mask gives a single query
    out = run_kernels(factory(schedule), q, k, v, bias, valid, rule, W, r, window, block=16, simdgroups=2)
    assert out.dtype == DTYPES[dtype]
    assert_close(out, ops_reference(q, k, v, bias, valid, rule, W, r), TOL[dtype], case)


def test_decode_kernel_never_loads_unkept_keys():
    """Keys the mask drops are skipped without loading K / V: NaN there leaves the output
    finite and equal to the ops path on clean values."""
    B, H, Hkv, T, P = 2, 4, 2, 40, 8
    q, k, v, bias = make_inputs(B, H, Hkv, Hkv, 1, T, P, mx.float32, seed=3)
    pads = [0, 11]
    valid = padded_valid(1, T, pads, window=25)  # keys < 15 outside the window, < 11 padding
    ref = ops_reference(q, k, v, bias, valid, "keep_window", 2048, 0.0)
    poison = (mx.arange(T) < 15)[None, None, :, None]
    out = run_kernels(factory(), q, mx.where(poison, mx.nan, k), mx.where(poison, mx.nan, v), bias, valid,
                      "keep_window", window=25, block=16, simdgroups=2)
    assert_close(out, ref, TOL["float32"])


# ----------------------------------------------------------------------------- prefill

# name: (B, H, Hkv, Hm, L, T, P, rule, W, r, window, pads, ties, rows)
PREFILL_CASES = {
    # causal GQA 2, 13 queries: query tiles of 4 (ragged last), one partial key tile
    "causal_gqa2": (2, 4, 2, 2, 13, 13, 8, "keep_window", 2048, 0.0, None, None, False, 8),
    # chunked prefill after 32 cached keys, GQA 4 with left padding; row 2's padding covers
    # its first queries entirely: rows with no valid key, uniform over all keys
    "chunk_after_cache_gqa4_padding": (3, 4, 1, 1, 9, 41, 8, "keep_window", 2048, 0.0, None, [0, 5, 35], False, 8),
    # MHA with 3 heads, per-row top-W (T > W) with ties, 2 queries per threadgroup
    "gqa1_top_w_per_row_ties": (1, 3, 3, 3, 37, 37, 8, "keep_window", 6, 0.0, None, None, True, 2),
    # sliding window 6: most key tiles skipped; head dim 40
    "sliding_window_p40": (2, 2, 1, 1, 40, 40, 40, "keep_window", 2048, 0.0, 6, None, False, 8),
    # Cheems ratio, one mask head per query head: early rows whose few causal keys are all
    # below the k-th smallest m keep no key (uniform rows)
    "cheems_ratio_mask_per_head": (2, 4, 2, 4, 21, 21, 8, "cheems_ratio", 2048, 0.5, None, None, False, 8),
    # legacy ratio rule while T <= W (every causal key kept)
    "legacy_ratio_within_window": (2, 4, 2, 4, 21, 21, 8, "legacy_ratio", 24, 0.5, None, None, False, 4),
}


def test_legacy_ratio_prefill_beyond_the_window_takes_the_ops_path():
    """legacy_ratio with T > W adds the causal and dynamic masks (min + min = -inf), so a row
    whose causal keys are all dynamically masked is uniform over the keys masked once, not
    over all keys as the kernels make it: the kernel path declines and the ops path runs."""
    q, k, v, bias = make_inputs(2, 4, 2, 4, 21, 21, 8, mx.float32, seed=3)
    with kernels.backend(factory()):
        out = kernel_attention(q, k, v, bias, padded_valid(21, 21), "legacy_ratio", 8, 0.5, None,
                               8**-0.5, mask_min(mx.float32))
    assert out is None


@pytest.mark.parametrize("schedule", ["inorder", "random:7"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_kernel_matches_ops_path(case, dtype, schedule):
    B, H, Hkv, Hm, L, T, P, rule, W, r, window, pads, ties, rows = PREFILL_CASES[case]
    q, k, v, bias = make_inputs(B, H, Hkv, Hm, L, T, P, DTYPES[dtype], seed=len(case), ties=ties)
    valid = padded_valid(L, T, pads, window)
    out = run_kernels(factory(schedule), q, k, v, bias, valid, rule, W, r, window, rows=rows)
    assert out.dtype == DTYPES[dtype]
    assert_close(out, ops_reference(q, k, v, bias, valid, rule, W, r), TOL[dtype], case)


def test_prefill_kernel_skips_whole_tiles_the_mask_empties():
    """Tile skipping: K / V tiles no query of a threadgroup keeps are never loaded. Keys 32-63
    (one whole tile) have the smallest m, so the Cheems ratio rule drops them for every query
    (keys 0-31 have the largest m, so no row is left without a key); keys 64-95 are in the
    future of queries 0-63. NaN K / V from key 32 on leave the outputs of queries 0-63
    finite and equal to the ops path on clean values."""
    B, H, Hkv, L, P = 1, 2, 1, 96, 8
    q, k, v, bias = make_inputs(B, H, Hkv, Hkv, L, L, P, mx.float32, seed=5)
    j = mx.arange(L)
    tiny = 0.01 + 1e-4 * j.astype(mx.float32)
    bias = mx.where(j < 32, bias + 10.0, mx.where(j < 64, tiny, bias + 1.0))
    valid = padded_valid(L, L)
    ref = ops_reference(q, k, v, bias, valid, "cheems_ratio", 2048, 0.4)  # k = 38: keys 32-63 < tau
    poison = (j >= 32)[None, None, :, None]
    out = run_kernels(factory(), q, mx.where(poison, mx.nan, k), mx.where(poison, mx.nan, v), bias, valid,
                      "cheems_ratio", r=0.4, rows=8)
    assert_close(out[:, :64], ref[:, :64], TOL["float32"])


# ----------------------------------------------------------------------------- edge rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_no_kept_key_are_uniform_as_in_ops_path(dtype):
    """A row whose every key is masked gets min_value on every key in the ops path: a
    uniform average of V over ALL keys (future and padded ones included), in each dtype.
    Decode: batch row 1 is padding up to its last key, whose m is below the ratio rule's
    threshold. Prefill: left padding covering the first queries."""
    dt = DTYPES[dtype]
    B, H, Hkv, T, P = 2, 2, 1, 20, 8
    q, k, v, bias = make_inputs(B, H, Hkv, Hkv, 1, T, P, dt, seed=9)
    bias = mx.concatenate([bias[:1], mx.concatenate([bias[1:, :, :-1] + 5.0, bias[1:, :, -1:] * 0 + 0.01], -1)])
    valid = padded_valid(1, T, pads=[0, T - 1])
    layer_ops = mx.fast.scaled_dot_product_attention  # the true ops path, in dtype
    min_value = mask_min(dt)
    mask = mx.clip(dynamic_mask(bias, _normalize_valid(valid), 1, "cheems_ratio", 2048, 0.5, min_value),
                   min_value, -min_value)
    ops = layer_ops(q, k, v, scale=P**-0.5, mask=mx.repeat(mask, H, axis=1).astype(dt)).transpose(0, 2, 1, 3)
    out = run_kernels(factory(), q, k, v, bias, valid, "cheems_ratio", r=0.5, block=16, simdgroups=2)
    uniform = v.astype(mx.float32).mean(axis=2)[1]  # (Hkv, P)
    assert_close(out[1, 0], mx.repeat(uniform, H // Hkv, axis=0), TOL[dtype], "uniform row")
    assert_close(out[1], ops[1], TOL[dtype], "decode vs ops path in dtype")

    L = 6
    q, k, v, bias = make_inputs(B, H, Hkv, Hkv, L, T, P, dt, seed=10)
    valid = padded_valid(L, T, pads=[0, T - 3])  # batch row 1: its first 3 queries are padding
    mask = mx.clip(dynamic_mask(bias, _normalize_valid(valid), L, "keep_window", 2048, 0.0, min_value),
                   min_value, -min_value)
    ops = layer_ops(q, k, v, scale=P**-0.5, mask=mx.repeat(mask, H, axis=1).astype(dt)).transpose(0, 2, 1, 3)
    out = run_kernels(factory(), q, k, v, bias, valid, "keep_window", rows=4)
    assert_close(out[1, :3], mx.broadcast_to(mx.repeat(v.astype(mx.float32).mean(axis=2)[1], H, axis=0), (3, H, P)),
                 TOL[dtype], "uniform rows")
    assert_close(out[1, :3], ops[1, :3], TOL[dtype], "prefill vs ops path in dtype")


# ----------------------------------------------------------------------------- the module


def module_layer(dtype, **kw):
    from test_dma import make_dma

    layer, _, _ = make_dma(**kw)
    layer.eval()
    if dtype != mx.float32:
        layer.set_dtype(dtype)
    return layer


_counters = []  # keeps counting factories alive: kernels.kernel caches builds by id(factory)


def counting(fac):
    """fac, counting the launches of each kernel it builds, outside the kernels' first-use
    self-checks: (factory, counts by name)."""
    counts = {}

    def build(**kwargs):
        kernel = fac(**kwargs)

        def launch(**call):
            if not kernels.in_self_check():
                counts[kwargs["name"]] = counts.get(kwargs["name"], 0) + 1
            return kernel(**call)

        return launch

    _counters.append(build)
    return build, counts


def run_module(layer, x, cache_factory, l0, fac=None):
    """Prefill x[:, :l0], then one token at a time; the kernel path when fac is given."""
    cache = cache_factory()
    outs = []

    def step(chunk):
        outs.append(layer(chunk, cache))
        mx.eval(outs[-1])

    if fac is None:
        step(x[:, :l0])
        for t in range(l0, x.shape[1]):
            step(x[:, t : t + 1])
    else:
        with kernels.backend(fac):
            step(x[:, :l0])
            for t in range(l0, x.shape[1]):
                step(x[:, t : t + 1])
    return mx.concatenate(outs, axis=1)


MODULE_CASES = {
    # (make_dma settings, cache, dtype)
    "gqa2_top_w": (dict(Hkv=2, qk_norm=True, W=5), "kv", "float32"),
    "mqa_left_padding": (dict(Hkv=1, W=6), "batch", "float32"),
    "cheems_ratio_mask_per_head": (dict(Hkv=2, mask_heads="attention", rule="cheems_ratio", r=0.3), "kv", "float32"),
    # prefill within the window (beyond it the prefill takes the ops path), decode across it
    "legacy_ratio": (dict(Hkv=2, mask_heads="attention", rule="legacy_ratio", W=9, r=1.0), "kv", "float32"),
    "sliding_window": (dict(Hkv=2, sliding_window=4), "kv", "float32"),
    "float16_left_padding": (dict(Hkv=2, W=5), "batch", "float16"),
    "bfloat16_left_padding": (dict(Hkv=2, W=5), "batch", "bfloat16"),
}


@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_with_cache_kernel_path_matches_ops_path(case):
    """DynamicMaskAttention with its cache (CacheList(K/V, bias)): a prefill of 9 tokens,
    then 4 decode steps, through the kernels (emulated) equals the ops path; every step
    took the kernel path."""
    settings, cache_kind, dtype = MODULE_CASES[case]
    dt = DTYPES[dtype]
    layer = module_layer(dt, **settings)
    pads = [0, 2, 7]
    x = mx.array(np.random.default_rng(21).normal(size=(3, 13, 32)).astype(np.float32)).astype(dt)
    if cache_kind == "kv":
        make_cache = lambda: CacheList(KVCache(), KVCache())  # noqa: E731
    else:
        make_cache = lambda: CacheList(BatchKVCache(pads), BatchKVCache(pads))  # noqa: E731
    ops = run_module(layer, x, make_cache, 9)
    fac, launches = counting(factory("random:3"))
    ker = run_module(layer, x, make_cache, 9, fac)
    assert launches == {"dma_prefill": 1, "dma_decode": 4, "dma_decode_combine": 4}  # no silent ops path
    assert ker.dtype == dt
    if cache_kind == "batch":  # rows' padded positions are not outputs anyone reads
        for row, pad in enumerate(pads):
            assert_close(ker[row, pad:], ops[row, pad:], MODULE_TOL[dtype], f"{case} row {row}")
    else:
        assert_close(ker, ops, MODULE_TOL[dtype], case)


def _refusing_factory(**kwargs):
    raise AssertionError(f"kernel {kwargs.get('name')} built where the ops path was expected")


def quantizable_layer():
    """A layer with head dim 32, which a QuantizedKVCache (group size 32) can hold."""
    from cheems_mlx.dma import DynamicMaskAttention
    from cheems_mlx.model import ModelArgs

    args = ModelArgs(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, layer_types=["attn"])
    mx.random.seed(23)
    layer = DynamicMaskAttention(args)
    layer.A = mx.random.uniform(-1, 1, layer.A.shape)
    return layer


@pytest.mark.parametrize("case", ["hard_rule", "quantized_cache", "training"])
def test_module_keeps_the_ops_path_where_kernels_do_not_apply(case):
    """The hard rule, a quantized K/V cache and training stay on the ops path (a kernel
    build there fails this test)."""
    if case == "quantized_cache":
        layer = quantizable_layer()
        make_cache = lambda: CacheList(QuantizedKVCache(group_size=32, bits=8), KVCache())  # noqa: E731
    else:
        kw = dict(Hkv=4, mask_heads="attention", rule="hard") if case == "hard_rule" else dict(Hkv=2)
        layer = module_layer(mx.float32, **kw)
        make_cache = lambda: None  # noqa: E731
    if case == "training":
        layer.train()
    x = mx.array(np.random.default_rng(22).normal(size=(2, 5, 32)).astype(np.float32))
    ref = layer(x, make_cache())
    with kernels.backend(_refusing_factory):
        out = layer(x, make_cache())
    assert_close(out, ref, TOL["float32"])


# ----------------------------------------------------------------------------- the emulator's checks


def _launch_one_of_each(fac, dtype=mx.float32):
    """A small decode and a small prefill launch (both kernels of each)."""
    q, k, v, bias = make_inputs(2, 4, 2, 2, 1, 21, 8, dtype, seed=31)
    dec = run_kernels(fac, q, k, v, bias, padded_valid(1, 21, [0, 4]), "keep_window", W=9, block=16, simdgroups=2)
    ref_dec = ops_reference(q, k, v, bias, padded_valid(1, 21, [0, 4]), "keep_window", 9, 0.0)
    q, k, v, bias = make_inputs(1, 4, 2, 2, 11, 11, 8, dtype, seed=32)
    pre = run_kernels(fac, q, k, v, bias, padded_valid(11, 11), "keep_window", W=5, rows=4)
    ref_pre = ops_reference(q, k, v, bias, padded_valid(11, 11), "keep_window", 5, 0.0)
    return (dec, ref_dec), (pre, ref_pre)


@pytest.mark.sanitizers
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_kernels_are_clean_under_sanitizers(sanitizer):
    """No out-of-bounds access (ASan on exact-size buffers) and no data race (TSan with the
    barriers as synchronisation) in any of the three kernels."""
    for out, ref in _launch_one_of_each(factory("random:11", sanitizer)):
        assert_close(out, ref, TOL["float32"])


PLANTED_BUGS = {
    # decode: simdgroups merge each other's softmax states before they are written
    # (caught by the schedules: poisoned or stale threadgroup memory gives a wrong answer)
    "decode_merge_barrier": (
        "dma_decode",
        "threadgroup_barrier(mem_flags::mem_threadgroup);\nfor (int idx = tid;",
        "for (int idx = tid;",
        None,
    ),
    # prefill: rows read the V tile before the other threads have stored it
    "prefill_v_tile_barrier": (
        "dma_prefill",
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int ii = 0; ii < PL; ++ii) {",
        "for (int ii = 0; ii < PL; ++ii) {",
        None,
    ),
    # prefill: V overwrites the shared tile while other rows may still read K. The emulator
    # runs a thread uninterrupted up to its next barrier or SIMD-group function, and every
    # row finishes its q.k before the first simd_max, so no schedule shows it: ThreadSanitizer
    # reports the race.
    "prefill_k_tile_barrier": (
        "dma_prefill",
        "threadgroup_barrier(mem_flags::mem_threadgroup);  // every row is done reading the K tile",
        "// (barrier removed)",
        "thread",
    ),
}


@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_emulator_catches_a_planted_missing_barrier(bug, monkeypatch):
    """The issue's planted-bug demo: the same kernel with one barrier removed is caught, as a
    wrong answer under some schedule or an emulator / sanitizer error."""
    name, old, new, sanitizer = PLANTED_BUGS[bug]
    real_source = kernels.source

    def planted(kernel_name):
        header, body = real_source(kernel_name)
        if kernel_name == name:
            assert body.count(old) == 1, "the planted bug no longer matches the kernel source"
            body = body.replace(old, new)
        return header, body

    monkeypatch.setattr(kernels, "source", planted)
    monkeypatch.setattr(kernels, "_built", {})
    caught = []
    schedules = ["inorder", "reverse", "random:5"] if sanitizer is None else ["random:5"]
    for schedule in schedules:
        fac = make_factory(schedule=schedule, sanitizer=sanitizer)
        try:
            (dec, ref_dec), (pre, ref_pre) = _launch_one_of_each(fac)
        except EmulatorError as e:
            caught.append(f"{schedule}: {e}")
            continue
        out, ref = (dec, ref_dec) if name == "dma_decode" else (pre, ref_pre)
        err = np.nan_to_num(np.abs(np.array(out) - np.array(ref)), nan=np.inf).max()
        if err > 1e-3:
            caught.append(f"{schedule}: max|diff| {err:.3g}")
    assert caught, f"the emulator did not catch the missing barrier ({bug})"
    if sanitizer == "thread":
        assert "ThreadSanitizer" in caught[0] or "race" in caught[0].lower(), caught[0][:2000]
