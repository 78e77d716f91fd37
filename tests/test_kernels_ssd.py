"""The SSD Metal kernels (metal_kernels/ssd_step.metal, ssd_scan.metal) against the ops path
of cheems_mlx.ssd, run on the CPU Metal emulator (tests/metal_emulator).

Each kernel gets B and C before RoPE plus the rows' [cos | sin] table and must equal the ops
path that applies ``RotaryEmbedding`` first (``ssd_step`` / ``ssd_chunked_scan`` on rope(B),
rope(C)); the module test runs StateSpaceDuality with its cache (prefill then decode steps,
left padding) through the kernels and through the ops path.

Tolerances, relative to max(1, max|reference|), by activation dtype T:
- float32 ``2e-5``: both paths compute in float32; only the summation order differs (the
  chunked algorithm vs the kernel's smaller chunks and simd reductions): ~1e-6 observed.
- float16 ``2e-3``: the ops path rounds rope(B), rope(C) to float16 (2^-11 relative) before
  the float32 scan, the kernel rotates in float32; y is rounded to float16 by both.
- bfloat16 ``2e-2``: the same with bfloat16's 2^-8 relative rounding.
A wrong decay, a missing term or an off-by-one position gives errors of order 1e-1.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache

from cheems_mlx import kernels
from cheems_mlx.model import ModelArgs
from cheems_mlx.rope import RotaryEmbedding
from cheems_mlx.ssd import (
    StateSpaceDuality,
    rope_cos_sin,
    scan_layout,
    ssd_chunked_scan,
    ssd_chunked_scan_kernel,
    ssd_step,
    ssd_step_kernel,
)

from conftest import KERNEL_DTYPES as DTYPES, KERNEL_TOL as TOL, planted_kernel  # noqa: E402
from metal_emulator import EmulatorError, make_factory

SCHEDULES = ["inorder", "random:7"]


factory = make_factory  # one emulator factory per (schedule, sanitizer), kernels built once each


def assert_close(ours, ref, tol, what=""):
    ours, ref = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, np.float64), \
        np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values (unwritten output?)"
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * {scale:.3g}"


def rotate(rope, v, offset):
    """The ops path's RoPE on v: (b, l, h, n) at positions offset + (0..l-1)."""
    return rope(v.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)


def make_inputs(b, l, h, p, dtype, seed, initial_state=True):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(b, l, h, p)).astype(np.float32)).astype(dtype)
    B = mx.array(rng.normal(0, 0.5, size=(b, l, h, p)).astype(np.float32)).astype(dtype)
    C = mx.array(rng.normal(0, 0.5, size=(b, l, h, p)).astype(np.float32)).astype(dtype)
    dt = mx.array(np.log1p(np.exp(rng.normal(-0.5, 0.7, size=(b, l, h)))).astype(np.float32))
    A = mx.array(-rng.uniform(0.2, 1.5, size=(h,)).astype(np.float32))
    S0 = mx.array(rng.normal(size=(b, h, p, p)).astype(np.float32)) if initial_state else None
    return x, dt, A, B, C, S0


def make_mask(kind, b, l, seed):
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    m = np.ones((b, l), bool)
    for row in range(b):
        cut = int(rng.integers(1, l))
        if kind == "left":
            m[row, : cut if row % 2 else 0] = False
        elif kind == "right":
            m[row, cut:] = False
        else:  # holes
            m[row] = rng.random(l) < 0.7
    return mx.array(m)


# ----------------------------------------------------------------------------- decode step

STEP_CASES = [  # (b, h, p, rope scaling, offsets)
    (1, 1, 8, None, [0]),
    (3, 2, 12, None, [5, 0, 17]),
    (2, 3, 40, None, [3, 9]),  # n > 32: each lane owns two state columns
    (2, 1, 16, {"type": "dynamic", "factor": 2.0}, [30, 7]),  # dynamic NTK base
    (2, 2, 8, "none", [4, 1]),  # no RoPE (ssd_rope False)
]


@pytest.mark.parametrize("schedule,masked", [(SCHEDULES[0], False), (SCHEDULES[1], True)])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_step_kernel_matches_ops_step_on_rotated_b_c(case, dtype, schedule, masked):
    b, h, p, scaling, offsets = STEP_CASES[case]
    x, dt, A, B, C, S0 = make_inputs(b, 1, h, p, DTYPES[dtype], seed=case)
    mask = mx.array([row % 2 == 0 for row in range(b)]) if masked else None
    offset = mx.array(offsets, dtype=mx.int32)
    if scaling == "none":
        Br, Cr, cos_sin = B, C, None
    else:
        rope = RotaryEmbedding(p, 10000.0, scaling, 16)
        Br, Cr = rotate(rope, B, offset), rotate(rope, C, offset)
        cos_sin = rope_cos_sin(rope, b, 1, p, offset)[:, 0]
    y_ref, S_ref = ssd_step(x[:, 0], dt[:, 0], A, Br[:, 0], Cr[:, 0], S0, mask)
    with kernels.backend(factory(schedule)):
        y, S = ssd_step_kernel(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], S0, mask, cos_sin)
    assert y.dtype == DTYPES[dtype] and S.dtype == mx.float32
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(S, S_ref, TOL[dtype], "state")
    if masked:  # a masked row keeps its state exactly
        np.testing.assert_array_equal(np.array(S)[1::2], np.array(S0)[1::2])


def test_step_kernel_from_empty_state():
    x, dt, A, B, C, _ = make_inputs(2, 1, 2, 8, mx.float32, seed=11, initial_state=False)
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    y_ref, S_ref = ssd_step(x[:, 0], dt[:, 0], A, rotate(rope, B, 0)[:, 0], rotate(rope, C, 0)[:, 0], None)
    with kernels.backend(factory()):
        y, S = ssd_step_kernel(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None, None,
                               rope_cos_sin(rope, 2, 1, 8, 0)[:, 0])
    assert_close(y, y_ref, TOL["float32"], "y")
    assert_close(S, S_ref, TOL["float32"], "state")


# ----------------------------------------------------------------------------- chunked scan

SCAN_CASES = [  # (b, l, h, p, kernel chunk Q, initial state, mask kind)
    (2, 13, 3, 8, 4, True, None),  # ragged last chunk, odd head count
    (1, 21, 2, 16, 8, False, "left"),
    (2, 7, 1, 8, 16, True, "right"),  # l < Q
    (1, 70, 1, 8, 64, True, "holes"),  # Q > 32: the cumsum is built in two simd passes
    (1, 9, 1, 40, 4, True, None),  # p = n = 40: two p-blocks of 20 rows, two columns a lane
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", range(len(SCAN_CASES)))
def test_scan_kernel_matches_ops_chunked_scan_on_rotated_b_c(case, dtype, schedule):
    b, l, h, p, q, init, mask_kind = SCAN_CASES[case]
    x, dt, A, B, C, S0 = make_inputs(b, l, h, p, DTYPES[dtype], seed=100 + case, initial_state=init)
    mask = make_mask(mask_kind, b, l, seed=case)
    rope = RotaryEmbedding(p, 10000.0, None, 256)
    offset = mx.array([3 * row for row in range(b)], dtype=mx.int32)
    y_ref, S_ref = ssd_chunked_scan(x, dt, A, rotate(rope, B, offset), rotate(rope, C, offset), 8, S0, mask)
    with kernels.backend(factory(schedule)):
        y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0, mask, rope_cos_sin(rope, b, l, p, offset), q)
    assert y.dtype == DTYPES[dtype] and S.dtype == mx.float32
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(S, S_ref, TOL[dtype], "final state")


def test_scan_kernel_without_rope_and_default_layout():
    x, dt, A, B, C, S0 = make_inputs(2, 11, 2, 8, mx.float32, seed=5)
    assert scan_layout(8, 8) == (8, 8, 64)
    y_ref, S_ref = ssd_chunked_scan(x, dt, A, B, C, 4, S0)
    with kernels.backend(factory("reverse")):
        y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0)
    assert_close(y, y_ref, TOL["float32"], "y")
    assert_close(S, S_ref, TOL["float32"], "final state")


def test_kernels_at_a_real_head_size_with_the_default_layout():
    """p = n = 64: two 32-row blocks of 8 simdgroups, two state columns a lane, Q = 32."""
    b, l, h, p = 1, 45, 2, 64
    x, dt, A, B, C, S0 = make_inputs(b, l, h, p, mx.bfloat16, seed=8)
    rope = RotaryEmbedding(p, 10000.0, None, 256)
    mask = make_mask("holes", b, l, seed=8)
    Br, Cr = rotate(rope, B, 0), rotate(rope, C, 0)
    y_ref, S_ref = ssd_chunked_scan(x, dt, A, Br, Cr, 16, S0, mask)
    y1_ref, S1_ref = ssd_step(x[:, 0], dt[:, 0], A, Br[:, 0], Cr[:, 0], S0)
    assert scan_layout(p, p) == (32, 8, 32)
    with kernels.backend(factory("random:3")):
        y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0, mask, rope_cos_sin(rope, b, l, p, 0))
        y1, S1 = ssd_step_kernel(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], S0, None, rope_cos_sin(rope, b, 1, p, 0)[:, 0])
    assert_close(y, y_ref, TOL["bfloat16"], "y")
    assert_close(S, S_ref, TOL["bfloat16"], "final state")
    assert_close(y1, y1_ref, TOL["bfloat16"], "step y")
    assert_close(S1, S1_ref, TOL["bfloat16"], "step state")


def test_scan_layout_fits_threadgroup_memory_for_real_head_sizes():
    for p in (64, 96, 128, 256):
        pb, nsg, q = scan_layout(p, p)
        assert p % pb == 0 and pb % nsg == 0 and pb <= 32
        assert 4 * (2 * q + 2 * q * (p + 1) + q * (pb + 1) + q * q) <= 28 * 1024
    assert scan_layout(128, 128)[2] == 16


# ----------------------------------------------------------------------------- the module

D, H, CHUNK = 32, 4, 8
P = D // H


def make_layer(seed=0, rope_scaling=None, ssd_rope=True):
    args = ModelArgs(
        vocab_size=16, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=H, layer_types=["ssd"], ssd_chunk_size=CHUNK, rope_theta=10000.0,
        rope_scaling=rope_scaling, max_position_embeddings=8, ssd_rope=ssd_rope,
    )
    layer = StateSpaceDuality(args)
    rng = np.random.default_rng(seed)
    for lin in (layer.c_proj, layer.b_proj, layer.x_proj, layer.out_proj):
        lin.weight = mx.array(rng.normal(0, 0.2, lin.weight.shape).astype(np.float32))
    layer.dt_proj.weight = mx.array(rng.normal(0, 0.3, layer.dt_proj.weight.shape).astype(np.float32))
    layer.A = mx.array(-rng.uniform(0.1, 1.5, (H,)).astype(np.float32))
    return layer.eval()  # nn.Module starts in training mode, which keeps the ops path


def run_module(layer, xs, left_padding=None):
    """Prefill xs[0], then one decode step per following token; outputs and final cache."""
    cache = ArraysCache(2, left_padding=left_padding)
    outs = [layer(xs[:, :PREFILL], cache)]
    for t in range(PREFILL, xs.shape[1]):
        outs.append(layer(xs[:, t : t + 1], cache))
    return mx.concatenate(outs, axis=1), cache


PREFILL = 11


@pytest.mark.parametrize(
    "dtype,left_padding,rope_scaling,ssd_rope",
    [
        ("float32", None, None, True),
        ("float32", [0, 3, 9], None, True),
        ("bfloat16", [2, 0, 0], None, True),
        ("float16", None, {"type": "dynamic", "factor": 2.0}, True),
        ("float32", None, None, False),
    ],
)
def test_module_prefill_and_decode_through_kernels_matches_ops_path(dtype, left_padding, rope_scaling, ssd_rope):
    layer = make_layer(rope_scaling=rope_scaling, ssd_rope=ssd_rope)
    layer.set_dtype(DTYPES[dtype])
    layer.A = layer.A.astype(mx.float32)
    x = mx.array(np.random.default_rng(1).normal(size=(3, PREFILL + 4, D)).astype(np.float32)).astype(DTYPES[dtype])
    ref, ref_cache = run_module(layer, x, left_padding)
    with kernels.backend(factory("random:3")):
        assert kernels.enabled(training=layer.training)
        out, cache = run_module(layer, x, left_padding)
    assert out.dtype == ref.dtype
    assert_close(out, ref, TOL[dtype], "module output")
    assert_close(cache[0], ref_cache[0], TOL[dtype], "cached state")
    np.testing.assert_array_equal(np.array(cache[1]), np.array(ref_cache[1]))


def test_module_takes_ops_path_when_training():
    layer = make_layer()
    layer.train()
    with kernels.backend(factory()):
        assert not kernels.enabled(training=layer.training)


# ----------------------------------------------------------------------------- sanitizers


@pytest.mark.sanitizers
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_ssd_kernels_are_clean_under_sanitizers(sanitizer):
    x, dt, A, B, C, S0 = make_inputs(2, 9, 1, 8, mx.float32, seed=2)
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    cs = rope_cos_sin(rope, 2, 9, 8, 0)
    mask = make_mask("left", 2, 9, seed=1)
    y_ref, S_ref = ssd_chunked_scan(x, dt, A, rotate(rope, B, 0), rotate(rope, C, 0), 4, S0, mask)
    with kernels.backend(factory("random:1", sanitizer)):
        y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0, mask, cs, 4)
        y1, S1 = ssd_step_kernel(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], S0, mask[:, 0], cs[:, 0])
    assert_close(y, y_ref, TOL["float32"], "y")
    assert_close(S, S_ref, TOL["float32"], "state")
    y1_ref, S1_ref = ssd_step(x[:, 0], dt[:, 0], A, rotate(rope, B, 0)[:, 0], rotate(rope, C, 0)[:, 0], S0, mask[:, 0])
    assert_close(y1, y1_ref, TOL["float32"], "step y")
    assert_close(S1, S1_ref, TOL["float32"], "step state")


# ----------------------------------------------------------------------------- planted bug


def test_emulator_catches_a_missing_barrier_in_the_scan_kernel(monkeypatch):
    """Remove the barrier between loading a chunk (B, C, dt*x tiles and the cumsum) and
    computing G from it: some schedule must then give a wrong answer (reads of poisoned or
    stale threadgroup memory) or an emulator error, while the real kernel passes the same runs."""
    header, body = kernels.source("ssd_scan")
    barrier = "    threadgroup_barrier(mem_flags::mem_threadgroup);\n\n    // 2. intra-chunk matrix G"
    assert barrier in body
    planted = body.replace(barrier, "\n    // 2. intra-chunk matrix G", 1)
    x, dt, A, B, C, S0 = make_inputs(1, 10, 1, 8, mx.float32, seed=4)
    y_ref, S_ref = ssd_chunked_scan(x, dt, A, B, C, 4, S0)
    caught = []
    for schedule in ("inorder", "reverse", "random:5"):
        emulator = factory(schedule)
        with kernels.backend(emulator):
            y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0, None, None, 4)  # the real kernel passes
            assert_close(y, y_ref, TOL["float32"])
            planted_kernel(monkeypatch, "ssd_scan", planted, header, emulator)
            try:
                y, S = ssd_chunked_scan_kernel(x, dt, A, B, C, S0, None, None, 4)
                assert_close(y, y_ref, TOL["float32"])
                assert_close(S, S_ref, TOL["float32"])
            except (AssertionError, EmulatorError) as e:
                caught.append((schedule, type(e).__name__))
            monkeypatch.undo()
    assert caught, "the emulator did not notice the missing barrier under any schedule"
