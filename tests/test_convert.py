"""The checkpoint converter (``python -m cheems_mlx.convert``): parity of converted models
with the reference vectors and with transformers' DogeForCausalLM, output dtypes and
files, and clean failures (one ``error:`` line, exit 1, no output or temp folder left).

Most CLI runs call ``__main__.main`` in-process (same code path, no import cost); two
real subprocesses check the process-level behaviour (a successful conversion, and the
offline Hub error).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cheems_mlx.convert import FormatError
from cheems_mlx.convert.__main__ import main as cli_main
from cheems_mlx.convert.convert import MODEL_FILE, MODEL_FILE_TEXT, convert
from cheems_mlx.model import Model, ModelArgs

ROOT = Path(__file__).resolve().parents[1]


from conftest import VECTORS  # noqa: E402


# --------------------------------------------------------------------------- helpers


def load_converted(path: Path, trust_remote_code: bool = False):
    from mlx_lm.utils import load_model

    if trust_remote_code:  # goes through the cheems_model.py written next to the weights
        model, config = load_model(Path(path), trust_remote_code=True)
    else:
        model, config = load_model(
            Path(path),
            model_config={"model_file": None},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    return model, config


def logits_of(path: Path, ids: np.ndarray, **kw) -> np.ndarray:
    model, _ = load_converted(path, **kw)
    return np.array(model(mx.array(ids)).astype(mx.float32))


def assert_close(out: np.ndarray, ref: np.ndarray):
    assert out.shape == ref.shape
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(out - ref).max())
    assert diff <= tol, f"max|diff| {diff:.3g} > {tol:.3g}"


def leftovers(dst: Path):
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def run_cli(argv, capsys):
    """``python -m cheems_mlx.convert ARGV`` in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.err


def assert_fails(argv, capsys, dst: Path, *fragments):
    """Exit status 1, exactly one ``error:`` line on stderr naming ``fragments``, no
    traceback, and neither the output folder nor a temporary folder left behind."""
    rc, err = run_cli(argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert str(frag) in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert not dst.exists()
    assert leftovers(dst) == []
    return lines[0]


def copy_checkpoint(src: Path, dst: Path, names=("config.json", "model.safetensors")) -> Path:
    dst.mkdir(parents=True)
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return dst


def edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def st_header(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), n, raw


# --------------------------------------------------------------------------- tiny transformers Doge models


def _tiny_doge(path: Path, seed: int, *, moe=False, tie=False, batch=2, seq=12):
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    torch.manual_seed(seed)
    cfg = DogeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=tie,
        is_moe=moe,
        num_experts=64,
        num_experts_per_tok=4,
    )
    model = DogeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.A"):  # transformers initialises A to zero
                p.uniform_(-0.5, 0.5)
            elif "norm" in name or "residual" in name:
                p.add_(0.1 * torch.randn_like(p))
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        logits = model(ids).logits.float().numpy()
    model.save_pretrained(path)
    return model, ids.numpy().astype(np.int32), logits


TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"model_max_length": 64}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "vocab.json": '{"a": 0}',
    "merges.txt": "#version: 0.2\na b\n",
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense DogeForCausalLM saved with save_pretrained (+ some tokenizer files)."""
    path = tmp_path_factory.mktemp("src") / "doge_dense"
    model, ids, logits = _tiny_doge(path, seed=0)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return dict(path=path, model=model, ids=ids, logits=logits)


@pytest.fixture(scope="module")
def converted_dense(dense, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "dense_mlx"
    convert(dense["path"], dst)
    return dst


# --------------------------------------------------------------------------- parity: reference vectors


def test_cheems_head_vectors(tmp_path):
    dst = convert(VECTORS / "cheems_A", tmp_path / "out")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["source_format"] == "cheems" and cfg["layers_type"] == ["ssd", "attn", "ssd", "attn"]
    ids = np.load(VECTORS / "cheems_A" / "input_ids.npy")
    assert_close(logits_of(dst, ids), np.load(VECTORS / "cheems_A" / "logits.npy"))
    assert (dst / "generation_config.json").read_bytes() == (
        VECTORS / "cheems_A" / "generation_config.json"
    ).read_bytes()


def test_cheems_paper_time_vectors(tmp_path):
    src = copy_checkpoint(VECTORS / "cheems_A", tmp_path / "paper", names=("model.safetensors",))
    shutil.copyfile(VECTORS / "cheems_A" / "config_a6a4b63.json", src / "config.json")
    dst = convert(src, tmp_path / "out")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["source_format"] == "cheems_paper"
    ids = np.load(VECTORS / "cheems_A" / "input_ids.npy")
    assert_close(logits_of(dst, ids), np.load(VECTORS / "cheems_A" / "logits_a6a4b63.npy"))


def test_cli_subprocess_legacy_doge_vectors(tmp_path):
    dst = tmp_path / "doge_C_mlx"
    r = subprocess.run(
        [sys.executable, "-m", "cheems_mlx.convert", "--hf-path", str(VECTORS / "doge_C"), "--mlx-path", str(dst)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "doge_legacy" in r.stdout and str(dst) in r.stdout
    assert sorted(p.name for p in dst.iterdir()) == [
        "cheems_model.py",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    assert (dst / MODEL_FILE).read_text() == MODEL_FILE_TEXT
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_file"] == MODEL_FILE and cfg["source_format"] == "doge_legacy"
    ids = np.load(VECTORS / "doge_C" / "input_ids.npy")
    # through config.json "model_file" -> cheems_model.py, as mlx-lm --trust-remote-code does
    assert_close(logits_of(dst, ids, trust_remote_code=True), np.load(VECTORS / "doge_C" / "logits.npy"))
    assert leftovers(dst) == []


# --------------------------------------------------------------------------- parity: transformers Doge


def test_doge_safetensors(dense, converted_dense):
    dst = converted_dense
    assert_close(logits_of(dst, dense["ids"]), dense["logits"])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["source_format"] == "doge" and cfg["qk_norm"] is True
    assert cfg["model_file"] == MODEL_FILE and cfg["tie_word_embeddings"] is False
    for name, text in TOKENIZER_FILES.items():
        assert (dst / name).read_text() == text
    assert (dst / "generation_config.json").exists()
    assert all(v.dtype == mx.float32 for v in mx.load(str(dst / "model.safetensors")).values())


def test_doge_sharded_safetensors(dense, tmp_path):
    src = tmp_path / "sharded"
    dense["model"].save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists() and not (src / "model.safetensors").exists()
    dst = convert(src, tmp_path / "out")
    assert_close(logits_of(dst, dense["ids"]), dense["logits"])


def test_doge_pytorch_bin(dense, tmp_path):
    import torch

    src = copy_checkpoint(dense["path"], tmp_path / "bin", names=("config.json",))
    torch.save(dense["model"].state_dict(), src / "pytorch_model.bin")
    dst = convert(src, tmp_path / "out")
    assert_close(logits_of(dst, dense["ids"]), dense["logits"])


def test_doge_wrapped_bfloat16_pt_is_exact(dense, tmp_path):
    """{"state_dict": ...} in a .pt file, bfloat16: default dtype = the source's, values
    exact, and A (cast_predicate False) stored as float32."""
    import torch

    src = copy_checkpoint(dense["path"], tmp_path / "pt", names=("config.json",))
    sd = {k: v.to(torch.bfloat16) for k, v in dense["model"].state_dict().items()}
    torch.save({"state_dict": sd}, src / "model.pt")
    dst = convert(src, tmp_path / "out")
    out = mx.load(str(dst / "model.safetensors"))
    q = out["model.layers.0.attn.q_proj.weight"]
    assert q.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(q.astype(mx.float32)), sd["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    )
    A = out["model.layers.1.attn.A"]
    assert A.dtype == mx.float32
    np.testing.assert_array_equal(np.array(A), sd["model.layers.1.self_attn.A"].float().numpy())


def test_doge_tied_embeddings_without_lm_head(tmp_path):
    """Tied checkpoint without lm_head.weight and without tie_word_embeddings in config.json."""
    src = tmp_path / "tied"
    _, ids, logits = _tiny_doge(src, seed=1, tie=True)
    edit_config(src, tie_word_embeddings=None)
    assert "lm_head.weight" not in mx.load(str(src / "model.safetensors"))
    dst = convert(src, tmp_path / "out")
    assert json.loads((dst / "config.json").read_text())["tie_word_embeddings"] is True
    assert_close(logits_of(dst, ids), logits)


def test_doge_moe_default_routing_reproduces_transformers(tmp_path, capsys):
    src = tmp_path / "moe"
    _, ids, logits = _tiny_doge(src, seed=2, moe=True, batch=2)
    capsys.readouterr()
    dst = convert(src, tmp_path / "out")
    err = capsys.readouterr().err
    assert "transformers_reshape" in err and "--moe-routing per_token" in err
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["is_moe"] and cfg["moe_routing"] == "transformers_reshape"
    assert_close(logits_of(dst, ids), logits)

    # --moe-routing per_token is recorded and routes causally (a prefix gives the same logits)
    dst2 = convert(src, tmp_path / "out_pt", moe_routing="per_token")
    assert json.loads((dst2 / "config.json").read_text())["moe_routing"] == "per_token"
    model, _ = load_converted(dst2)
    full = np.array(model(mx.array(ids)))
    prefix = np.array(model(mx.array(ids[:, :5])))
    np.testing.assert_allclose(prefix, full[:, :5], atol=1e-5)
    assert np.abs(full - logits).max() > 1e-3  # transformers' routing is not per-token


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype(dense, tmp_path, dtype):
    dst = convert(dense["path"], tmp_path / "out", dtype=dtype)
    weights = mx.load(str(dst / "model.safetensors"))
    for k, v in weights.items():
        expected = mx.float32 if k.endswith(".A") else getattr(mx, dtype)
        assert v.dtype == expected, (k, v.dtype)
    out = logits_of(dst, dense["ids"])
    assert np.abs(out - dense["logits"]).max() < 0.1  # still the same model


def test_reconvert_native_output(dense, converted_dense, tmp_path):
    """A converted folder is itself a valid source (format "native"), e.g. to change dtype."""
    dst = convert(converted_dense, tmp_path / "again", dtype="float16")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["source_format"] == "doge" and cfg["model_file"] == MODEL_FILE
    assert mx.load(str(dst / "model.safetensors"))["model.word_embed.weight"].dtype == mx.float16
    assert (dst / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]
    assert np.abs(logits_of(dst, dense["ids"]) - dense["logits"]).max() < 0.1


# --------------------------------------------------------------------------- bad inputs


def test_truncated_safetensors(dense, tmp_path, capsys):
    src = copy_checkpoint(dense["path"], tmp_path / "src")
    header, n, raw = st_header(src / "model.safetensors")
    cut = len(raw) - 1000
    (src / "model.safetensors").write_bytes(raw[:cut])
    beyond = [k for k, v in header.items() if k != "__metadata__" and 8 + n + v["data_offsets"][1] > cut]
    dst = tmp_path / "out"
    line = assert_fails(
        ["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "model.safetensors", "truncated"
    )
    assert any(repr(k) in line for k in beyond), line


def test_corrupted_safetensors_header(dense, tmp_path, capsys):
    src = copy_checkpoint(dense["path"], tmp_path / "src")
    raw = bytearray((src / "model.safetensors").read_bytes())
    raw[8:16] = b"\x00garbage"
    (src / "model.safetensors").write_bytes(bytes(raw))
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "model.safetensors", "corrupted")


def test_safetensors_header_inconsistent_with_shape(dense, tmp_path, capsys):
    src = copy_checkpoint(dense["path"], tmp_path / "src")
    header, n, raw = st_header(src / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["shape"] = [64, 31]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text = text + b" " * (n - len(text))  # same header length, the data untouched
    (src / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + n :])
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "model.safetensors", repr(name))


def edited_checkpoint(dense, tmp_path, edit):
    """A copy of the dense checkpoint whose weights dict went through ``edit``."""
    src = copy_checkpoint(dense["path"], tmp_path / "src")
    w = mx.load(str(src / "model.safetensors"))
    edit(w)
    mx.save_safetensors(str(src / "model.safetensors"), w)
    return src


def test_missing_tensor(dense, tmp_path, capsys):
    src = edited_checkpoint(dense, tmp_path, lambda w: w.pop("model.layers.1.self_attn.o_proj.weight"))
    dst = tmp_path / "out"
    assert_fails(
        ["--hf-path", src, "--mlx-path", dst],
        capsys,
        dst,
        "missing tensor",
        "model.layers.1.attn.o_proj.weight",
        "[32, 32]",
        src / "model.safetensors",
    )


def test_misshapen_tensor(dense, tmp_path, capsys):
    src = edited_checkpoint(dense, tmp_path, lambda w: w.update({"model.layers.0.mlp.up_proj.weight": mx.zeros((60, 32))}))
    dst = tmp_path / "out"
    assert_fails(
        ["--hf-path", src, "--mlx-path", dst],
        capsys,
        dst,
        "'model.layers.0.mlp.up_proj.weight'",
        "[60, 32]",
        "[64, 32]",
        src / "model.safetensors",
    )


def test_unexpected_tensor(dense, tmp_path, capsys):
    src = edited_checkpoint(dense, tmp_path, lambda w: w.update({"model.layers.0.mlp.extra.weight": mx.zeros((4, 4))}))
    dst = tmp_path / "out"
    assert_fails(
        ["--hf-path", src, "--mlx-path", dst], capsys, dst, "'model.layers.0.mlp.extra.weight'", "unexpected"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_without_quantizing(dense, tmp_path, capsys, bad):
    """NaN / Inf in one norm weight: refused by the plain conversion (not only by -q), naming
    the tensor; nothing written."""
    name = "model.layers.1.post_attention_layernorm.weight"
    src = edited_checkpoint(dense, tmp_path, lambda w: w.update({name: w[name].at[3].add(bad)}))
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, repr(name), "NaN / Inf", "1 NaN / Inf value of 32")


def test_foreign_model_type_with_doge_looking_tensors_is_refused(dense, tmp_path, capsys):
    src = copy_checkpoint(dense["path"], tmp_path / "src")
    edit_config(src, model_type="not-a-model")
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, "'not-a-model'", "cheems, doge",
                 src / "config.json")
    edit_config(src, model_type=None)  # no model_type at all
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, "model_type=None", "cheems, doge")


def test_unrecognised_weights(tmp_path, capsys):
    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps(dict(model_type="t5", vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    )
    mx.save_safetensors(
        str(src / "model.safetensors"),
        {"shared.weight": mx.zeros((32, 8)), "encoder.block.0.layer.0.SelfAttention.q.weight": mx.zeros((8, 8))},
    )
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, "unrecognised", "'t5'", src / "config.json")


@pytest.mark.parametrize("change", [dict(num_attention_heads=8), dict(hidden_size=32)])
def test_config_contradicts_weights(tmp_path, capsys, change):
    src = copy_checkpoint(VECTORS / "doge_C", tmp_path / "src")
    edit_config(src, **change)
    dst = tmp_path / "out"
    assert_fails(
        ["--hf-path", src, "--mlx-path", dst], capsys, dst, "contradicts", "tensor", src / "model.safetensors"
    )


def test_config_errors(dense, tmp_path, capsys):
    src = copy_checkpoint(dense["path"], tmp_path / "src", names=("model.safetensors",))
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "config.json", "not found")
    (src / "config.json").write_text('{"model_type": "doge",')
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "config.json", "invalid JSON")
    # a config ModelArgs rejects
    shutil.copyfile(dense["path"] / "config.json", src / "config.json")
    edit_config(src, num_key_value_heads=3)
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "config.json", "num_key_value_heads")


def test_sharded_index_errors(dense, tmp_path, capsys):
    src = tmp_path / "sharded"
    dense["model"].save_pretrained(src, max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key, shard = "model.layers.1.mlp.down_proj.weight", index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][key] = other
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / other, repr(key))
    (src / shard).unlink()
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, shard, "does not exist")


class NotATensor:
    """An arbitrary Python object: torch.load(weights_only=True) must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickle_with_arbitrary_object_is_refused(dense, tmp_path, capsys):
    import torch

    src = copy_checkpoint(dense["path"], tmp_path / "src", names=("config.json",))
    sd = dict(dense["model"].state_dict())
    sd["extra"] = NotATensor()
    torch.save(sd, src / "pytorch_model.bin")
    dst = tmp_path / "out"
    assert_fails(["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "pytorch_model.bin", "unpickle")


def test_pytorch_without_torch(dense, tmp_path, capsys, monkeypatch):
    import torch

    src = copy_checkpoint(dense["path"], tmp_path / "src", names=("config.json",))
    torch.save(dense["model"].state_dict(), src / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" -> ImportError
    dst = tmp_path / "out"
    assert_fails(
        ["--hf-path", src, "--mlx-path", dst], capsys, dst, src / "pytorch_model.bin", 'pip install "cheems-mlx[torch]"'
    )


def test_missing_source_and_usage(tmp_path, capsys):
    dst = tmp_path / "out"
    missing = tmp_path / "no_such_checkpoint"
    assert_fails(["--hf-path", missing, "--mlx-path", dst], capsys, dst, missing, "does not exist")
    rc, err = run_cli(["--mlx-path", dst], capsys)  # argparse usage error
    assert rc == 2 and "--hf-path" in err
    rc, err = run_cli(["--hf-path", missing, "--mlx-path", dst, "--dtype", "int8"], capsys)
    assert rc == 2


def test_existing_output_and_force(dense, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    rc, err = run_cli(["--hf-path", dense["path"], "--mlx-path", dst], capsys)
    assert rc == 1 and err.strip().startswith("error: ") and "--force" in err and str(dst) in err
    assert (dst / "keep.txt").read_text() == "old" and leftovers(dst) == []

    rc, err = run_cli(["--hf-path", dense["path"], "--mlx-path", dst, "--force"], capsys)
    assert rc == 0, err
    assert not (dst / "keep.txt").exists() and leftovers(dst) == []
    assert_close(logits_of(dst, dense["ids"]), dense["logits"])


def test_failure_while_writing_keeps_old_output(dense, tmp_path, monkeypatch):
    """A failure after the temp folder exists removes it; with --force the old output stays."""
    import mlx_lm.utils

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlx_lm.utils, "save_config", broken)
    with pytest.raises(OSError):
        convert(dense["path"], dst, force=True)
    assert (dst / "keep.txt").read_text() == "old" and leftovers(dst) == []
    with pytest.raises(OSError):
        convert(dense["path"], tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path / "new") == []


def test_hub_repo_offline_subprocess(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    dst = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "cheems_mlx.convert", "--hf-path", "SmallDoge/Doge-20M", "--mlx-path", str(dst)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "'SmallDoge/Doge-20M'" in lines[0] and "not in the local cache" in lines[0]
    assert not dst.exists() and leftovers(dst) == []


def test_hub_repo_from_local_cache(dense, tmp_path, monkeypatch):
    """A Hub repo id resolves through huggingface_hub's cache when offline."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SmallDoge--tiny-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(dense["path"], repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst = convert("SmallDoge/tiny-test", tmp_path / "out")
    assert_close(logits_of(dst, dense["ids"]), dense["logits"])
    assert (dst / "tokenizer.json").exists()
    with pytest.raises(FormatError, match="not in the local cache"):
        convert("SmallDoge/not-cached", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and leftovers(tmp_path / "out2") == []


def test_library_errors_are_format_errors(dense, tmp_path):
    with pytest.raises(FormatError, match="dtype"):
        convert(dense["path"], tmp_path / "out", dtype="float64")
    with pytest.raises(FormatError, match="quantization"):
        convert(dense["path"], tmp_path / "out", quantize=True, q_bits=7)
    with pytest.raises(FormatError, match="must not be"):
        convert(dense["path"], dense["path"], force=True)
    assert (dense["path"] / "model.safetensors").exists()
