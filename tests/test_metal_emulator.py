"""The Metal kernel emulator (tests/metal_emulator) as a specification: what MLX generates,
what a kernel computes under it (reference values from numpy), and which kernel bugs it
reports. Builds are cached on disk; a warm run takes a few seconds."""

import inspect
import re

import mlx.core as mx
import numpy as np
import pytest

from metal_emulator import EmulatedKernel, EmulatorError, generated_source, make_factory
from metal_emulator.emulator import parse_generated

SCHEDULES = ["inorder", "reverse", "random:7"]
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def as_f32(a):
    return np.array(a.astype(mx.float32))


# ---- MLX's code generation -----------------------------------------------------------------

CODEGEN_SOURCE = """
    threadgroup float tile[64];
    uint i = thread_position_in_grid.x;
    tile[thread_position_in_threadgroup.x] = x[elem_to_loc(i, x_shape, x_strides, x_ndim)];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float v = simd_sum(tile[thread_index_in_simdgroup]) + s + c[simdgroup_index_in_threadgroup];
    out[i] = T(v * N);
    atomic_fetch_add_explicit(&acc[0], 1.0f, memory_order_relaxed);
"""


def test_generated_source_has_the_layout_the_emulator_parses():
    """The signature features the emulator relies on, exactly as mlx 0.32 writes them: a new
    MLX version that changes its codegen fails here first."""
    x = mx.arange(64, dtype=mx.float32).reshape(8, 8).T
    text = generated_source(
        "codegen", ["x", "s", "c"], ["out", "acc"], CODEGEN_SOURCE, "// helpers\n",
        [x, 2.0, mx.array([1, 2, 3], dtype=mx.int32)], [(64,), (1,)], [mx.float16, mx.float32],
        grid=(64, 1, 1), threadgroup=(64, 1, 1),
        template=[("T", mx.float16), ("N", 3), ("B", True)], init_value=0.0,
        ensure_row_contiguous=False, atomic_outputs=True,
    )
    name = "custom_kernel_codegen__float16_t_3_1_float_floats_int32_tc_float16_t_float"
    assert text.startswith("// helpers\ntemplate <typename T, int N, bool B>\n"
                           f"[[kernel]] void {name}(\n")
    for line in [
        "  const device float* x [[buffer(0)]],",          # 64 elements: device
        "  const constant int* x_shape [[buffer(1)]],",     # x_shape / x_strides / x_ndim: used
        "  const constant int64_t* x_strides [[buffer(2)]],",
        "  const constant int& x_ndim [[buffer(3)]],",
        "  const constant float& s [[buffer(4)]],",         # Python scalar: 0-d, by reference
        "  const constant int32_t* c [[buffer(5)]],",       # fewer than 8 elements: constant
        "  device atomic<float16_t>* out [[buffer(6)]],",   # atomic_outputs: every output
        "  device atomic<float>* acc [[buffer(7)]],",
        "  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],",
        "  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]],",
        "  uint3 thread_position_in_grid [[thread_position_in_grid]],",
        "  uint3 thread_position_in_threadgroup [[thread_position_in_threadgroup]]) {",
    ]:
        assert line + "\n" in text
    assert f"\n{CODEGEN_SOURCE}\n}}\n" in text  # the body verbatim, `threadgroup` arrays included
    assert text.endswith(f'\ntemplate [[host_name("{name}")]] [[kernel]] '
                         f"decltype({name}<float16_t, 3, 1>) {name}<float16_t, 3, 1>;\n")
    parsed = parse_generated(text, "codegen", CODEGEN_SOURCE)
    assert parsed.template_params == "typename T, int N, bool B"
    assert parsed.template_args == "float16_t, 3, 1"
    assert [(p.name, p.kind, p.ctype) for p in parsed.params[:8]] == [
        ("x", "pointer", "float"), ("x_shape", "pointer", "int"), ("x_strides", "pointer", "int64_t"),
        ("x_ndim", "reference", "int"), ("s", "reference", "float"), ("c", "pointer", "int32_t"),
        ("out", "pointer", "atomic<float16_t>"), ("acc", "pointer", "atomic<float>"),
    ]
    assert [p.name for p in parsed.params if p.kind == "builtin"] == [
        "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup", "thread_position_in_grid",
        "thread_position_in_threadgroup",
    ]


def test_factory_takes_metal_kernels_parameters():
    theirs = re.findall(r"(\w+):", mx.fast.metal_kernel.__doc__.split("->")[0])
    assert theirs[:4] == ["name", "input_names", "output_names", "source"]
    assert list(inspect.signature(make_factory()).parameters) == theirs


# ---- kernels with known answers ------------------------------------------------------------


def test_elementwise_with_a_partial_last_threadgroup():
    """grid counts threads (dispatchThreads): 100 threads in groups of 32 -> the last group has
    4 threads, and threads_per_threadgroup says so (dispatch_threads_per_threadgroup does not)."""
    kernel = EmulatedKernel("axpb", ["x", "b"], ["y", "sizes"], """
        uint i = thread_position_in_grid.x;
        y[i] = 2.0f * x[i] + b;
        sizes[i] = threads_per_threadgroup.x * 100 + dispatch_threads_per_threadgroup.x;
    """)
    x = mx.random.normal((100,))
    y, sizes = kernel(inputs=[x, 0.5], output_shapes=[(100,), (100,)],
                      output_dtypes=[mx.float32, mx.uint32], grid=(100, 1, 1), threadgroup=(32, 1, 1))
    np.testing.assert_allclose(np.array(y), 2 * np.array(x) + 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.array(sizes), [3232] * 96 + [432] * 4)


def test_3d_grid_thread_and_threadgroup_positions():
    kernel = EmulatedKernel("positions", ["dummy"], ["pos"], """
        uint3 g = thread_position_in_grid, t = threadgroup_position_in_grid;
        uint3 l = thread_position_in_threadgroup;
        uint i = (g.z * threads_per_grid.y + g.y) * threads_per_grid.x + g.x;
        uint3 n = threadgroups_per_grid;
        pos[4 * i + 0] = t.x * 100 + t.y * 10 + t.z;
        pos[4 * i + 1] = l.x * 100 + l.y * 10 + l.z;
        pos[4 * i + 2] = thread_index_in_threadgroup;
        pos[4 * i + 3] = n.x * 100 + n.y * 10 + n.z;
    """)
    grid, tg = (5, 3, 2), (2, 2, 1)
    (pos,) = kernel([mx.zeros((1,))], [(2, 3, 5, 4)], [mx.uint32], grid=grid, threadgroup=tg)
    z, y, x = np.meshgrid(np.arange(2), np.arange(3), np.arange(5), indexing="ij")
    t, l = (x // 2, y // 2, z), (x % 2, y % 2, z * 0)
    actual_x = np.minimum(2, 5 - 2 * t[0])  # the last group along x holds one thread
    ref = np.stack([t[0] * 100 + t[1] * 10 + t[2], l[0] * 100 + l[1] * 10 + l[2],
                    l[0] + actual_x * l[1], np.full_like(x, 322)], axis=-1)
    np.testing.assert_array_equal(np.array(pos), ref)


REDUCE_SOURCE = """
    threadgroup float buf[128];
    uint i = thread_position_in_threadgroup.x;
    buf[i] = x[thread_position_in_grid.x];
    BARRIER
    for (uint s = 64; s > 0; s >>= 1) {
        if (i < s) buf[i] += buf[i + s];
        BARRIER
    }
    if (i == 0) out[threadgroup_position_in_grid.x] = buf[0];
"""


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_threadgroup_tree_reduction_with_barriers(schedule):
    kernel = EmulatedKernel("tree_sum", ["x"], ["out"], REDUCE_SOURCE.replace("BARRIER", BARRIER),
                            schedule=schedule)
    x = mx.random.normal((3 * 128,))
    (out,) = kernel([x], [(3,)], [mx.float32], grid=(3 * 128, 1, 1), threadgroup=(128, 1, 1))
    np.testing.assert_allclose(np.array(out), np.array(x).reshape(3, 128).sum(1), rtol=1e-5, atol=1e-5)


def test_missing_barrier_gives_a_wrong_answer_under_some_schedule():
    x = mx.random.normal((128,))
    ref = float(np.array(x).sum())
    results = []
    for schedule in SCHEDULES:
        kernel = EmulatedKernel("tree_sum_racy", ["x"], ["out"], REDUCE_SOURCE.replace("BARRIER", ""),
                                schedule=schedule)
        (out,) = kernel([x], [(1,)], [mx.float32], grid=(128, 1, 1), threadgroup=(128, 1, 1))
        results.append(float(out[0]))
    assert not all(np.isclose(r, ref, rtol=1e-5) for r in results), results


def test_simd_group_functions():
    kernel = EmulatedKernel("simd_ops", ["x"], ["out"], """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        uint lane = thread_index_in_simdgroup;
        device float* o = out + i * 10;
        o[0] = simd_sum(v);
        o[1] = simd_prefix_inclusive_sum(v);
        o[2] = simd_prefix_exclusive_sum(v);
        o[3] = simd_max(v);
        o[4] = simd_min(v);
        o[5] = simd_shuffle_down(v, 3);    // the last 3 lanes keep their own value
        o[6] = simd_shuffle_up(v, 1);      // lane 0 keeps its own value
        o[7] = simd_shuffle_xor(v, 5);
        o[8] = simd_broadcast(v, 9) + simd_shuffle(v, 31 - lane);
        o[9] = float(popcount(uint(static_cast<simd_vote::vote_t>(simd_ballot(v > 0.0f)))));
    """)
    x = mx.random.normal((64,))
    (out,) = kernel([x], [(64, 10)], [mx.float32], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    v = np.array(x).reshape(2, 32)
    lane = np.arange(32)
    ref = np.stack([
        np.repeat(v.sum(1, keepdims=True), 32, 1), np.cumsum(v, 1), np.cumsum(v, 1) - v,
        np.repeat(v.max(1, keepdims=True), 32, 1), np.repeat(v.min(1, keepdims=True), 32, 1),
        np.where(lane + 3 < 32, v[:, np.minimum(lane + 3, 31)], v), np.where(lane >= 1, v[:, lane - 1], v),
        v[:, lane ^ 5], v[:, 9:10] + v[:, 31 - lane],
        np.repeat((v > 0).sum(1, keepdims=True), 32, 1),
    ], axis=-1).reshape(64, 10)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)


def test_atomic_adds_into_one_output():
    kernel = EmulatedKernel("atomic_sum", ["x"], ["total", "count"], """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&total[0], x[i], memory_order_relaxed);
        atomic_fetch_add_explicit(&count[i % 4], 1, memory_order_relaxed);
    """, atomic_outputs=True)
    x = mx.random.uniform(shape=(1000,))
    total, count = kernel([x], [(1,), (4,)], [mx.float32, mx.int32], grid=(1000, 1, 1),
                          threadgroup=(256, 1, 1), init_value=0)
    np.testing.assert_allclose(float(total[0]), float(np.array(x).sum()), rtol=1e-5)
    np.testing.assert_array_equal(np.array(count), [250] * 4)


@pytest.mark.parametrize("dtype, rtol", [(mx.float16, 2e-3), (mx.bfloat16, 1.6e-2)])
def test_half_and_bfloat_inputs_and_outputs(dtype, rtol):
    """Elementwise in T (computed in T, as Metal does), with the template giving T."""
    kernel = EmulatedKernel("scale_shift", ["x", "w"], ["y"], """
        uint i = thread_position_in_grid.x;
        y[i] = x[i] * w[i % 16] + T(0.25f);
    """)
    x = mx.random.normal((200,)).astype(dtype)
    w = mx.random.normal((16,)).astype(dtype)
    (y,) = kernel([x, w], [(200,)], [dtype], grid=(200, 1, 1), threadgroup=(64, 1, 1),
                  template=[("T", dtype)])
    assert y.dtype == dtype
    np.testing.assert_allclose(as_f32(y), as_f32(x) * np.tile(as_f32(w), 13)[:200] + 0.25,
                               rtol=rtol, atol=rtol)


def test_half_and_bfloat_round_every_operation():
    kernel = EmulatedKernel("rounding", ["h", "b"], ["out"], """
        out[0] = float((h + half(1.0f)) - h);     // 2048 + 1 is 2048 in half
        out[1] = float((b + bfloat(1.0f)) - b);   // 256 + 1 is 256 in bfloat (ties to even)
        out[2] = float(bfloat(257.0f));           // halfway: to even, 256
        out[3] = float(bfloat(259.0f));           // halfway: to even, 260
        out[4] = h * 1.0001f;                     // half * float is float
    """)
    (out,) = kernel([mx.array(2048.0, mx.float16), mx.array(256.0, mx.bfloat16)], [(5,)],
                    [mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    np.testing.assert_array_equal(np.array(out), np.float32([0, 0, 256, 260, np.float32(2048) * np.float32(1.0001)]))


def test_template_int_bool_and_dtype():
    kernel = EmulatedKernel("templated", ["x"], ["y"], """
        uint i = thread_position_in_grid.x;
        y[i] = FLIP ? T(x[i] * K) : T(-x[i]);
    """)
    x = mx.arange(8, dtype=mx.float32)
    (a,) = kernel([x], [(8,)], [mx.int32], grid=(8, 1, 1), threadgroup=(8, 1, 1),
                  template=[("T", mx.int32), ("K", 3), ("FLIP", True)])
    (b,) = kernel([x], [(8,)], [mx.float16], grid=(8, 1, 1), threadgroup=(8, 1, 1),
                  template=[("T", mx.float16), ("K", 3), ("FLIP", False)])
    np.testing.assert_array_equal(np.array(a), np.arange(8) * 3)
    np.testing.assert_array_equal(as_f32(b), -np.arange(8))


def test_vector_types_swizzles_and_as_type():
    kernel = EmulatedKernel("vectors", ["x"], ["y"], """
        uint i = thread_position_in_grid.x;
        float4 v = float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
        float2 s = v.xy * 2.0f + v.zw;                  // swizzles, vector-scalar arithmetic
        float4 w = float4(s, v.wz) - float4(1.0f);      // float4(float2, float2), splat
        w.yx = w.xy;                                    // swizzle assignment
        half4 h = half4(w);                             // conversion between element types
        uint3 u = uint3(i, 2 * i, 3 * i) + 1u;
        y[8 * i + 0] = dot(w, float4(1, 2, 3, 4));
        y[8 * i + 1] = metal::max(w, float4(0.0f)).x + metal::exp(w).y;
        y[8 * i + 2] = float(h.z + h.w);
        y[8 * i + 3] = float(u.x + u.y + u.z);
        y[8 * i + 4] = select(w, float4(-7.0f), w < 0.0f).x;
        y[8 * i + 5] = length(v.xyz);
        y[8 * i + 6] = as_type<float>(as_type<uint>(v.x) ^ 0x80000000u);  // sign flip
        y[8 * i + 7] = float(all(v == v) && !any(isnan(v)));
    """)
    x = mx.random.normal((16,))
    (y,) = kernel([x], [(4, 8)], [mx.float32], grid=(4, 1, 1), threadgroup=(4, 1, 1))
    v = np.array(x).reshape(4, 4)
    s = v[:, :2] * 2 + v[:, 2:]
    w = np.concatenate([s[:, ::-1], v[:, [3, 2]]], axis=1) - 1
    i = np.arange(4)
    ref = np.stack([
        w @ np.float32([1, 2, 3, 4]), np.maximum(w[:, 0], 0) + np.exp(w[:, 1]),
        (w[:, 2].astype(np.float16) + w[:, 3].astype(np.float16)).astype(np.float32), 6 * i + 3,
        np.where(w[:, 0] < 0, -7, w[:, 0]), np.linalg.norm(v[:, :3], axis=1), -v[:, 0], np.ones(4),
    ], axis=1)
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-5, atol=1e-5)


def test_strided_input_without_row_contiguous():
    """ensure_row_contiguous=False: the kernel gets MLX's own layout and must index with
    x_shape / x_strides (here a transposed view)."""
    kernel = EmulatedKernel("gather_strided", ["x"], ["y"], """
        uint i = thread_position_in_grid.x;
        y[i] = x[elem_to_loc(i, x_shape, x_strides, x_ndim)];
    """, ensure_row_contiguous=False)
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4).T
    (y,) = kernel([x], [(12,)], [mx.float32], grid=(12, 1, 1), threadgroup=(12, 1, 1))
    np.testing.assert_array_equal(np.array(y), np.array(x).reshape(-1))


# ---- poison --------------------------------------------------------------------------------


def test_unwritten_outputs_are_poisoned():
    kernel = EmulatedKernel("skip_one", ["x"], ["y", "n"], """
        uint i = thread_position_in_grid.x;
        if (i != 5) { y[i] = x[i]; n[i] = 1; }
    """)
    y, n = kernel([mx.ones((8,))], [(8,), (8,)], [mx.float32, mx.int32], grid=(8, 1, 1),
                  threadgroup=(8, 1, 1))
    assert np.isnan(np.array(y)).tolist() == [i == 5 for i in range(8)]
    assert np.array(n).tolist() == [1] * 5 + [-1] + [1] * 2
    y, n = kernel([mx.ones((8,))], [(8,), (8,)], [mx.float32, mx.int32], grid=(8, 1, 1),
                  threadgroup=(8, 1, 1), init_value=0)
    assert np.array(y)[5] == 0 and np.array(n)[5] == 0


def test_uninitialised_threadgroup_memory_reads_as_poison():
    """Threadgroup arrays (any rank) and variables are shared by the threadgroup and start
    as 0xFF bytes."""
    kernel = EmulatedKernel("tg_uninit", ["x"], ["y", "n"], """
        threadgroup float buf[2][8];
        threadgroup int count;
        uint i = thread_position_in_threadgroup.x;
        if (i < 8) buf[0][i] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        y[i] = buf[i / 8][i % 8];
        n[0] = count;
    """)
    y, n = kernel([mx.ones((16,))], [(16,), (1,)], [mx.float32, mx.int32], grid=(16, 1, 1),
                  threadgroup=(16, 1, 1))
    assert np.isnan(np.array(y)).tolist() == [False] * 8 + [True] * 8
    assert int(n[0]) == -1


# ---- kernel errors -------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ("threadgroup float big[8200]; big[i] = 0;", "uses 32800 bytes of threadgroup memory; Metal allows 32768"),
    ("if (i % 2) { " + BARRIER + " } else { " + BARRIER + " }", "divergent threadgroup_barrier"),
    ("if (i == 3) return; " + BARRIER, "returned while other threads wait at threadgroup_barrier"),
    ("float v = 0; if (i < 40) v = simd_sum(1.0f); else " + BARRIER, "divergent control flow"),
    ("y[i] = simd_shuffle_down(1.0f, 8);", "lane 0 reads lane 8, which is not active"),
    ("y[i] = simd_shuffle_xor(1.0f, 32);", "reads lane 32, which does not exist"),
])
def test_kernel_errors_are_reported_with_the_source_line(body, message):
    source = "uint i = thread_position_in_grid.x;\n" + body + "\ny[i] = 0;\n"
    kernel = EmulatedKernel("bad", ["x"], ["y"], source)
    with pytest.raises(EmulatorError, match=message) as err:
        kernel([mx.zeros((1,))], [(72,)], [mx.float32], grid=(72, 1, 1), threadgroup=(72, 1, 1))
    assert "bad.metal:2:" in str(err.value) or "threadgroup memory" in message


def test_compile_errors_name_the_kernel_line():
    kernel = EmulatedKernel("typo", ["x"], ["y"], "uint i = thread_position_in_grid.x;\ny[i] = x[i] +;\n")
    with pytest.raises(EmulatorError, match=r"typo\.metal:2"):
        kernel([mx.zeros((4,))], [(4,)], [mx.float32], grid=(4, 1, 1), threadgroup=(4, 1, 1))


# ---- sanitizers ----------------------------------------------------------------------------

SANITIZED_SOURCE = """
    threadgroup float buf[64];
    uint i = thread_position_in_threadgroup.x;
    buf[i] = x[thread_position_in_grid.x + OFFSET];
    BARRIER
    float v = buf[63 - i] + simd_sum(buf[i]);
    y[thread_position_in_grid.x] = v;
"""


def sanitized(sanitizer, offset=0, barrier=BARRIER):
    kernel = EmulatedKernel("sanitized", ["x"], ["y"], SANITIZED_SOURCE.replace("BARRIER", barrier),
                            sanitizer=sanitizer)
    x = mx.random.normal((128,))
    (y,) = kernel([x], [(128,)], [mx.float32], grid=(128, 1, 1), threadgroup=(64, 1, 1),
                  template=[("OFFSET", offset)])
    v = np.array(x).reshape(2, 64)
    np.testing.assert_allclose(np.array(y).reshape(2, 64), v[:, ::-1] + v.reshape(2, 2, 32).sum(-1).repeat(32, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.sanitizers
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_correct_kernel_is_clean_under_sanitizers(sanitizer):
    sanitized(sanitizer)


@pytest.mark.sanitizers
def test_address_sanitizer_reports_out_of_bounds_read():
    with pytest.raises(EmulatorError, match=r"heap-buffer-overflow(.|\n)*sanitized\.metal:4"):
        sanitized("address", offset=1)


@pytest.mark.sanitizers
def test_thread_sanitizer_reports_missing_barrier_race():
    with pytest.raises(EmulatorError, match=r"data race(.|\n)*sanitized\.metal:[46]"):
        sanitized("thread", barrier="")
