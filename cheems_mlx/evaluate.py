"""Held-out perplexity of a model folder.

    python -m cheems_mlx.evaluate --model MODEL --data DATA_DIR [--split val] [--seq-len 256]
    python -m cheems_mlx.evaluate --model MODEL --text held_out.txt

``--data`` reads the token file a ``cheems_mlx.train prepare`` run wrote; ``--text``
tokenizes a text file with the model's tokenizer (documents separated by blank lines,
each as ``<s> doc </s>``). The stream is cut into non-overlapping windows of
``--seq-len`` tokens; every token after the first of a window is scored.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def window_nll(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_windows: int = 0):
    n = (tokens.size - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"only {tokens.size} tokens: fewer than one window of {seq_len}")
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        rows = np.stack(
            [tokens[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n, i + batch_size))]
        ).astype(np.int32)
        x, y = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
        logits = model(x).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        count += y.size
    return total / count, count


def text_tokens(tokenizer, path: Path) -> np.ndarray:
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_special_tokens=True))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return np.array(ids, dtype=np.int64)


def main(argv=None) -> int:
    from .cli import run_cli
    from .loading import COMPUTE_DTYPES, LoadError, load

    p = argparse.ArgumentParser(prog="python -m cheems_mlx.evaluate", description="held-out perplexity")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: embedded model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a `cheems_mlx.train prepare` output folder")
    src.add_argument("--text", type=Path, help="a text file (documents separated by blank lines)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=0, help="0 = all")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="what the weights compute in (default: float32 on the CPU backend, as stored on Metal)")
    a = p.parse_args(argv)

    def body():
        if a.seq_len < 2 or a.batch_size < 1:
            raise ValueError("--seq-len must be >= 2 and --batch-size >= 1")
        model, tokenizer = load(a.model, dtype=a.dtype)
        if a.data is not None:
            f = a.data / f"{a.split}.npy"
            if not f.exists():
                raise ValueError(f"{f} not found")
            tokens = np.load(f)
        else:
            if not a.text.exists():
                raise ValueError(f"{a.text} not found")
            tokens = text_tokens(tokenizer, a.text)
        tic = time.perf_counter()
        nll, count = window_nll(model, tokens, a.seq_len, a.batch_size, a.max_windows)
        result = {
            "model": str(a.model or "default"),
            "tokens_scored": count,
            "seq_len": a.seq_len,
            "nll": nll,
            "perplexity": math.exp(nll),
            "seconds": time.perf_counter() - tic,
        }
        print(json.dumps(result, indent=2))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2) + "\n")

    return run_cli(body, (LoadError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
