"""The cached paths agree with the full forward on a hybrid Cheems (SSD + DMA + CDMoE).

Reference: the model's own full (cache-free) forward, which the official vectors and the
transformers parity tests pin to independent implementations; here we check that every
other way of running the same tokens (chunked prefill, token-by-token decode, mlx-lm's
right-padded batched prefill) reproduces it.

Tolerance: 1e-4 * max(1, max|ref|) -- float32, the paths differ in summation order
(chunked scan vs recurrence, masked vs unmasked softmax), observed differences ~1e-6.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import max_rel_err
from mlx_lm.generate import BatchGenerator, generate_step

from cheems_mlx.model import Model, ModelArgs


def hybrid_args(**overrides):
    cfg = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["ssd", "attn", "ssd", "attn"],
        ssd_chunk_size=8,
        keep_window_size=12,
        dynamic_mask_rule="keep_window",
        dynamic_mask_heads="kv",
        qk_norm=True,
        is_moe=True,
        moe_router="queries",
        num_experts=64,
        num_expert_heads=2,
        num_experts_per_tok=4,
        expert_retrieval_size=16,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return ModelArgs(**cfg)


def random_model(args, seed=0):
    mx.random.seed(seed)
    model = Model(args)
    # exercise every path: nonzero DMA decay, stable negative SSD decay, non-unit residuals
    params = {}
    for i, layer in enumerate(model.layers):
        if layer.layer_type == "attn":
            layer.attn.A = mx.random.uniform(-1.0, 1.0, layer.attn.A.shape)
        else:
            layer.ssd.A = -mx.random.uniform(0.2, 1.5, layer.ssd.A.shape)
        layer.post_sequence_residual.weight = 1 + 0.1 * mx.random.normal((args.hidden_size,))
    mx.eval(model.parameters())
    return model


def tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"dynamic_mask_rule": "cheems_ratio", "dynamic_mask_heads": "attention", "qk_norm": False},
        {"is_moe": True, "moe_router": "router_gate", "num_experts_per_tok": 6},
        {"is_moe": False, "num_key_value_heads": 1, "sliding_window": 9},
    ],
    ids=["topW-queries", "cheems-ratio0", "router-gate", "dense-window"],
)
def test_full_forward_equals_chunked_prefill_plus_decode(overrides):
    args = hybrid_args(**overrides)
    model = random_model(args)
    ids = mx.random.randint(0, args.vocab_size, (2, 30))
    ref = np.array(model(ids))

    cache = model.make_cache()
    parts = [model(ids[:, :11], cache=cache), model(ids[:, 11:20], cache=cache)]
    for t in range(20, 30):
        parts.append(model(ids[:, t : t + 1], cache=cache))
    got = np.array(mx.concatenate(parts, axis=1))
    assert np.abs(got - ref).max() <= tol(ref)


def greedy_alone(model, prompt, n):
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(tok))
    return out


@pytest.mark.parametrize("prefill_step", [2048, 4])
def test_mlx_lm_batched_generation_matches_single(prefill_step):
    """mlx-lm right-pads the prompts of a batch, prefills them together and rolls the
    padding to the left: positions and SSD states must advance by each row's true
    length for the batch to reproduce the single-prompt runs."""
    args = hybrid_args(moe_router="router_gate", num_experts_per_tok=6)
    model = random_model(args, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, args.vocab_size, n).tolist() for n in (13, 5, 9)]
    expected = [greedy_alone(model, p, 6) for p in prompts]

    gen = BatchGenerator(model, max_tokens=6, prefill_step_size=prefill_step, stop_tokens=[])
    uids = gen.insert(prompts)
    got = {u: [] for u in uids}
    while responses := gen.next_generated():
        for r in responses:
            if r.finish_reason != "stop":
                got[r.uid].append(r.token)
    gen.close()
    assert [got[u] for u in uids] == expected


def test_left_padded_batch_matches_unpadded_rows():
    args = hybrid_args()
    model = random_model(args, seed=2)
    rng = np.random.default_rng(1)
    lengths = [12, 7]
    L = max(lengths)
    rows = [rng.integers(1, args.vocab_size, n) for n in lengths]
    padded = mx.array(np.stack([np.pad(r, (L - len(r), 0)) for r in rows]))
    cache = model.make_cache(left_padding=[L - n for n in lengths])
    batch = np.array(model(padded, cache=cache))
    step = np.array(model(mx.array([[5], [6]]), cache=cache))
    for i, r in enumerate(rows):
        alone_cache = model.make_cache()
        ref = np.array(model(mx.array(r)[None], cache=alone_cache))[0]
        ref_step = np.array(model(mx.array([[5 + i]]), cache=alone_cache))[0]
        assert np.abs(batch[i, L - len(r) :] - ref).max() <= tol(ref)
        assert np.abs(step[i] - ref_step).max() <= tol(ref_step)


def test_quantized_kv_cache_stays_close_to_the_float_forward():
    """8-bit K/V (group 32) vs float: the per-key bias stays exact, K/V carry ~0.4% relative
    rounding, so logits move by well under 5% of their range."""
    args = hybrid_args(num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    model = random_model(args, seed=4)
    ids = mx.random.randint(0, args.vocab_size, (1, 24))
    ref = np.array(model(ids))
    cache = model.make_cache(kv_bits=8, kv_group_size=32)
    parts = [model(ids[:, :16], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(16, 24)]
    got = np.array(mx.concatenate(parts, axis=1))
    assert type(cache[1][0]).__name__ == "QuantizedKVCache"
    assert np.abs(got - ref).max() <= 5e-2 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize(
    "overrides, cache_kw, path",
    [
        ({}, {}, "whole step"),
        ({"is_moe": True, "moe_router": "router_gate", "dynamic_mask_heads": "attention"}, {}, "whole step"),
        ({"sliding_window": 7}, {}, "whole step"),
        ({"dynamic_mask_rule": "hard"}, {}, "layers"),
        ({"dynamic_mask_rule": "cheems_ratio", "dynamic_mask_ratio": 0.3}, {}, "layers"),
        ({"is_moe": False, "num_key_value_heads": 1}, {"max_kv_size": 16}, "layers"),
        ({"num_attention_heads": 2, "num_key_value_heads": 1}, {"kv_bits": 8, "kv_group_size": 32}, "layers"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 20}, {}, "eager"),
    ],
    ids=["hybrid", "router-gate", "sliding-window", "hard-rule-layers", "ratio-rule-layers", "rotating-cache",
         "quantized-kv", "dynamic-rope-eager"],
)
def test_compiled_decode_step_equals_the_eager_one(overrides, cache_kw, path, monkeypatch):
    """A decode step, and a short call of a few tokens, runs as one mx.compile'd function of
    the whole model (Model.compiled_step:
    plain KVCache buffers, a key-count-free mask rule) or through each DecoderLayer's compiled
    functions (other caches / rules); the same steps with CHEEMS_MLX_COMPILE=0 (every
    operation eager) give the same logits to float32 rounding, also after the parameters
    change (the compiled functions read them at each call). keep_window 12 < the 10..26 keys,
    so the top-W selection runs over the (partly unwritten) buffer."""
    args = hybrid_args(**overrides)
    model = random_model(args, seed=3)
    model.eval()  # as cheems_mlx.load returns it (training mode never compiles)
    ids = mx.random.randint(0, args.vocab_size, (2, 26))

    def decode(compiled):
        monkeypatch.setenv("CHEEMS_MLX_COMPILE", "1" if compiled else "0")
        cache = model.make_cache(**cache_kw)
        model(ids[:, :10], cache=cache)
        out = [model(ids[:, t : t + 1], cache=cache) for t in range(10, 18)]
        layer = model.layers[0]
        layer.pre_state_layernorm.weight = layer.pre_state_layernorm.weight * 1.5  # as a fine-tune would
        out += [model(ids[:, 18:22], cache=cache)]  # a short call (a verification): compiled too
        out += [model(ids[:, t : t + 1], cache=cache) for t in range(22, 26)]
        layer.pre_state_layernorm.weight = layer.pre_state_layernorm.weight / 1.5
        return np.array(mx.concatenate(out, axis=1))

    eager, compiled = decode(False), decode(True)
    took = ("whole step" if model.__dict__.get("_step_fns") else
            "layers" if all("_decode_fns" in layer.__dict__ for layer in model.layers) else "eager")
    assert took == path
    assert max_rel_err(compiled, eager) <= 1e-5


def test_whole_step_buffers_grow_and_roll_back_like_the_layer_path(monkeypatch):
    """Across KVCache's 256-key buffer boundary and after a rollback (prompt lookup's trim),
    the whole-model compiled step gives the logits of a full forward over the same tokens
    (a recomputation, not the code under test), so growth, the offsets and the SSD states'
    record / trim stay right."""
    monkeypatch.setenv("CHEEMS_MLX_COMPILE", "1")
    args = hybrid_args(keep_window_size=300)
    model = random_model(args, seed=5)
    model.eval()
    ids = mx.random.randint(0, args.vocab_size, (1, 262))
    cache = model.make_cache()
    model(ids[:, :250], cache=cache)
    got = [model(ids[:, t : t + 1], cache=cache) for t in range(250, 258)]  # crosses 256
    assert model.__dict__.get("_step_fns")
    assert cache[1][0].keys.shape[2] == 512
    model(ids[:, 258:261], cache=cache)  # a short call (verification), then roll it back
    for c in cache:
        c.trim(3)
    got += [model(ids[:, t : t + 1], cache=cache) for t in range(258, 262)]
    ref = np.array(model(ids))[:, 250:262]
    got = np.array(mx.concatenate(got, axis=1))
    assert max_rel_err(got, ref) <= 1e-4  # chunked scan vs steps: rounding


def test_whole_step_with_attention_layers_at_different_offsets(monkeypatch):
    """The whole-model step forms one mask and one set of RoPE angles when the attention
    layers stand at one offset (as they do after any normal call); a cache whose attention
    layers disagree (one layer's K/V trimmed by hand) takes a trace with an offset per layer
    and must give the logits of the eager path (CHEEMS_MLX_COMPILE=0) on the same cache."""
    args = hybrid_args()
    model = random_model(args, seed=4)
    model.eval()
    ids = mx.random.randint(0, args.vocab_size, (2, 16))

    def decode(compiled):
        monkeypatch.setenv("CHEEMS_MLX_COMPILE", "1" if compiled else "0")
        cache = model.make_cache()
        model(ids[:, :10], cache=cache)
        for kv in cache[3]:  # the second attention layer two keys behind the first
            kv.trim(2)
        out = [model(ids[:, t : t + 1], cache=cache) for t in range(10, 16)]
        return np.array(mx.concatenate(out, axis=1))

    eager, compiled = decode(False), decode(True)
    assert list(model.__dict__["_step_fns"]) == [(None, False)]
    assert max_rel_err(compiled, eager) <= 1e-5


def test_joined_projections_follow_weight_changes_and_share_memory(monkeypatch):
    """The whole-model step multiplies C/B/X/dt, q/k/v and gate/up as one product each
    (projections.py). Against the eager path (every Linear on its own): the same logits
    after the step has joined them; after a projection's weight is replaced (as a fine-tune
    or load_weights does) and after one is wrapped in LoRA (left unjoined); and the joined
    weights take no second copy: the layers' weights become views of them, so MLX's active
    memory grows by far less than the projections' own bytes."""
    from mlx_lm.tuner.lora import LoRALinear

    args = hybrid_args(is_moe=False)
    model = random_model(args, seed=6)
    model.eval()
    ids = mx.random.randint(0, args.vocab_size, (2, 20))
    proj_bytes = sum(m[a].weight.nbytes for m, _, attrs in model.projection_groups() for a in attrs)

    def decode(compiled, edit=None):
        monkeypatch.setenv("CHEEMS_MLX_COMPILE", "1" if compiled else "0")
        cache = model.make_cache()
        model(ids[:, :10], cache=cache)
        out = [model(ids[:, t : t + 1], cache=cache) for t in range(10, 14)]
        if edit:
            edit()
        out += [model(ids[:, t : t + 1], cache=cache) for t in range(14, 20)]
        return np.array(mx.concatenate(out, axis=1))

    mx.eval(model.parameters())
    before = mx.get_active_memory()
    compiled = decode(True)
    assert model.layers[1].attn.__dict__["_joined_qkv"][1] is not None
    assert mx.get_active_memory() - before < 0.25 * proj_bytes
    assert max_rel_err(decode(False), compiled) <= 1e-5
    joins = [m.__dict__[name][1] for m, name, _ in model.projection_groups()]
    decode(True)  # steady state: a trace hands the parameters back as new objects, no re-join
    assert all(m.__dict__[name][1] is j for (m, name, _), j in zip(model.projection_groups(), joins))

    attn, ssd, mlp = model.layers[1].attn, model.layers[0].ssd, model.layers[2].feed_forward
    originals = (attn.q_proj.weight, ssd.dt_proj.weight, mlp.up_proj.weight)

    def change():
        attn.q_proj.weight = originals[0] * 1.5
        ssd.dt_proj.weight = originals[1] * -2.0
        mlp.up_proj.weight = originals[2] + 0.1

    def restore():
        attn.q_proj.weight, ssd.dt_proj.weight, mlp.up_proj.weight = originals

    compiled = decode(True, change)
    restore()
    eager = decode(False, change)
    restore()
    assert max_rel_err(compiled, eager) <= 1e-5

    lora = LoRALinear.from_base(attn.k_proj, r=4)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
    attn.k_proj = lora
    compiled, eager = decode(True), decode(False)
    assert attn.__dict__["_joined_qkv"][1] is None  # a LoRA layer: its group stays apart
    assert max_rel_err(compiled, eager) <= 1e-5
