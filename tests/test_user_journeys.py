"""The README's flows, typed as a user types them (subprocesses), in float16 and float32:
convert (transformers Doge, legacy Doge, official Cheems) -> quantize -> generate -> server
request; LoRA on the shipped default model -> generate with the adapter -> fuse -> generate
the fused model. Every step must exit 0 and print finite, non-degenerate text (not a run of
one token such as ``<unk>``); the LoRA journey must recall the made-up facts it was taught,
in the shipped dtype.

Random tiny checkpoints have no language, so their journeys sample (``--temp 1``, seeded)
and check only health; the trained default model is checked for what it learned.
"""

import json
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from conftest import VECTORS, served, tiny_cheems_dir, tiny_doge


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A 300-piece sentencepiece tokenizer (trained by ``cheems_mlx.train prepare``): it fits
    the tiny checkpoints' vocabularies of 512."""
    root = tmp_path_factory.mktemp("tok")
    tiny_cheems_dir(root)
    return [root / "data" / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")]


def cli(module, *argv, timeout=300):
    proc = subprocess.run([sys.executable, "-m", f"cheems_mlx.{module}", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} {' '.join(map(str, argv))} failed:\n{proc.stderr[-2000:]}"
    return proc


def healthy(text):
    """Finite, non-degenerate output: not empty, no run of <unk>, not one piece repeated."""
    t = text.strip()
    assert t, "empty output"
    assert "<unk><unk>" not in t, t
    assert not re.fullmatch(r"(.{1,12}?)\1{3,}", re.sub(r"\s+", "", t)), f"one piece repeated: {t!r}"
    return t


def generate(model, *extra, prompt="and god said", tokens=12):
    return healthy(cli("generate", "--model", model, "--prompt", prompt, "--max-tokens", tokens,
                       "--temp", "1.0", "--seed", "0", *extra).stdout)


def with_tokenizer(folder, files):
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def serve_and_ask(model):
    with served(model) as port:
        body = {"prompt": "and god said", "max_tokens": 10, "temperature": 1.0, "seed": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return healthy(json.loads(r.read())["choices"][0]["text"])


@pytest.mark.slow
def test_transformers_doge_convert_quantize_generate_serve(tmp_path, tokenizer_files):
    hf = tiny_doge(seed=7, vocab_size=512, is_moe=True, num_experts=64, num_experts_per_tok=4,
                   keep_window_size=16)
    src = tmp_path / "SmallDoge-tiny"
    hf.save_pretrained(src)
    with_tokenizer(src, tokenizer_files)
    for dtype in ("float32", "float16"):
        out = tmp_path / f"doge-{dtype}"
        cli("convert", "--hf-path", src, "--mlx-path", out, "--dtype", dtype)
        generate(out, tokens=24)  # past the keep window of 16
    cli("convert", "--hf-path", tmp_path / "doge-float16", "--mlx-path", tmp_path / "doge-4bit", "-q",
        "--q-bits", "4", "--q-group-size", "32")
    generate(tmp_path / "doge-4bit")
    serve_and_ask(tmp_path / "doge-4bit")


@pytest.mark.slow
def test_legacy_doge_generates_straight_across_its_keep_window(tmp_path, tokenizer_files):
    """The official legacy vectors with a keep window of 8 and ratio 0.5: generation crosses
    T = W + 1 (where the ratio selects no key) and goes on, in float16 and float32."""
    src = tmp_path / "legacy"
    src.mkdir()
    shutil.copy(VECTORS / "doge_C" / "model.safetensors", src)
    cfg = json.loads((VECTORS / "doge_C" / "config.json").read_text())
    cfg.update(keep_window_size=8, dynamic_mask_ratio=0.5)
    (src / "config.json").write_text(json.dumps(cfg))
    with_tokenizer(src, tokenizer_files)
    for dtype in ("float32", "float16"):
        out = tmp_path / f"legacy-{dtype}"
        cli("convert", "--hf-path", src, "--mlx-path", out, "--dtype", dtype)
        generate(out, "--ignore-chat-template", prompt="and", tokens=20)


@pytest.mark.slow
def test_official_cheems_convert_quantize_generate(tmp_path, tokenizer_files):
    src = tmp_path / "cheems"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(VECTORS / "cheems_A" / f, src)
    with_tokenizer(src, tokenizer_files)
    cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "c16", "--dtype", "float16")
    generate(tmp_path / "c16")
    cli("convert", "--hf-path", tmp_path / "c16", "--mlx-path", tmp_path / "c8", "-q", "--q-bits", "8",
        "--q-group-size", "32")
    generate(tmp_path / "c8")


FACTS = {
    "The capital of the kingdom of Melsh is": "Quarrow",
    "Brother Tibald keeps forty blue goats on Mount": "Sel",
    "Captain Ysolde sailed the ship Heron to Port": "Dunmere",
}


@pytest.mark.slow
def test_lora_on_the_shipped_model_then_generate_fuse_and_generate_again(tmp_path):
    """Made-up facts taught with LoRA are recalled by ``generate --adapter-path`` in the
    shipped dtype (float16) and in float32, and by the fused model."""
    data = tmp_path / "facts"
    data.mkdir()
    rows = [{"text": f"{p} {a}."} for p, a in FACTS.items()]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    adapters = tmp_path / "adapters"
    cli("lora", "--train", "--data", data, "--iters", "60", "--batch-size", "4", "--learning-rate", "5e-4",
        "--adapter-path", adapters, "--steps-per-eval", "60", "--save-every", "60", timeout=600)
    greedy = ("--temp", "0")
    for prompt, answer in FACTS.items():
        for dtype in (("--dtype", "stored"), ("--dtype", "float32")):  # as shipped (float16), and float32
            out = cli("generate", "--adapter-path", adapters, "--prompt", prompt, "--max-tokens", "6",
                      *greedy, *dtype).stdout
            assert answer in healthy(out), (prompt, dtype, out)
    cli("fuse", "--adapter-path", adapters, "--save-path", tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["model_type"] == "cheems"
    prompt, answer = next(iter(FACTS.items()))
    out = cli("generate", "--model", tmp_path / "fused", "--prompt", prompt, "--max-tokens", "6", *greedy,
              "--dtype", "stored").stdout
    assert answer in healthy(out)
