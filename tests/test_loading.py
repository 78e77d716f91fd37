"""cheems_mlx.load on an unconverted checkpoint folder: mapped in memory with the
converter's checks, same logits as transformers (tolerance as in the parity tests)."""

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import max_rel_err, tiny_cheems_dir, tiny_doge  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    tiny_cheems_dir(root)  # for its tokenizer (300 pieces)
    hf = tiny_doge(seed=4, vocab_size=300, is_moe=True, num_experts=64, num_experts_per_tok=4)
    out = root / "hf"
    hf.save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "data" / f, out / f)
    return hf, out


def test_load_maps_a_transformers_checkpoint_in_memory(hf_dir):
    import cheems_mlx

    hf, path = hf_dir
    model, tok, config = cheems_mlx.load(path, return_config=True)
    assert config["source_format"] == "doge" and config["moe_routing"] == "transformers_reshape"
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.numpy()
    assert max_rel_err(np.array(model(mx.array(ids.numpy()))), ref) <= 1e-4


def test_generate_cli_on_an_unconverted_checkpoint(hf_dir, tmp_path):
    _, path = hf_dir
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(path),
                           "--prompt", "and god said", "--max-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(broken)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


# every RoPE type mlx-lm's initialize_rope supports, as transformers 5 writes them
ROPE_TYPES = {
    "linear": dict(factor=2.0),
    "dynamic": dict(factor=2.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=16),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    "longrope": dict(short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                     long_factor=[2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5], original_max_position_embeddings=16),
}


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_every_rope_type_converts_loads_matches_transformers_and_generates(kind, hf_dir, tmp_path):
    """A converted checkpoint's config.json is never parsed by transformers (its
    ``model_type: cheems`` is unknown there and transformers' generic config class fails on
    yarn / llama3 / longrope parameters): the tokenizer loads from its own files."""
    import cheems_mlx
    from cheems_mlx.convert.convert import convert

    _, tok_src = hf_dir
    hf = tiny_doge(seed=5, vocab_size=300, max_position_embeddings=64,
                   rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **ROPE_TYPES[kind]})
    src = tmp_path / "src"
    hf.save_pretrained(src)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, src / f)
    convert(src, tmp_path / "mlx")
    model, tok = cheems_mlx.load(tmp_path / "mlx")
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))  # past 16 positions
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.numpy()
    assert max_rel_err(np.array(model(mx.array(ids.numpy()))), ref) <= 1e-4
    assert tok.encode("and god said")[-1] != tok.unk_token_id
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(tmp_path / "mlx"),
                           "--prompt", "and god said", "--max-tokens", "4", "--temp", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_folder_without_tokenizer_files_is_one_clear_line(hf_dir, tmp_path):
    import cheems_mlx
    from cheems_mlx.convert.convert import convert
    from cheems_mlx.loading import LoadError

    _, path = hf_dir
    convert(path, tmp_path / "mlx")
    for f in tmp_path.glob("mlx/tokenizer*"):
        f.unlink()
    with pytest.raises(LoadError, match="has no tokenizer"):
        cheems_mlx.load(tmp_path / "mlx")
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(tmp_path / "mlx"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "has no tokenizer" in lines[0], proc.stderr


def test_half_precision_weights_compute_in_float32_on_the_cpu():
    import cheems_mlx
    from mlx.utils import tree_flatten

    stored, _ = cheems_mlx.load(dtype="stored")  # the embedded model is float16 on disk
    auto, _ = cheems_mlx.load()
    stored_p, auto_p = dict(tree_flatten(stored.parameters())), dict(tree_flatten(auto.parameters()))
    assert any(v.dtype == mx.float16 for v in stored_p.values())
    assert all(v.dtype == mx.float32 for v in auto_p.values())
    for k, v in stored_p.items():  # the same numbers, exactly: float16 -> float32 is lossless
        assert np.array_equal(np.array(v.astype(mx.float32)), np.array(auto_p[k])), k
    ids = mx.array([[1, 50, 300, 7, 9]])
    assert max_rel_err(np.array(auto(ids)), np.array(stored(ids).astype(mx.float32))) < 2e-2


def test_explicit_dtype_and_metal_keep_what_is_asked(monkeypatch):
    from mlx.utils import tree_flatten

    from cheems_mlx import loading

    model, _ = loading.load(dtype="float32")
    note = loading.compute_dtype(model, "float16")
    params = dict(tree_flatten(model.parameters()))
    assert "float32 weights computed in float16" in note
    # the parameters Model.cast_predicate protects stay float32, the rest follow the request
    assert all((v.dtype == mx.float32) == (k.endswith(".A") or k.endswith(".keys")) for k, v in params.items())
    monkeypatch.setattr(loading.mx, "default_device", lambda: mx.gpu)  # as on a Mac: keep the stored dtype
    assert loading.compute_dtype(model, "auto") == ""
    assert dict(tree_flatten(model.parameters()))["model.word_embed.weight"].dtype == mx.float16
    with pytest.raises(loading.LoadError):
        loading.compute_dtype(model, "float64")
