"""Numerics that cannot silently go bad (cheems_mlx.numerics): a float16 model whose
activations overflow float16 never samples from NaN logits.

The model under test is a tiny random Cheems whose first SSD output projection is scaled by
1e5: its residual stream reaches ~1e5 (> float16's 65,504) while every weight still fits
float16 and the float32 forward is finite (the RMSNorms undo the scale). References come
from the same stored weights computed in float32 (``dtype="float32"``), never from the code
path under test; the float16 path is checked to really produce NaN, so the tests can fail.
"""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_cheems_dir


def run(*argv, module="cheems_mlx.generate"):
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(safe float16 folder, overflowing float16 folder, LoRA data folder)."""
    import cheems_mlx
    from cheems_mlx.io import save_model_dir
    from cheems_mlx.loading import read_config

    root = tmp_path_factory.mktemp("numerics")
    src = tiny_cheems_dir(root)
    config = read_config(src)
    model, _ = cheems_mlx.load(src)
    safe = save_model_dir(model, config, root / "safe16", dtype="float16",
                          extra_files=[src / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")])
    model, _ = cheems_mlx.load(src)
    layer = model.layers[0]
    layer.ssd.out_proj.weight = layer.ssd.out_proj.weight * 1e5
    hot = save_model_dir(model, config, root / "hot16", dtype="float16",
                         extra_files=[src / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")])
    data = root / "lora_data"
    data.mkdir()
    rows = [{"text": "and god said let there be light and there was light"}] * 8
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return safe, hot, data


def test_the_overflowing_model_really_gives_nan_in_float16(models):
    """Guard against a vacuous fixture: computed in float16 as stored, the logits are NaN;
    in float32 from the same stored weights they are finite."""
    import cheems_mlx

    _, hot, _ = models
    ids = mx.array([[1, 5, 9, 14, 20, 7]])
    m16, _ = cheems_mlx.load(hot, dtype="float16")
    m32, _ = cheems_mlx.load(hot, dtype="float32")
    assert not mx.isfinite(m16(ids)).all().item()
    assert mx.isfinite(m32(ids)).all().item()


def test_load_computes_an_overflowing_float16_model_in_a_wider_dtype_and_says_so(models, capsys):
    """``dtype="stored"`` is what a Mac gets by default (the stored float16); on the CPU the
    default already computes in float32, so the check has nothing to widen there."""
    import cheems_mlx
    from cheems_mlx.numerics import model_dtype

    _, hot, _ = models
    capsys.readouterr()
    model, _ = cheems_mlx.load(hot, dtype="stored")
    err = capsys.readouterr().err
    assert err.count("overflows float16") == 1 and "float32" in err
    assert model_dtype(model) == mx.float32  # the CPU's wider dtype
    ids = mx.array([[1, 5, 9, 14, 20, 7]])
    ref, _ = cheems_mlx.load(hot, dtype="float32")
    np.testing.assert_array_equal(np.array(model(ids)), np.array(ref(ids)))


def test_load_leaves_a_float16_model_that_fits(models, capsys):
    import cheems_mlx

    from cheems_mlx.numerics import model_dtype

    safe, _, _ = models
    capsys.readouterr()
    model, _ = cheems_mlx.load(safe, dtype="stored")
    assert "overflows" not in capsys.readouterr().err
    assert model_dtype(model) == mx.float16
    assert mx.isfinite(model(mx.array([[1, 5, 9, 14]]))).all().item()


def test_generate_cli_prints_the_float32_text_for_an_overflowing_float16_model(models):
    _, hot, _ = models
    args = ["--model", hot, "--prompt", "and god said", "--max-tokens", "8", "--temp", "0"]
    auto, ref = run(*args, "--dtype", "stored"), run(*args, "--dtype", "float32")
    assert auto.returncode == 0 and ref.returncode == 0, auto.stderr + ref.stderr
    assert auto.stdout == ref.stdout and "<unk>" not in auto.stdout
    assert auto.stderr.count("overflows float16") == 1


def test_generate_cli_never_prints_tokens_from_non_finite_logits(models):
    """Forced to compute in float16, the CLI stops before printing a token drawn from NaN
    logits, with one line naming the fix."""
    _, hot, _ = models
    proc = run("--model", hot, "--prompt", "and god said", "--max-tokens", "8", "--dtype", "float16")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "non-finite logits" in lines[0] and "--dtype" in lines[0]
    assert proc.stdout.strip() == ""


def _lora(base, data, adapters, *extra):
    return run("--model", base, "--train", "--data", data, "--adapter-path", adapters, "--iters", "4",
               "--batch-size", "2", "--steps-per-report", "2", "--steps-per-eval", "4", "--val-batches", "1",
               "--save-every", "2", *extra, module="cheems_mlx.lora")


def test_lora_checks_adapters_in_the_base_dtype_and_fuse_in_the_saved_dtype(models, tmp_path):
    """Adapters whose float16 use overflows (here: the output adapter of the first SSD layer
    scaled up after training) are reported by the trainer's check and by fuse; fused as
    bfloat16 the model fits and loads without a note."""
    import cheems_mlx
    from cheems_mlx.lora import check_in_deploy_dtype, parse_args
    from mlx_lm.tuner.datasets import load_dataset

    safe, _, data = models
    adapters = tmp_path / "adapters"
    proc = _lora(safe, data, adapters, "--learning-rate", "1e-4")
    assert proc.returncode == 0, proc.stderr
    assert "[check] adapters verified in float16" in proc.stdout
    w = mx.load(str(adapters / "adapters.safetensors"))
    key = "model.layers.0.ssd.out_proj.lora_b"
    w[key] = mx.ones_like(w[key]) * 5000.0  # a large update in the first layer's output
    mx.save_safetensors(str(adapters / "adapters.safetensors"), w)

    args = parse_args(["--model", str(safe), "--train", "--data", str(data), "--adapter-path", str(adapters)])
    _, tokenizer = cheems_mlx.load(safe)
    _, valid, _ = load_dataset(args, tokenizer)
    said = []
    assert check_in_deploy_dtype(args, mx.float16, valid, log=said.append) is False
    assert "overflows float16" in said[0] and "--learning-rate" in said[0]

    proc = run("--model", safe, "--adapter-path", adapters, "--save-path", tmp_path / "f16", module="cheems_mlx.fuse")
    assert proc.returncode == 0 and "overflows float16" in proc.stderr and "--dtype bfloat16" in proc.stderr
    proc = run("--model", safe, "--adapter-path", adapters, "--save-path", tmp_path / "bf16", "--dtype", "bfloat16",
               module="cheems_mlx.fuse")
    assert proc.returncode == 0 and "overflows" not in proc.stderr, proc.stderr
    gen = run("--model", tmp_path / "bf16", "--prompt", "and god said", "--max-tokens", "6", "--temp", "0")
    assert gen.returncode == 0 and "overflows" not in gen.stderr and gen.stdout.strip(), gen.stderr


def test_lora_stops_with_one_line_when_training_diverges(models, tmp_path):
    safe, _, data = models
    adapters = tmp_path / "adapters"
    proc = _lora(safe, data, adapters, "--learning-rate", "1e12", "--grad-clip", "0")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: training diverged at iteration"), proc.stderr
    assert "--learning-rate" in lines[-1]
    saved = adapters / "adapters.safetensors"
    if saved.exists():  # only a checkpoint from before the divergence
        assert all(mx.isfinite(v).all().item() for v in mx.load(str(saved)).values())
