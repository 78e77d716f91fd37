"""Train a tiny transformers ``DogeForCausalLM`` MoE (PyTorch) on a prepared token folder
and save it as a Hugging Face checkpoint, as input for the quantization measurements.

    python examples/quantization/make_tiny_doge.py --data PREPARED_DIR --out tiny-doge [--steps 300]
    python -m cheems_mlx.convert --hf-path tiny-doge --mlx-path tiny-doge-mlx --dtype float32
    python examples/quantization/measure.py --model tiny-doge-mlx --data PREPARED_DIR --out results/

``PREPARED_DIR`` is a ``cheems_mlx.train prepare`` output (``train.npy``, ``val.npy`` and
the sentencepiece tokenizer, whose files are copied next to the checkpoint so the
converted model can generate). The model: 2 layers, hidden 128, 4 attention heads (2
KV), CDMoE with 1024 rank-1 experts (8 per token) beside a shared MLP of 256, tied
embeddings; about 1.36M parameters with a 4096-token vocabulary. Trained with AdamW on
random windows of ``--seq-len`` tokens; the reference router reshape of transformers is
used both in training and, after conversion, by default in cheems_mlx.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def main(argv=None):
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    meta = json.loads((a.data / "data.json").read_text())
    train = np.load(a.data / "train.npy").astype(np.int64)
    val = np.load(a.data / "val.npy").astype(np.int64)
    config = DogeConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        keep_window_size=1024,
        is_moe=True,
        num_experts=1024,
        num_experts_per_tok=8,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = DogeForCausalLM(config)
    n_params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(a.seed)

    def batch(tokens):
        starts = rng.integers(0, tokens.size - a.seq_len - 1, a.batch_size)
        rows = np.stack([tokens[s : s + a.seq_len + 1] for s in starts])
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])

    tic = time.time()
    model.train()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - tic:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        x, y = batch(val)
        val_loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    print(f"{n_params:,} parameters; val loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f}) on one batch")
    model.save_pretrained(a.out)
    for f in TOKENIZER_FILES:
        if (a.data / f).exists():
            shutil.copyfile(a.data / f, a.out / f)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
