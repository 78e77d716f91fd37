"""The pretraining entry point: prepare -> fit -> (interrupt, resume) -> export -> load.

The losses of a resumed run must equal those of the uninterrupted run (same seed, the
batch of step s is drawn from an RNG seeded by (seed, s), the optimizer state is
restored); float32 on the CPU is deterministic, tolerance 1e-5 for reduction order.
"""

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cheems_mlx.train import TrainError, fit, latest_checkpoint, prepare

WORDS = "the lord god said unto them and there was light in the beginning created heaven earth".split()

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "layer_types": ["ssd", "attn"],
    "ssd_chunk_size": 8,
    "is_moe": True,
    "num_experts": 16,
    "num_expert_heads": 2,
    "num_experts_per_tok": 2,
    "expert_retrieval_size": 8,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(120)]
    text = root / "corpus.txt"
    text.write_text("\n\n".join(docs) + "\n")
    info = prepare([text], root / "data", vocab_size=300, val_fraction=0.1)
    (root / "model.json").write_text(json.dumps(TINY))
    return root, info


def run_fit(root, out, **kw):
    args = dict(steps=6, batch_size=2, seq_len=16, warmup=2, eval_every=3, eval_batches_n=2,
                save_every=3, seed=1)
    args.update(kw)
    return fit(root / "data", root / "model.json", out, **args)


def train_losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


def test_prepare_splits_and_tokenizes(data):
    root, info = data
    assert info["documents"] == {"train": 108, "val": 12}
    assert (root / "data" / "tokenizer.model").exists() and (root / "data" / "tokenizer.json").exists()
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(root / "data")
    assert tok.decode(tok.encode("the lord said", add_special_tokens=False)) == "the lord said"


def test_resumed_run_reproduces_uninterrupted_losses(data, tmp_path):
    root, _ = data
    full = tmp_path / "full"
    run_fit(root, full, log_every=1)
    # an interrupted run: the same run with everything after the step-3 checkpoint lost
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000006")
    (cut / "checkpoints" / "latest").write_text("step_0000003")
    run_fit(root, cut, resume=True, log_every=1)
    (a_train, a_val), (b_train, b_val) = train_losses(full), train_losses(cut)
    assert [s for s, _ in a_train] == [s for s, _ in b_train] == list(range(1, 7))
    for (_, x), (_, y) in zip(a_train + a_val, b_train + b_val):
        assert abs(x - y) <= 1e-5 * max(1, abs(x))
    assert (full / "loss.png").stat().st_size > 1000


def test_fit_refuses_to_overwrite_a_run(data, tmp_path):
    root, _ = data
    run_fit(root, tmp_path / "r", steps=3)
    with pytest.raises(TrainError, match="already holds checkpoints"):
        run_fit(root, tmp_path / "r", steps=3)


def test_export_loads_and_generates(data, tmp_path):
    root, _ = data
    run = tmp_path / "r"
    run_fit(root, run, steps=3)
    assert latest_checkpoint(run).name == "step_0000003"
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "cheems_mlx.train", "export", "--run", str(run), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    import mlx.core as mx
    from mlx_lm import stream_generate

    import cheems_mlx

    model, tok = cheems_mlx.load(out, dtype="stored")  # as exported (the CPU computes in float32 by default)
    assert model.model.word_embed.weight.dtype == mx.float16
    assert model.layers[0].ssd.A.dtype == mx.float32  # kept in float32 by cast_predicate
    pieces = [r.text for r in stream_generate(model, tok, "the lord", max_tokens=5)]
    assert len(pieces) >= 1


def test_prepare_missing_file_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cheems_mlx.train", "prepare", "--text", str(tmp_path / "nope.txt"),
         "--out", str(tmp_path / "d")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "nope.txt" in proc.stderr


def test_prepare_can_reuse_a_models_tokenizer(data, tmp_path):
    """--tokenizer: the data of a draft model get the target's token ids (sentencepiece itself,
    loading the shipped model's tokenizer, is the reference); bad folders and a contradicting
    --vocab-size are one-line errors."""
    import sentencepiece as spm

    from cheems_mlx.loading import resolve_model_path

    root, _ = data
    shipped = resolve_model_path(None)
    out = tmp_path / "draft_data"
    info = prepare([root / "corpus.txt"], out, None, 0.05, tokenizer=shipped)
    ref = spm.SentencePieceProcessor(model_file=str(shipped / "tokenizer.model"))
    assert info["vocab_size"] == ref.get_piece_size() and info["tokenizer"] == str(shipped)
    assert json.loads((out / "data.json").read_text())["vocab_size"] == ref.get_piece_size()
    assert (out / "tokenizer.model").read_bytes() == (shipped / "tokenizer.model").read_bytes()
    docs = (root / "corpus.txt").read_text().split("\n\n")
    val = [d.strip() for i, d in enumerate(docs) if i % 20 == 19]  # --val-fraction 0.05: every 20th
    want = [t for d in val for t in [ref.bos_id(), *ref.encode(d), ref.eos_id()]]
    assert np.load(out / "val.npy").tolist() == want
    with pytest.raises(TrainError, match="--vocab-size 300 differs"):
        prepare([root / "corpus.txt"], tmp_path / "bad", 300, 0.05, tokenizer=shipped)
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.train", "prepare", "--text", str(root / "corpus.txt"),
                           "--out", str(tmp_path / "bad2"), "--tokenizer", str(tmp_path / "none")],
                          capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and "no tokenizer.model" in lines[0]
