"""The CDMoE Metal kernels (metal_kernels/cdmoe_route.metal, cdmoe_mix.metal,
cdmoe_mix_q.metal) against the ops path of cheems_mlx.cdmoe, run on the CPU Metal emulator
(tests/metal_emulator).

Routing is compared as SETS of (expert, weight) per (token, head): the ops path's
argpartition leaves the order (and, for equal scores at the top-k boundary, the choice)
unspecified. Where the reference scores have no tie at the top-k boundary (random float32
inputs) the expert sets must be equal; in every case the selected candidate scores must be
the same multiset and the weights (a function of those scores) must agree.

Tolerances, relative to max(1, max|reference|), by activation dtype T:
- float32 ``2e-5``: float32 on both sides, only the summation order differs (~1e-6 seen);
  routing weights ``1e-6`` absolute (the same float32 sums, exp and division).
- float16 ``2e-3`` / bfloat16 ``2e-2``: the ops path rounds the gathered rows' dot, silu,
  the weight and (quantized tables) the dequantized rows to T, the kernels accumulate all
  of it in float32 and round once; the differences are a few units of T's 2^-11 / 2^-8.
A wrong expert or weight moves the output by 1e-2 or more of its scale.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from cheems_mlx import kernels
from cheems_mlx.cdmoe import CDMoE, candidate_pairs, expert_mix_kernel, product_key_route_kernel
from cheems_mlx.model import ModelArgs

from conftest import KERNEL_DTYPES as DTYPES, KERNEL_TOL as TOL, planted_kernel  # noqa: E402
from metal_emulator import EmulatorError, make_factory

SCHEDULES = ["inorder", "random:11"]


factory = make_factory  # one emulator factory per (schedule, sanitizer), kernels built once each


def f64(a):
    return np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, np.float64)


def assert_close(ours, ref, tol, what=""):
    ours, ref = f64(ours), f64(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values (unwritten output?)"
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * {scale:.3g}"


def make_cdmoe(d=16, E=64, top_k=4, He=3, dr=8, router="queries", routing="per_token", norm=False, seed=0):
    args = ModelArgs(
        vocab_size=16, hidden_size=d, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, layer_types=["attn"], is_moe=True, moe_router=router,
        moe_routing=routing, num_experts=E, num_experts_per_tok=top_k, num_expert_heads=He,
        expert_retrieval_size=dr, norm_topk_prob=norm,
    )
    layer = CDMoE(args)
    rng = np.random.default_rng(seed)
    params = {
        "gate_proj": {"weight": rng.normal(0, 0.3, layer.gate_proj.weight.shape)},
        "up_proj": {"weight": rng.normal(0, 0.3, layer.up_proj.weight.shape)},
        "down_proj": {"weight": rng.normal(0, 0.2, layer.down_proj.weight.shape)},
        "down_embed": {"weight": rng.normal(0, 0.4, (E, d))},
        "up_embed": {"weight": rng.normal(0, 0.4, (E, d))},
    }
    if router == "queries":
        params["queries"] = {"weight": rng.normal(0, 0.5, layer.queries.weight.shape)}
        params["keys"] = rng.normal(0, 0.5, layer["keys"].shape)
    else:
        params["router_gate"] = {"weight": rng.normal(0, 0.5, layer.router_gate.weight.shape)}

    def to_mx(tree):
        return {k: to_mx(v) if isinstance(v, dict) else mx.array(v.astype(np.float32)) for k, v in tree.items()}

    layer.update(to_mx(params))
    layer.eval()
    return layer


# ----------------------------------------------------------------------------- routing


def ops_route(sx, sy, K, k, norm):
    """The module's own ops-path ``route`` on given sub-key scores."""
    layer = make_cdmoe(E=K * K, top_k=k, norm=norm)
    layer.sub_key_scores = lambda x: (sx, sy)
    return layer.route(None)


def assert_same_routing(w, idx, w_ref, idx_ref, sx, sy, k, what=""):
    """Per row: the same multiset of candidate scores, distinct experts, the same weights
    (matched through the scores), and the same expert set wherever the full K*K candidate
    list has no tie at the top-k boundary."""
    K = sx.shape[-1]
    sxf = np.array(sx.astype(mx.float32)).reshape(-1, K)
    syf = np.array(sy.astype(mx.float32)).reshape(-1, K)
    everything = (sxf[:, :, None] + syf[:, None, :]).reshape(-1, K * K)  # float32 sums, as both paths
    idx, idx_ref = np.array(idx).reshape(-1, k).astype(np.int64), np.array(idx_ref).reshape(-1, k).astype(np.int64)
    w, w_ref = np.array(w).reshape(-1, k), np.array(w_ref).reshape(-1, k)
    for row in range(idx.shape[0]):
        assert len(set(idx[row])) == k, f"{what} row {row}: repeated experts {idx[row]}"
        s, s_ref = everything[row, idx[row]], everything[row, idx_ref[row]]
        np.testing.assert_array_equal(np.sort(s), np.sort(s_ref), err_msg=f"{what} row {row}: scores")
        np.testing.assert_allclose(w[row][np.argsort(s)], w_ref[row][np.argsort(s_ref)], rtol=0, atol=1e-6,
                                   err_msg=f"{what} row {row}: weights")
        ordered = np.sort(everything[row])[::-1]
        if k == K * K or ordered[k - 1] > ordered[k]:
            assert set(idx[row]) == set(idx_ref[row]), f"{what} row {row}: expert sets differ"


ROUTE_CASES = [  # (K, k, norm_topk_prob, (b, l, He))
    (8, 4, False, (2, 3, 2)),
    (13, 6, True, (1, 5, 1)),  # K not a multiple of anything
    (40, 8, False, (1, 2, 3)),  # K > 32: two sub-keys per lane
    (3, 5, True, (2, 2, 1)),  # k > K: kk = K
    (8, 33, False, (1, 3, 1)),  # k > 32: two winners per lane
    (64, 1, False, (3, 1, 2)),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", range(len(ROUTE_CASES)))
def test_route_kernel_matches_ops_route_as_sets(case, dtype, schedule):
    K, k, norm, lead = ROUTE_CASES[case]
    rng = np.random.default_rng(case)
    sx = mx.array(rng.normal(size=lead + (K,)).astype(np.float32)).astype(DTYPES[dtype])
    sy = mx.array(rng.normal(size=lead + (K,)).astype(np.float32)).astype(DTYPES[dtype])
    w_ref, idx_ref = ops_route(sx, sy, K, k, norm)
    with kernels.backend(factory(schedule)):
        w, idx = product_key_route_kernel(sx, sy, K, k, norm)
    assert w.shape == idx.shape == lead + (k,) and w.dtype == mx.float32 and idx.dtype == mx.uint32
    assert_same_routing(w, idx, w_ref, idx_ref, sx, sy, k, f"{dtype}/{schedule}")
    # the kernel returns the winners in descending score order
    assert np.all(np.diff(np.array(w).reshape(-1, k), axis=-1) <= 0)


def test_candidate_pairs_hold_the_top_k_of_every_sorted_grid():
    for kk, k in [(8, 4), (8, 8), (3, 5), (8, 33), (5, 25), (16, 16)]:
        pairs = candidate_pairs(kk, k)
        assert len(pairs) >= k and len(set(pairs)) == len(pairs)
        # worst case: both lists sorted; any cell outside has >= k cells at least as large
        for i in range(kk):
            for j in range(kk):
                if i * kk + j not in pairs:
                    assert (i + 1) * (j + 1) - 1 >= k


# ----------------------------------------------------------------------------- mixing

MIX_CASES = [  # (d, E, top_k, He, (b, l))
    (48, 64, 4, 3, (2, 3)),  # d not a multiple of 32
    (300, 64, 2, 2, (1, 2)),  # d > threads: two column passes, 8 simdgroups
    (16, 16, 1, 1, (2, 2)),  # one expert a token
]


def routed(layer, x):
    """weights, indices from the ops route and the ops expert term."""
    weights, indices = layer.route(x)
    return weights, indices, layer.experts(x, weights, indices)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", range(len(MIX_CASES)))
def test_mix_kernel_matches_ops_expert_term(case, dtype, schedule):
    d, E, k, He, (b, l) = MIX_CASES[case]
    layer = make_cdmoe(d=d, E=E, top_k=k, He=He, seed=case)
    layer.set_dtype(DTYPES[dtype])
    x = mx.array(np.random.default_rng(case).normal(size=(b, l, d)).astype(np.float32)).astype(DTYPES[dtype])
    weights, indices, ref = routed(layer, x)
    with kernels.backend(factory(schedule)):
        out = expert_mix_kernel(x, weights, indices, layer.down_embed, layer.up_embed)
    assert out.dtype == x.dtype
    assert_close(out, ref, TOL[dtype], "experts")


QUANT_CASES = (  # (bits, group_size, dtype, schedule)
    [(bits, gs, "float32", SCHEDULES[i % 2]) for i, (bits, gs) in
     enumerate([(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128), (2, 64), (3, 64), (5, 32), (6, 64)])]
    + [(4, 64, "bfloat16", "inorder"), (8, 128, "float16", "random:11"), (4, 32, "float16", "inorder"),
       (8, 64, "bfloat16", "random:11")]
)


@pytest.mark.parametrize("bits,group_size,dtype,schedule", QUANT_CASES)
def test_quantized_mix_kernel_matches_ops_on_quantized_tables(bits, group_size, dtype, schedule):
    d = 128
    layer = make_cdmoe(d=d, E=64, top_k=4, He=2, seed=bits)
    layer.set_dtype(DTYPES[dtype])
    for name in ("down_embed", "up_embed"):
        layer[name] = nn.QuantizedEmbedding.from_embedding(layer[name], group_size=group_size, bits=bits)
    x = mx.array(np.random.default_rng(bits).normal(size=(2, 3, d)).astype(np.float32)).astype(DTYPES[dtype])
    weights, indices, ref = routed(layer, x)
    with kernels.backend(factory(schedule)):
        out = expert_mix_kernel(x, weights, indices, layer.down_embed, layer.up_embed)
    assert out is not None and out.dtype == x.dtype
    assert_close(out, ref, TOL[dtype], f"{bits}-bit, group {group_size}")


def test_mix_kernel_declines_tables_it_cannot_read():
    layer = make_cdmoe(d=64)
    layer.down_embed = nn.QuantizedEmbedding.from_embedding(layer.down_embed, group_size=32, bits=4)
    x = mx.zeros((1, 1, 64))
    w, idx = layer.route(x)
    with kernels.backend(factory()):
        assert expert_mix_kernel(x, w, idx, layer.down_embed, layer.up_embed) is None  # mixed tables
        layer.up_embed = nn.QuantizedEmbedding.from_embedding(layer.up_embed, group_size=64, bits=4)
        assert expert_mix_kernel(x, w, idx, layer.down_embed, layer.up_embed) is None  # group sizes differ


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize(
    "router,routing,norm,dtype,quant",
    [
        ("queries", "per_token", False, "float32", None),
        ("queries", "per_token", True, "float16", None),
        ("router_gate", "per_token", True, "float32", None),
        ("router_gate", "transformers_reshape", False, "float32", None),
        ("queries", "per_token", False, "float32", (4, 32)),
        ("router_gate", "per_token", False, "bfloat16", (8, 64)),
    ],
)
def test_module_through_kernels_matches_ops_path(router, routing, norm, dtype, quant):
    layer = make_cdmoe(d=64, E=64, top_k=4, He=3, dr=8, router=router, routing=routing, norm=norm, seed=5)
    layer.set_dtype(DTYPES[dtype])
    if quant:
        for name in ("down_embed", "up_embed"):
            layer[name] = nn.QuantizedEmbedding.from_embedding(layer[name], group_size=quant[1], bits=quant[0])
    x = mx.array(np.random.default_rng(3).normal(size=(2, 3, 64)).astype(np.float32)).astype(DTYPES[dtype])
    ref = layer(x)
    with kernels.backend(factory("random:2")):
        assert kernels.enabled(training=layer.training)
        out = layer(x)
        w, idx = layer.route(x)
    w_ref, idx_ref = layer.route(x)
    sx, sy = layer.sub_key_scores(x)
    assert_same_routing(w, idx, w_ref, idx_ref, sx, sy, layer.top_k, "module routing")
    assert out.dtype == ref.dtype
    assert_close(out, ref, TOL[dtype], "module output")


def test_module_at_real_retrieval_sizes():
    """E = 16384 experts (K = 128 sub-keys: four a lane), k = 16, He = 4 retrieval heads,
    float and 4-bit tables."""
    layer = make_cdmoe(d=64, E=128 * 128, top_k=16, He=4, dr=64, seed=1)
    x = mx.array(np.random.default_rng(0).normal(size=(1, 3, 64)).astype(np.float32))
    ref = layer(x)
    w_ref, idx_ref = layer.route(x)
    sx, sy = layer.sub_key_scores(x)
    with kernels.backend(factory("random:1")):
        out = layer(x)
        w, idx = layer.route(x)
    assert_same_routing(w, idx, w_ref, idx_ref, sx, sy, 16, "K = 128")
    assert_close(out, ref, TOL["float32"], "module output")
    for name in ("down_embed", "up_embed"):
        layer[name] = nn.QuantizedEmbedding.from_embedding(layer[name], group_size=64, bits=4)
    ref = layer(x)
    with kernels.backend(factory("inorder")):
        out = layer(x)
    assert_close(out, ref, TOL["float32"], "module output, 4-bit tables")


# ----------------------------------------------------------------------------- sanitizers


@pytest.mark.sanitizers
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_cdmoe_kernels_are_clean_under_sanitizers(sanitizer):
    layer = make_cdmoe(d=40, E=64, top_k=4, He=2, seed=1)
    x = mx.array(np.random.default_rng(0).normal(size=(1, 3, 40)).astype(np.float32))
    weights, indices, ref = routed(layer, x)
    sx, sy = layer.sub_key_scores(x)
    q = make_cdmoe(d=64, E=64, top_k=4, He=2, seed=2)
    for name in ("down_embed", "up_embed"):
        q[name] = nn.QuantizedEmbedding.from_embedding(q[name], group_size=32, bits=3)
    xq = mx.array(np.random.default_rng(1).normal(size=(1, 2, 64)).astype(np.float32))
    wq, iq, refq = routed(q, xq)
    with kernels.backend(factory("random:4", sanitizer)):
        w, idx = product_key_route_kernel(sx, sy, layer.num_keys, layer.top_k, False)
        out = expert_mix_kernel(x, weights, indices, layer.down_embed, layer.up_embed)
        outq = expert_mix_kernel(xq, wq, iq, q.down_embed, q.up_embed)
    assert_same_routing(w, idx, weights, indices, sx, sy, layer.top_k, sanitizer)
    assert_close(out, ref, TOL["float32"], "experts")
    assert_close(outq, refq, TOL["float32"], "quantized experts")


# ----------------------------------------------------------------------------- planted bug


def test_emulator_catches_a_missing_barrier_in_the_mix_kernel(monkeypatch):
    """Remove the barrier between writing the expert coefficients (threadgroup memory) and
    reading them in the weighted sum: some schedule must then give a wrong answer or an
    emulator error, while the real kernel passes the same runs."""
    header, body = kernels.source("cdmoe_mix")
    barrier = "  threadgroup_barrier(mem_flags::mem_threadgroup);\n\n  // 2. weighted sum"
    assert barrier in body
    planted = body.replace(barrier, "\n  // 2. weighted sum", 1)
    layer = make_cdmoe(d=48, E=64, top_k=4, He=3, seed=9)
    x = mx.array(np.random.default_rng(9).normal(size=(1, 2, 48)).astype(np.float32))
    weights, indices, ref = routed(layer, x)
    caught = []
    for schedule in ("inorder", "reverse", "random:5"):
        emulator = factory(schedule)
        with kernels.backend(emulator):
            out = expert_mix_kernel(x, weights, indices, layer.down_embed, layer.up_embed)  # real: passes
            assert_close(out, ref, TOL["float32"])
            planted_kernel(monkeypatch, "cdmoe_mix", planted, header, emulator)
            try:
                out = expert_mix_kernel(x, weights, indices, layer.down_embed, layer.up_embed)
                assert_close(out, ref, TOL["float32"])
            except (AssertionError, EmulatorError) as e:
                caught.append((schedule, type(e).__name__))
            monkeypatch.undo()
    assert caught, "the emulator did not notice the missing barrier under any schedule"
