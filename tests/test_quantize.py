"""Quantized output of the converter (``python -m cheems_mlx.convert -q ...``) and
``cheems_mlx.quantize``: accuracy against the float model, which layers are quantized
and which are held at 8 bits, gathered (never whole-table) dequantization of the CDMoE
expert tables, round trips, recipes and fp modes, loading through cheems_mlx and mlx-lm,
generation, and clean failures.

Models: a tiny transformers ``DogeForCausalLM`` MoE (``router_gate``; a PyTorch
checkpoint, the converter's usual input) and a tiny native Cheems hybrid (SSD +
attention + CDMoE with ``queries``; a converted folder with a sentencepiece tokenizer,
so it can generate). Both have random weights; the Cheems one has its word embedding
scaled by 4 so that the next-token distribution is peaked as in a trained model (top-1
agreement is meaningless when all logits are nearly equal).
"""

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from cheems_mlx.convert.__main__ import main as cli_main
from cheems_mlx.convert.convert import convert
from cheems_mlx.io import save_model_dir
from cheems_mlx.loading import load_model_only
from cheems_mlx.model import HIGH_PRECISION_LAYERS, Model, ModelArgs
from cheems_mlx.quantize import QuantizeError, quantize, quantized_paths

from conftest import tiny_doge

WORDS = "and god said let there be light in the beginning was the word unto them".split()


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def cheems_dir(tmp_path_factory):
    """Tiny native Cheems hybrid (ssd, attn, ssd; CDMoE with queries) + tokenizer, float32."""
    from cheems_mlx.train import prepare

    root = tmp_path_factory.mktemp("qcheems")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(60)]
    (root / "c.txt").write_text("\n\n".join(docs))
    prepare([root / "c.txt"], root / "data", vocab_size=300, val_fraction=0.1)
    args = ModelArgs(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, layers_type=["ssd", "attn", "ssd"],
        ssd_chunk_size=8, qk_norm=True, is_moe=True, num_experts=64, num_expert_heads=2,
        num_experts_per_tok=4, expert_retrieval_size=16, max_position_embeddings=64,
        eos_token_id=2, bos_token_id=1,
    )
    mx.random.seed(3)
    model = Model(args)
    for layer in model.layers:
        if layer.layer_type == "attn":
            layer.attn.A = mx.random.uniform(-1, 1, layer.attn.A.shape)
        layer.post_state_residual.weight = 1 + 0.1 * mx.random.normal((64,))
    model.model.word_embed.weight = model.model.word_embed.weight * 4  # peaked outputs
    config = {k: v for k, v in asdict(args).items() if k != "layer_types"}
    config["source_format"] = "cheems_mlx"
    tok = [root / "data" / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")]
    return save_model_dir(model, config, root / "model", dtype="float32", extra_files=tok)


@pytest.fixture(scope="module")
def doge_dir(tmp_path_factory):
    """Tiny transformers DogeForCausalLM MoE saved as a PyTorch ``.bin`` checkpoint."""
    import torch

    root = tmp_path_factory.mktemp("qdoge")
    hf = tiny_doge(seed=0, is_moe=True, num_experts=64, num_experts_per_tok=4)
    path = root / "doge"
    hf.save_pretrained(path, safe_serialization=False)
    ids = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)
    with torch.no_grad():
        logits = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    return dict(path=path, ids=ids, logits=logits)


@pytest.fixture(scope="module")
def cheems_q4(cheems_dir, tmp_path_factory):
    return convert(cheems_dir, tmp_path_factory.mktemp("q") / "q4", quantize=True, q_bits=4, verbose=False)


def ids_for(vocab, shape=(4, 32), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def logits_of(path, ids):
    model, _ = load_model_only(Path(path))
    return np.array(model(mx.array(ids)).astype(mx.float32))


def rel_rms(out, ref):
    """RMS error relative to the RMS spread of the reference logits (per position)."""
    spread = ref - ref.mean(axis=-1, keepdims=True)
    return float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(spread**2)))


def run_cli(argv, capsys):
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_fails(argv, capsys, dst, *fragments):
    rc, err = run_cli(argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert not Path(dst).exists()
    assert not list(Path(dst).parent.glob(f".{Path(dst).name}.*"))
    return lines[0]


def leaf(path):
    return path.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- accuracy


def test_8bit_logits_close_to_float(doge_dir, cheems_dir, tmp_path):
    """8-bit affine (group 64) rounds each weight to 1/255 of its group's range: an RMS
    error of range / (255 * sqrt(12)), about 0.6% of a group's spread for Gaussian
    weights, per matmul. Through the ~10 quantized matmuls on the path of these 2-3 layer
    models (random, so with no redundancy) that gives 2-3% RMS logit error; the bound is
    5% of the logits' RMS spread. Against transformers for the Doge checkpoint (converted
    and quantized in one step, from a .bin; its flat random logits make top-1 a coin toss
    at near ties, so top-1 agreement, >= 95%, is checked on the peaked Cheems model)."""
    dst = convert(doge_dir["path"], tmp_path / "d8", quantize=True, q_bits=8, verbose=False)
    out = logits_of(dst, doge_dir["ids"])
    assert rel_rms(out, doge_dir["logits"]) < 0.05

    ids = ids_for(300)
    ref = logits_of(cheems_dir, ids)
    out = logits_of(convert(cheems_dir, tmp_path / "c8", quantize=True, q_bits=8, verbose=False), ids)
    assert rel_rms(out, ref) < 0.05
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_quantized_model_is_the_float_model_with_rounded_weights(cheems_dir, cheems_q4):
    """Exactness of the kernels and of loading: the 4-bit model equals the float model in
    which every quantized weight is replaced by dequantize(quantize(w)) (1e-4)."""
    ids = ids_for(300)
    qmodel, _ = load_model_only(cheems_q4)
    fake, _ = load_model_only(cheems_dir)
    rounded = []
    for path, m in quantized_paths(qmodel).items():
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        rounded.append((f"{path}.weight", w))
    fake.load_weights(rounded, strict=False)
    out, ref = np.array(qmodel(mx.array(ids))), np.array(fake(mx.array(ids)))
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_4bit_top1_agreement(cheems_dir, cheems_q4):
    ids = ids_for(300)
    ref, out = logits_of(cheems_dir, ids), logits_of(cheems_q4, ids)
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.85
    assert rel_rms(out, ref) < 0.4


# --------------------------------------------------------------------------- what is quantized


def test_quantized_and_held_layers(cheems_dir, cheems_q4, doge_dir, tmp_path):
    from mlx_lm.utils import load_model

    src = dict(mx.load(str(cheems_dir / "model.safetensors")))
    for folder in (cheems_q4, convert(doge_dir["path"], tmp_path / "d4", quantize=True, verbose=False)):
        model, config = load_model_only(folder)
        q = config["quantization"]
        assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            if not hasattr(m, "to_quantized") and not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                continue
            in_dims = m.weight.shape[-1] * (32 // m.bits if hasattr(m, "bits") else 1)
            if leaf(path) in HIGH_PRECISION_LAYERS:
                if in_dims % 64 == 0:  # held at 8 bits, recorded per layer
                    assert isinstance(m, nn.QuantizedLinear) and m.bits == 8, path
                    assert q[path] == {"group_size": 64, "bits": 8, "mode": "affine"}
                else:  # e.g. the DMA dt_proj of width Hkv * head_dim = 32: floating point
                    assert type(m) is nn.Linear, path
            else:
                kind = nn.QuantizedEmbedding if "embed" in leaf(path) else nn.QuantizedLinear
                assert type(m) is kind and m.bits == 4 and m.group_size == 64, path
        ffs = [layer.feed_forward for layer in model.layers]
        assert all(isinstance(f.down_embed, nn.QuantizedEmbedding) for f in ffs)
        assert all(isinstance(f.up_embed, nn.QuantizedEmbedding) for f in ffs)
        # mlx-lm's own loader (trust_remote_code, the folder's cheems_model.py) rebuilds the same
        ml, _ = load_model(Path(folder), trust_remote_code=True)
        kinds = lambda mm: {p: type(x).__name__ for p, x in tree_flatten(mm.leaf_modules(), is_leaf=nn.Module.is_module)}  # noqa: E731
        assert kinds(ml) == kinds(model)

    # A, keys, norms and residual vectors are plain arrays: stored unchanged, in float32
    out = dict(mx.load(str(cheems_q4 / "model.safetensors")))
    plain = [k for k in src if k.endswith((".A", ".keys")) or "norm" in k or "residual" in k]
    assert any(k.endswith(".keys") for k in plain) and any(k.endswith(".A") for k in plain)
    for k in plain:
        assert out[k].dtype == mx.float32 and mx.array_equal(out[k], src[k]), k


def test_cdmoe_gathers_only_the_selected_rows(cheems_q4, monkeypatch):
    """CDMoE.__call__ dequantizes the gathered rows of the expert tables only; its output
    equals a NumPy reference that unpacks just those rows' 4-bit codes."""
    model, _ = load_model_only(cheems_q4)
    ff = model.layers[0].feed_forward
    x = mx.random.normal((1, 6, 64), key=mx.random.key(0))
    seen = []
    real = mx.dequantize

    def spy(w, *a, **k):
        seen.append(tuple(w.shape))
        return real(w, *a, **k)

    monkeypatch.setattr(mx, "dequantize", spy)
    out = np.array(ff(x), dtype=np.float64)
    monkeypatch.setattr(mx, "dequantize", real)
    He, k = ff.num_heads, ff.top_k
    # one dequantize per table, on (b, l, He, k) gathered rows of 64 * 4 / 32 = 8 words
    assert seen == [(1, 6, He, k, 8), (1, 6, He, k, 8)], seen

    weights, idx = ff.route(x)
    weights, idx = np.array(weights, dtype=np.float64), np.array(idx)

    def rows(table):  # unpack only table[idx]: 8 nibbles per uint32, low bits first
        codes = np.array(table.weight)[idx]  # (1, 6, He, k, 8) uint32
        q = (codes[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
        q = q.reshape(*idx.shape, 64).astype(np.float64)
        scales = np.array(table.scales, dtype=np.float64)[idx]  # (..., 1): one group of 64
        biases = np.array(table.biases, dtype=np.float64)[idx]
        return q * scales + biases

    down, up = rows(ff.down_embed), rows(ff.up_embed)
    xs = np.array(x, dtype=np.float64)
    act = np.einsum("blhkd,bld->blhk", down, xs)
    gate = act / (1 + np.exp(-act)) * weights
    experts = np.einsum("blhk,blhkd->bld", gate, up)
    shared = np.array(super(type(ff), ff).__call__(x), dtype=np.float64)
    np.testing.assert_allclose(out, shared + experts, atol=1e-4 * max(1.0, np.abs(out).max()))


# --------------------------------------------------------------------------- round trips, recipes, modes


def test_dequantize_and_requantize_round_trip(cheems_dir, cheems_q4, tmp_path, capsys):
    ids = ids_for(300)
    q4 = logits_of(cheems_q4, ids)
    dq = convert(cheems_q4, tmp_path / "dq", dequantize=True, verbose=False)
    cfg = json.loads((dq / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    model, _ = load_model_only(dq)
    assert not quantized_paths(model)
    np.testing.assert_allclose(logits_of(dq, ids), q4, atol=1e-4 * np.abs(q4).max())
    # the dequantized copy quantizes again. (Not to the same codes: mlx's affine rounding
    # is not idempotent, which is why a quantized input is refused rather than re-quantized.)
    again = convert(dq, tmp_path / "q4again", quantize=True, q_bits=4, verbose=False)
    a, b = mx.load(str(cheems_q4 / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    ref = logits_of(cheems_dir, ids)
    assert np.mean(logits_of(again, ids).argmax(-1) == ref.argmax(-1)) >= 0.8
    # ... and at other settings
    q8 = logits_of(convert(dq, tmp_path / "q8", quantize=True, q_bits=8, verbose=False), ids)
    assert rel_rms(q8, q4) < 0.05
    # a quantized folder converted with --dequantize and a dtype
    dq16 = convert(cheems_q4, tmp_path / "dq16", dequantize=True, dtype="float16", verbose=False)
    assert mx.load(str(dq16 / "model.safetensors"))["model.word_embed.weight"].dtype == mx.float16


def test_recipe_keeps_the_held_layers(cheems_dir, tmp_path):
    dst = convert(cheems_dir, tmp_path / "mixed", quantize=True, quant_predicate="mixed_3_6", verbose=False)
    model, config = load_model_only(dst)
    bits = {p: m.bits for p, m in quantized_paths(model).items()}
    for p, b in bits.items():
        expected = {8} if leaf(p) in HIGH_PRECISION_LAYERS else {3, 6}
        assert b in expected, (p, b)
        assert config["quantization"][p]["bits"] == b
    assert 6 in bits.values() and 3 in bits.values()  # the recipe's own choice (down_proj, ...)
    assert type(model.layers[1].attn.dt_proj) is nn.Linear  # in_dims 32: not a multiple of 64
    ids = ids_for(300)
    assert np.mean(logits_of(dst, ids).argmax(-1) == logits_of(cheems_dir, ids).argmax(-1)) >= 0.7


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_fp_modes(cheems_dir, tmp_path, mode):
    dst = convert(cheems_dir, tmp_path / mode, quantize=True, q_mode=mode, verbose=False)
    model, config = load_model_only(dst)
    assert config["quantization"]["mode"] == mode
    ff = model.layers[0].feed_forward
    assert isinstance(ff.down_embed, nn.QuantizedEmbedding) and ff.down_embed.mode == mode
    assert ff.queries.mode == "affine" and ff.queries.bits == 8  # held at 8-bit affine
    ids = ids_for(300)
    out, ref = logits_of(dst, ids), logits_of(cheems_dir, ids)
    assert np.isfinite(out).all()
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= (0.9 if mode == "mxfp8" else 0.6)


def test_group_size_leaving_layers_unquantized_is_reported(cheems_dir, tmp_path, capsys):
    dst = tmp_path / "g128"
    rc, err = run_cli(["--hf-path", cheems_dir, "--mlx-path", dst, "-q", "--q-group-size", "128"], capsys)
    assert rc == 0, err
    note = [l for l in err.splitlines() if l.startswith("note:")]
    assert len(note) == 1 and "group size 128" in note[0] and "model.word_embed" in note[0]
    model, _ = load_model_only(dst)
    q = quantized_paths(model)
    assert set(q) == {f"model.layers.{i}.feed_forward.down_proj" for i in range(3)}  # in_dims 128
    n_left = int(note[0].split("note: ")[1].split()[0])
    assert n_left == sum(1 for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
                         if hasattr(m, "to_quantized") and m.weight.shape[-1] % 128)


# --------------------------------------------------------------------------- bad input


def test_bad_settings(cheems_dir, cheems_q4, tmp_path, capsys):
    dst = tmp_path / "out"
    base = ["--hf-path", cheems_dir, "--mlx-path", dst]
    cases = [
        (["-q", "--q-bits", "7"], "bits 7"),
        (["-q", "--q-bits", "1"], "bits 1"),
        (["-q", "--q-mode", "int4"], "mode 'int4'"),
        (["-q", "--q-group-size", "48"], "group size 48"),
        (["-q", "--q-mode", "mxfp4", "--q-group-size", "64"], "mxfp4 needs group size 32"),
        (["-q", "--q-mode", "nvfp4", "--q-bits", "8"], "nvfp4 has 4 bits"),
        (["-q", "--quant-predicate", "mixed_9_9"], "recipe 'mixed_9_9'"),
        (["-q", "--quant-predicate", "mixed_3_6", "--q-mode", "mxfp4"], "affine only"),
        (["-q", "--quant-predicate", "mixed_3_6", "--q-bits", "4"], "drop the bits"),
        (["--q-bits", "4"], "-q/--quantize"),
        (["-q", "--dequantize"], "not both"),
        (["--dequantize"], "is not quantized"),
    ]
    for extra, frag in cases:
        assert_fails(base + extra, capsys, dst, frag)
    # an already quantized input: refused, with the way out
    qbase = ["--hf-path", cheems_q4, "--mlx-path", dst]
    msg = assert_fails(qbase + ["-q", "--q-bits", "8"], capsys, dst, "already quantized", "4-bit affine, group 64")
    assert "--dequantize" in msg
    assert_fails(qbase + ["--dtype", "float16"], capsys, dst, "already quantized", "--dequantize")


def test_group_size_that_divides_nothing_is_an_error(tmp_path, capsys):
    hf = tiny_doge(seed=1, hidden_size=32, intermediate_size=64, vocab_size=96, num_attention_heads=2,
                   num_key_value_heads=1)
    hf.save_pretrained(tmp_path / "narrow")
    dst = tmp_path / "out"
    assert_fails(["--hf-path", tmp_path / "narrow", "--mlx-path", dst, "-q", "--q-group-size", "128"],
                 capsys, dst, "group size 128", "no layer", "[32, 64]")
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(Model(ModelArgs(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2)),
                 {"quantization": {"bits": 4, "group_size": 64}})


# --------------------------------------------------------------------------- CLIs, mlx-lm


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def test_cli_subprocess_and_generation(cheems_dir, tmp_path):
    """The converter CLI in a real process; its output generates the same greedy text with
    cheems_mlx.load, ``python -m cheems_mlx.generate`` and ``mlx_lm generate
    --trust-remote-code``."""
    import cheems_mlx
    from mlx_lm import generate

    dst = tmp_path / "q4cli"
    r = run("-m", "cheems_mlx.convert", "--hf-path", cheems_dir, "--mlx-path", dst, "-q", "--q-bits", "4")
    assert r.returncode == 0, r.stderr
    assert "quantized: 4-bit affine, group 64" in r.stdout and "kept at 8 bits" in r.stdout

    model, tok = cheems_mlx.load(dst)
    expected = generate(model, tok, "and god said", max_tokens=8, verbose=False).strip()
    assert expected
    r = run("-m", "cheems_mlx.generate", "--model", dst, "--prompt", "and god said", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
    r = run("-m", "mlx_lm", "generate", "--model", dst, "--trust-remote-code", "--prompt", "and god said",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert expected in r.stdout


def test_mlx_lm_convert_uses_the_model_predicate(cheems_dir, cheems_q4, tmp_path):
    """``mlx_lm convert -q --trust-remote-code`` on a converted folder applies
    Model.quant_predicate too: the same layers and logits as our converter's 4-bit output."""
    from mlx_lm.convert import convert as mlx_convert

    dst = tmp_path / "mlxq"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_convert(str(cheems_dir), str(dst), quantize=True, q_bits=4, trust_remote_code=True)
    model, config = load_model_only(dst)
    ours, ours_config = load_model_only(cheems_q4)
    assert config["quantization"] == ours_config["quantization"]
    assert {p: (m.bits, m.mode) for p, m in quantized_paths(model).items()} == {
        p: (m.bits, m.mode) for p, m in quantized_paths(ours).items()
    }
    ids = ids_for(300)
    np.testing.assert_allclose(logits_of(dst, ids), logits_of(cheems_q4, ids), atol=1e-5)
