"""The embedded default model: loads with no argument, generates offline, and is the
trained model (not random weights).

Reference: tests/data/kjv_heldout.txt holds three chapters of the held-out split (never
trained on). The shipped float16 model scores perplexity 25.1 on them (measured when it
was exported; 29.6 on the whole held-out split); a random model of this size scores ~4096.
The bound 35 leaves room for summation-order differences across machines while any
corruption of the weights or tokenizer fails it.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import cheems_mlx
from cheems_mlx.evaluate import text_tokens, window_nll

HELDOUT = Path(__file__).parent / "data" / "kjv_heldout.txt"


def test_load_without_argument_returns_the_default_model():
    model, tokenizer, config = cheems_mlx.load(return_config=True)
    assert config["source_format"] == "cheems_mlx"
    assert {layer.layer_type for layer in model.layers} == {"ssd", "attn"}
    assert config["is_moe"] and config["num_experts"] >= 1024
    ids = tokenizer.encode("In the beginning God created")
    assert ids[0] == tokenizer.bos_token_id


def test_default_model_perplexity_on_held_out_text():
    model, tokenizer = cheems_mlx.load()
    nll, count = window_nll(model, text_tokens(tokenizer, HELDOUT), seq_len=128)
    assert count > 2000
    assert np.exp(nll) < 35


def test_evaluate_cli_scores_the_held_out_text_in_each_dtype(tmp_path):
    """``python -m cheems_mlx.evaluate --text`` as a user runs it: one JSON per dtype; the
    stored float16 and float32 agree (measured on the whole held-out split: 29.627 both)."""
    ppl = {}
    for dtype in ("float32", "stored"):
        out = tmp_path / f"{dtype}.json"
        proc = subprocess.run([sys.executable, "-m", "cheems_mlx.evaluate", "--text", str(HELDOUT), "--seq-len", "128",
                               "--max-windows", "4", "--dtype", dtype, "--json", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        ppl[dtype] = json.loads(out.read_text())["perplexity"]
    assert ppl["float32"] < 35 and abs(ppl["stored"] - ppl["float32"]) < 0.01 * ppl["float32"]


def test_generate_cli_on_the_default_model_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "cheems_mlx.generate", "--prompt", "And God said", "--max-tokens", "30",
         "--temp", "0.6", "--min-p", "0.1", "--seed", "3"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 10
    assert sum(w.strip(",.;:").lower() in {"the", "and", "of", "unto", "he", "i", "that", "lord"} for w in words) >= 3


def test_chat_template_encodes_like_the_plain_prompt():
    """The default model was pretrained on running text: chat requests (server, CLI,
    fine-tuning data) must reach it as the same tokens as the plain prompt."""
    _, tok = cheems_mlx.load()
    for msgs, plain in (
        ([{"role": "user", "content": "And God said"}], "And God said"),
        ([{"role": "system", "content": "In the beginning"}, {"role": "user", "content": "God said"}],
         "In the beginning God said"),
    ):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.encode(text, add_special_tokens=False) == tok.encode(plain)
