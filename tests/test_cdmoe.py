"""Specification of cheems_mlx.cdmoe: the dense gated MLP and cross domain mixture of
experts with product-key retrieval (docs/architecture.md section 4).

    s_x, s_y   = sub-key scores (K = floor(sqrt(E)) each, per retrieval head)
    candidates = s_x[i] + s_y[j] at expert index i*K + j; top-k of all K^2
    w          = softmax(top-k scores)   (optionally renormalised: norm_topk_prob)
    out        = shared_mlp(x) + sum_{h,k} silu(x . down_embed[idx]) * w * up_embed[idx]

References: numpy float64 written here (brute force over all K^2 candidates, so the
product-key shortcut is checked, not assumed), torch's own ``view`` for the transformers
routing quirk, and transformers' ``DogeCDMoE`` itself.

Tolerances: float32 code vs float64 reference with O(1) activations leaves ~1e-6
relative; ``RTOL_F32 = 2e-5`` of the largest reference magnitude keeps a 10x margin,
while a wrongly chosen expert or weight moves the output by 1e-2 or more. Expert choice
is compared exactly (index sets); the random scores have gaps far above float32 rounding.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from cheems_mlx.cdmoe import MLP, CDMoE, product_key_topk
from cheems_mlx.model import ModelArgs

from conftest import RTOL_F32, assert_close  # noqa: E402


def silu(z):
    return z / (1.0 + np.exp(-z))


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def brute_force_topk(sx, sy, k):
    """Top-k over every candidate sx[i] + sy[j] (index i*K + j): scores, indices sorted
    by decreasing score. sx, sy: (..., K)."""
    K = sx.shape[-1]
    everything = (sx[..., :, None] + sy[..., None, :]).reshape(*sx.shape[:-1], K * K)
    idx = np.argsort(-everything, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(everything, idx, -1), idx


def sorted_by_index(scores, indices):
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


# ----------------------------------------------------------------------------- product keys


@pytest.mark.parametrize("K,k", [(8, 1), (8, 4), (8, 8), (8, 9), (8, 20), (8, 64), (5, 7)])
def test_product_key_topk_equals_brute_force_over_all_candidates(K, k):
    rng = np.random.default_rng(K * 100 + k)
    sx = rng.normal(size=(2, 3, K)).astype(np.float32)
    sy = rng.normal(size=(2, 3, K)).astype(np.float32)
    scores, indices = product_key_topk(mx.array(sx), mx.array(sy), K, k)
    scores, indices = np.array(scores), np.array(indices)
    assert scores.shape == indices.shape == (2, 3, k)
    ref_scores, ref_idx = brute_force_topk(sx.astype(np.float64), sy.astype(np.float64), k)
    ours_s, ours_i = sorted_by_index(scores, indices)
    ref_s, ref_i = sorted_by_index(ref_scores, ref_idx)
    np.testing.assert_array_equal(ours_i, ref_i)  # the same experts
    np.testing.assert_allclose(ours_s, ref_s, rtol=0, atol=1e-6)  # one float32 add each


# ----------------------------------------------------------------------------- modules

D, F = 16, 32


def make_ffn(is_moe=True, router="router_gate", routing="per_token", E=64, top_k=4, He=3, dr=8,
             norm_topk_prob=False, seed=0):
    args = ModelArgs(
        vocab_size=16, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
        num_attention_heads=2, layer_types=["attn"], is_moe=is_moe, moe_router=router,
        moe_routing=routing, num_experts=E, num_experts_per_tok=top_k, num_expert_heads=He,
        expert_retrieval_size=dr, norm_topk_prob=norm_topk_prob,
    )
    layer = CDMoE(args) if is_moe else MLP(args)
    K = math.isqrt(E)
    rng = np.random.default_rng(seed)
    w = {
        "gate": rng.normal(0, 0.3, (F, D)), "up": rng.normal(0, 0.3, (F, D)),
        "down": rng.normal(0, 0.2, (D, F)),
        "down_embed": rng.normal(0, 0.4, (E, D)), "up_embed": rng.normal(0, 0.4, (E, D)),
        "router_gate": rng.normal(0, 0.5, (2 * K, D)),
        "queries": rng.normal(0, 0.5, (He * dr, D)), "keys": rng.normal(0, 0.5, (He, K, 2, dr // 2)),
    }
    w = {n: v.astype(np.float32) for n, v in w.items()}
    layer.gate_proj.weight, layer.up_proj.weight = mx.array(w["gate"]), mx.array(w["up"])
    layer.down_proj.weight = mx.array(w["down"])
    if is_moe:
        layer.down_embed.weight, layer.up_embed.weight = mx.array(w["down_embed"]), mx.array(w["up_embed"])
        if router == "router_gate":
            layer.router_gate.weight = mx.array(w["router_gate"])
        else:
            layer.queries.weight, layer.keys = mx.array(w["queries"]), mx.array(w["keys"])
    cfg = dict(router=router, routing=routing, K=K, k=top_k, He=He, dr=dr, norm=norm_topk_prob)
    return layer, w, cfg


def shared_mlp_ref(w, x):
    return (silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def sub_key_scores_ref(w, cfg, x):
    """s_x, s_y: (b, l, He, K) from the doc's two routers."""
    b, l, _ = x.shape
    K = cfg["K"]
    if cfg["router"] == "queries":
        He, half = cfg["He"], cfg["dr"] // 2
        q = (x @ w["queries"].T).reshape(b, l, 2, He, half)
        sx = np.einsum("blhn,hkn->blhk", q[:, :, 0], w["keys"][:, :, 0])
        sy = np.einsum("blhn,hkn->blhk", q[:, :, 1], w["keys"][:, :, 1])
        return sx, sy
    logits = x @ w["router_gate"].T  # (b, l, 2K)
    if cfg["routing"] == "per_token":
        return logits[:, :, None, :K], logits[:, :, None, K:]
    # transformers: router_logits.view(2, b*l, K) of a contiguous (b, l, 2K) tensor; a C-order
    # numpy reshape is the same raw memory reinterpretation
    halves = np.ascontiguousarray(logits).reshape(2, b * l, K)
    return halves[0].reshape(b, l, 1, K), halves[1].reshape(b, l, 1, K)


def cdmoe_ref(w, cfg, x):
    x = np.asarray(x, np.float64)
    sx, sy = sub_key_scores_ref(w, cfg, x)
    scores, idx = brute_force_topk(sx, sy, cfg["k"])  # (b, l, He, k)
    weights = softmax(scores)
    if cfg["norm"]:
        weights = weights / weights.sum(-1, keepdims=True)
    down, up = w["down_embed"][idx], w["up_embed"][idx]  # (b, l, He, k, d)
    gate = silu(np.einsum("blhkd,bld->blhk", down, x)) * weights
    return shared_mlp_ref(w, x) + np.einsum("blhk,blhkd->bld", gate, up)


def test_dense_mlp_is_down_of_silu_gate_times_up():
    layer, w, _ = make_ffn(is_moe=False)
    x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
    assert_close(np.array(layer(mx.array(x))), shared_mlp_ref(w, x.astype(np.float64)))


@pytest.mark.parametrize("E,top_k", [(64, 4), (64, 12), (100, 6)])
def test_queries_router_forward_matches_reference(E, top_k):
    """Cheems: 3 retrieval heads, each picking top_k experts (top_k > K included)."""
    layer, w, cfg = make_ffn(router="queries", E=E, top_k=top_k)
    x = np.random.default_rng(E + top_k).normal(size=(2, 7, D)).astype(np.float32)
    assert_close(np.array(layer(mx.array(x))), cdmoe_ref(w, cfg, x))


@pytest.mark.parametrize("routing", ["per_token", "transformers_reshape"])
@pytest.mark.parametrize("top_k", [4, 12])
def test_router_gate_forward_matches_reference(routing, top_k):
    layer, w, cfg = make_ffn(router="router_gate", routing=routing, top_k=top_k)
    x = np.random.default_rng(top_k).normal(size=(2, 7, D)).astype(np.float32)
    assert_close(np.array(layer(mx.array(x))), cdmoe_ref(w, cfg, x))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("router", ["queries", "router_gate"])
def test_routing_weights_are_softmax_of_topk_candidate_scores(router, norm_topk_prob):
    """route(): per head, the brute-force top-k experts with weights softmax(scores),
    which sum to one (norm_topk_prob renormalises; a no-op after a softmax)."""
    layer, w, cfg = make_ffn(router=router, top_k=5, norm_topk_prob=norm_topk_prob)
    x = np.random.default_rng(2).normal(size=(2, 4, D)).astype(np.float32)
    weights, indices = (np.array(a) for a in layer.route(mx.array(x)))
    sx, sy = sub_key_scores_ref(w, cfg, x.astype(np.float64))
    scores, idx = brute_force_topk(sx, sy, 5)
    ref_w, ref_i = sorted_by_index(softmax(scores), idx)
    ours_w, ours_i = sorted_by_index(weights, indices)
    np.testing.assert_array_equal(ours_i, ref_i)
    assert_close(ours_w, ref_w)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=0, atol=1e-6)
    assert_close(np.array(layer(mx.array(x))), cdmoe_ref(w, cfg, x))


def test_transformers_reshape_takes_halves_of_torch_view():
    """The doc's description, checked on torch's own ``view(2, N, K)``: token n reads its
    x-logits from memory row n of the flat (N*2K) buffer split in rows of K, i.e. token
    n//2; its y-logits from row N + n, i.e. token N/2 + n//2."""
    torch = pytest.importorskip("torch")
    layer, w, cfg = make_ffn(routing="transformers_reshape")
    b, l, K = 2, 3, cfg["K"]
    x = np.random.default_rng(3).normal(size=(b, l, D)).astype(np.float32)
    logits = torch.from_numpy(x.astype(np.float64) @ w["router_gate"].T.astype(np.float64))
    view = logits.view(2, b * l, K).numpy()
    sx, sy = (np.array(a) for a in layer.sub_key_scores(mx.array(x)))
    assert_close(sx.reshape(b * l, K), view[0])
    assert_close(sy.reshape(b * l, K), view[1])
    flat = logits.reshape(b * l, 2 * K).numpy()
    N = b * l
    for n in range(N):
        assert_close(view[0, n], flat[n // 2, (n % 2) * K : (n % 2 + 1) * K])
        assert_close(view[1, n], flat[N // 2 + n // 2, (n % 2) * K : (n % 2 + 1) * K])


def test_transformers_reshape_differs_from_per_token_for_several_tokens():
    x = np.random.default_rng(4).normal(size=(2, 5, D)).astype(np.float32)
    per_token, _, _ = make_ffn(routing="per_token")
    reshape, _, _ = make_ffn(routing="transformers_reshape")
    a, b = np.array(per_token(mx.array(x))), np.array(reshape(mx.array(x)))
    assert np.max(np.abs(a - b)) > 1e-2
    # ... and only the per-token split is causal: changing the last token moves only it
    x2 = x.copy()
    x2[:, -1] = np.random.default_rng(5).normal(size=(2, D))
    a2, b2 = np.array(per_token(mx.array(x2))), np.array(reshape(mx.array(x2)))
    assert_close(a2[:, :-1], a[:, :-1])
    assert np.max(np.abs(b2[:, :-1] - b[:, :-1])) > 1e-2


def test_routings_agree_for_a_single_token():
    x = np.random.default_rng(6).normal(size=(1, 1, D)).astype(np.float32)
    per_token, _, _ = make_ffn(routing="per_token")
    reshape, _, _ = make_ffn(routing="transformers_reshape")
    assert_close(np.array(reshape(mx.array(x))), np.array(per_token(mx.array(x))))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("E,top_k", [(64, 4), (256, 8)])
def test_transformers_reshape_matches_transformers_doge_cdmoe(E, top_k, norm_topk_prob):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DogeConfig
    from transformers.models.doge.modeling_doge import DogeCDMoE

    layer, w, _ = make_ffn(routing="transformers_reshape", E=E, top_k=top_k, norm_topk_prob=norm_topk_prob)
    config = DogeConfig(
        hidden_size=D, intermediate_size=F, is_moe=True, num_experts=E,
        num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
    )
    ref_layer = DogeCDMoE(config).double()
    names = {"gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down",
             "router_gate.weight": "router_gate", "down_embed.weight": "down_embed",
             "up_embed.weight": "up_embed"}
    ref_layer.load_state_dict({k: torch.from_numpy(w[v].astype(np.float64)) for k, v in names.items()})
    x = np.random.default_rng(7).normal(size=(2, 6, D)).astype(np.float32)
    with torch.no_grad():
        ref, _ = ref_layer(torch.from_numpy(x.astype(np.float64)))
    assert_close(np.array(layer(mx.array(x))), ref.numpy())
