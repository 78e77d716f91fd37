"""LoRA / DoRA / full fine-tuning: targets, exact resume, fuse, adapters, bad input."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import tiny_cheems_dir

WORDS = "and god said let there be light in the beginning".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = tiny_cheems_dir(root)
    data = root / "jsonl"
    data.mkdir()
    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for _ in range(n):
            phrase = " ".join(rng.choice(WORDS, 4))
            out.append({"prompt": f"say {phrase}", "completion": f" {phrase} amen"})
        return out

    for name, n in (("train", 24), ("valid", 8), ("test", 8)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return root, model_dir, data


def lora_args(model_dir, data, adapter_path, *extra):
    return ["--model", str(model_dir), "--train", "--data", str(data), "--adapter-path", str(adapter_path),
            "--iters", "6", "--batch-size", "2", "--steps-per-report", "1", "--steps-per-eval", "3",
            "--save-every", "3", "--val-batches", "2", "--learning-rate", "1e-3", *extra]


def run_lora(argv):
    from cheems_mlx.lora import parse_args, run

    run(parse_args(argv), log=lambda *a: None)


def losses(adapter_path):
    rows = [json.loads(l) for l in (adapter_path / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r.get("train_loss"), r.get("val_loss")) for r in rows]


def test_targets_resolve_to_every_matrix_kind(setup):
    import cheems_mlx
    from cheems_mlx.lora import LoRAError, resolve_targets

    _, model_dir, _ = setup
    model, _ = cheems_mlx.load(model_dir)
    keys = resolve_targets(["all"], model)
    for k in ["attn.q_proj", "attn.dt_proj", "ssd.c_proj", "ssd.dt_proj", "ssd.out_proj",
              "feed_forward.gate_proj", "feed_forward.queries", "feed_forward.down_embed"]:
        assert k in keys
    assert "feed_forward.router_gate" not in keys  # this model routes with queries
    assert resolve_targets(["dt_proj"], model) == {"attn.dt_proj", "ssd.dt_proj"}
    with pytest.raises(LoRAError, match="unknown LoRA target 'qproj'"):
        resolve_targets(["qproj"], model)


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    root, model_dir, data = setup
    full = tmp_path / "full"
    run_lora(lora_args(model_dir, data, full))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "0000006")
    (cut / "checkpoints" / "latest").write_text("0000003")
    run_lora(lora_args(model_dir, data, cut, "--resume"))
    a, b = losses(full), losses(cut)
    assert [r[0] for r in a] == [r[0] for r in b]
    for (_, ta, va), (_, tb, vb) in zip(a, b):
        for x, y in ((ta, tb), (va, vb)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * max(1, abs(x)))
    assert (full / "loss.png").exists()
    assert losses(full)[-1][1] is not None


def test_fused_model_matches_model_plus_adapter(setup, tmp_path):
    import cheems_mlx
    from cheems_mlx.fuse import fuse

    _, model_dir, data = setup
    adapters = tmp_path / "a"
    run_lora(lora_args(model_dir, data, adapters, "--lora-targets", "all-linear,experts"))
    model, tok = cheems_mlx.load(model_dir, adapter_path=adapters)
    fused_dir = fuse(str(model_dir), str(adapters), tmp_path / "fused")
    fused, _ = cheems_mlx.load(fused_dir)
    ids = mx.array([tok.encode("say and god said light")])
    ref, got = np.array(model(ids)), np.array(fused(ids))
    base, _ = cheems_mlx.load(model_dir)
    assert np.abs(np.array(base(ids)) - ref).max() > 1e-4  # the adapter changed something
    assert np.abs(got - ref).max() <= 1e-4 * max(1, np.abs(ref).max())


def test_dora_and_qlora_on_a_quantized_base_with_expert_tables(setup, tmp_path):
    """mlx-lm's DoRAEmbedding cannot wrap QuantizedEmbedding; the expert tables then get
    LoRA adapters and training runs."""
    import cheems_mlx
    from cheems_mlx.io import save_model_dir
    from mlx_lm.utils import quantize_model

    _, model_dir, data = setup
    model, _, config = cheems_mlx.load(model_dir, return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    assert isinstance(model.layers[0].feed_forward.down_embed, nn.QuantizedEmbedding)
    config = {k: v for k, v in config.items() if k != "model_file"}
    q_dir = save_model_dir(model, config, tmp_path / "q4",
                           extra_files=[model_dir / "tokenizer.json", model_dir / "tokenizer_config.json",
                                        model_dir / "tokenizer.model"])
    for kind in ("dora", "lora"):
        out = tmp_path / kind
        run_lora(lora_args(q_dir, data, out, "--fine-tune-type", kind, "--lora-targets", "all"))
        rows = losses(out)
        assert all(np.isfinite(r[1]) for r in rows if r[1] is not None)
        m, _ = cheems_mlx.load(q_dir, adapter_path=out)  # adapters load back


def test_full_fine_tuning_of_the_last_layers(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "full"
    run_lora(lora_args(model_dir, data, out, "--fine-tune-type", "full", "--num-layers", "1"))
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved and all(k.startswith("model.layers.2.") for k in saved)


def cli(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "cheems_mlx.lora", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def one_error_line(proc, needle):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], proc.stderr


def test_bad_inputs(setup, tmp_path):
    _, model_dir, data = setup
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    with open(bad / "train.jsonl", "a") as f:
        f.write('{"prompt": "say light", "completion": oops}\n')
    one_error_line(cli(*lora_args(model_dir, bad, tmp_path / "x")), "train.jsonl:25: malformed JSON")

    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    (empty / "valid.jsonl").write_text("")
    one_error_line(cli(*lora_args(model_dir, empty, tmp_path / "y")), "valid.jsonl is missing or empty")

    one_error_line(cli(*lora_args(model_dir, data, tmp_path / "z", "--lora-targets", "q_proj,wq")),
                   "unknown LoRA target 'wq'")


def test_adapter_for_another_model_is_a_clear_error(setup, tmp_path):
    import cheems_mlx
    from cheems_mlx.loading import LoadError

    root, model_dir, data = setup
    adapters = tmp_path / "a"
    run_lora(lora_args(model_dir, data, adapters))
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = tiny_cheems_dir(other_root, hidden_size=32, intermediate_size=48)
    with pytest.raises(LoadError, match="does not fit this model"):
        cheems_mlx.load(other, adapter_path=adapters)
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(other),
                           "--adapter-path", str(adapters), "--prompt", "say light"],
                          capture_output=True, text=True, timeout=300)
    one_error_line(proc, "does not fit this model")


def test_long_sequences_are_truncated_with_a_warning(setup, tmp_path):
    _, model_dir, data = setup
    proc = cli(*lora_args(model_dir, data, tmp_path / "t", "--max-seq-length", "8", "--iters", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "truncated to 8" in proc.stdout + proc.stderr


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_chat_and_text_formats_train(setup, tmp_path, fmt):
    _, model_dir, data = setup
    out_data = tmp_path / fmt
    out_data.mkdir()
    for name in ("train", "valid"):
        rows = [json.loads(l) for l in (data / f"{name}.jsonl").read_text().splitlines()]
        if fmt == "chat":
            conv = [{"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r["completion"]}]} for r in rows]
        else:
            conv = [{"text": r["prompt"] + r["completion"]} for r in rows]
        (out_data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    extra = ("--mask-prompt",) if fmt == "chat" else ()
    run_lora(lora_args(model_dir, out_data, tmp_path / "a", "--iters", "4", *extra))
    rows = losses(tmp_path / "a")
    assert rows[-1][1] is not None and np.isfinite(rows[-1][1])
