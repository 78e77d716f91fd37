"""Pretraining a Cheems model from scratch on plain text.

    python -m cheems_mlx.train prepare --text corpus.txt --out data/ --vocab-size 4096
    python -m cheems_mlx.train prepare --text corpus.txt --out data/ --tokenizer some-model/  # reuse
    python -m cheems_mlx.train fit --data data/ --model-config model.json --out run/ --steps 2000
    python -m cheems_mlx.train export --run run/ --out my-model/ --dtype float16

``prepare``: documents are separated by blank lines; every ``1/val_fraction``-th
document goes to the held-out split. A sentencepiece BPE tokenizer (byte fallback)
is trained on the training split and saved in the Hugging Face layout, so mlx-lm's
tokenizer wrapper loads it. Tokens: ``<s> doc </s>`` concatenated, uint16/uint32 .npy.

``fit``: AdamW with linear warmup and cosine decay, gradient clipping, a progress bar,
validation loss every ``--eval-every`` steps, checkpoints (model + optimizer + step)
every ``--save-every`` steps, exact resume (each step's batch is drawn from an RNG
seeded by (seed, step)), ``metrics.jsonl`` and a loss-curve PNG.

``export``: a model folder (config.json, model.safetensors, tokenizer files) that
``cheems_mlx.load`` and ``python -m cheems_mlx.generate`` read.

The schedule, the evaluation, the checkpoints and the plain chat template are
``cheems_mlx.training``'s (shared with fine-tuning).
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten

from . import distributed
from .cli import add_dist_timeout, run_cli
from .model import Model, ModelArgs
from .plots import loss_curve
from .training import (
    PLAIN_CHAT_TEMPLATE,
    evaluate,
    latest_checkpoint,
    learning_rate,
    resume_checkpoint,
    save_checkpoint,
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

class TrainError(RuntimeError):
    pass


# --------------------------------------------------------------------------- prepare


def read_documents(paths: List[Path]) -> List[str]:
    docs = []
    for p in paths:
        if not p.exists():
            raise TrainError(f"text file {p} does not exist")
        text = p.read_text(encoding="utf-8", errors="strict")
        docs.extend(d.strip() for d in text.split("\n\n") if d.strip())
    if not docs:
        raise TrainError("no text found in the input files")
    return docs


def train_tokenizer(train_docs: List[str], out: Path, vocab_size: int):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp_input = out / "tokenizer_train.txt"
    sp_input.write_text("\n".join(train_docs) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(sp_input),
        model_prefix=str(out / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 20,
        num_threads=2,
        minloglevel=2,
    )
    sp_input.unlink()
    (out / "sp.vocab").unlink(missing_ok=True)
    (out / "sp.model").rename(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "chat_template": PLAIN_CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    # write the fast (tokenizer.json) form too: mlx-lm then streams with its SPM detokenizer
    AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))


def encode_documents(out: Path, docs: List[str]) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = []
    for piece in sp.encode(docs):
        ids.append(sp.bos_id())
        ids.extend(piece)
        ids.append(sp.eos_id())
    dtype = np.uint16 if sp.get_piece_size() < 65536 else np.uint32
    return np.array(ids, dtype=dtype)


def reuse_tokenizer(source: Path, out: Path, vocab_size: Optional[int]) -> int:
    """Copy the sentencepiece tokenizer of a model or prepared-data folder ``source`` into
    ``out`` (so a new model -- a draft for speculative decoding -- shares its token ids);
    returns its vocabulary size."""
    import shutil

    import sentencepiece as spm

    model_file = source / "tokenizer.model"
    if not model_file.is_file():
        raise TrainError(f"--tokenizer {source}: no tokenizer.model there (a model or prepared-data folder "
                         "with a sentencepiece tokenizer)")
    try:
        size = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise TrainError(f"--tokenizer {source}: tokenizer.model does not load ({e})") from None
    if vocab_size is not None and vocab_size != size:
        raise TrainError(f"--vocab-size {vocab_size} differs from the {size} tokens of --tokenizer {source}")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return size


def prepare(texts: List[Path], out: Path, vocab_size: Optional[int], val_fraction: float,
            tokenizer: Optional[Path] = None) -> Dict:
    """Tokenize ``texts`` into ``out``: a new tokenizer of ``vocab_size`` (default 4096) trained
    on the training split, or the one of the folder ``tokenizer``."""
    if not 0 < val_fraction < 0.5:
        raise TrainError("--val-fraction must be in (0, 0.5)")
    docs = read_documents(texts)
    every = max(2, round(1 / val_fraction))
    val_docs = [d for i, d in enumerate(docs) if i % every == every - 1]
    train_docs = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not val_docs:
        raise TrainError(f"only {len(docs)} documents: too few for a held-out split")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        vocab_size = reuse_tokenizer(tokenizer, out, vocab_size)
    else:
        vocab_size = vocab_size or 4096
        train_tokenizer(train_docs, out, vocab_size)
    train_ids, val_ids = encode_documents(out, train_docs), encode_documents(out, val_docs)
    np.save(out / "train.npy", train_ids)
    np.save(out / "val.npy", val_ids)
    info = {
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": int(train_ids.size), "val": int(val_ids.size)},
        "vocab_size": vocab_size,
        "sources": [str(p) for p in texts],
        "tokenizer": str(tokenizer) if tokenizer is not None else "trained",
    }
    (out / "data.json").write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- fit


def load_split(data: Path, name: str) -> np.ndarray:
    f = data / f"{name}.npy"
    if not f.exists():
        raise TrainError(f"{f} not found; run `python -m cheems_mlx.train prepare` first")
    return np.load(f, mmap_mode="r")


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len - 1, batch_size)
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def plot_losses(run: Path):
    loss_curve(run / "metrics.jsonl", run / "loss.png", run.name, "step", "cross-entropy (nats/token)")


def fit(
    data: Path,
    model_config: Path,
    run: Path,
    steps: int,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    min_lr: float = 3e-4,
    warmup: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_every: int = 200,
    eval_batches_n: int = 16,
    save_every: int = 200,
    seed: int = 0,
    resume: bool = False,
    log_every: int = 10,
):
    from tqdm import tqdm

    from . import distributed

    # data parallel under mlx.launch: every rank draws the same global batch and trains on
    # its rows; the gradients are averaged; rank 0 alone writes the run folder
    group = mx.distributed.init()
    N, main_rank = group.size(), group.rank() == 0
    if batch_size % N:
        raise TrainError(f"--batch-size {batch_size} is the batch of all ranks together and must be "
                         f"divisible by the {N} ranks")
    train_tokens, val_tokens = load_split(data, "train"), load_split(data, "val")
    cfg_path = run / "model_config.json"
    if main_rank:
        run.mkdir(parents=True, exist_ok=True)
    if resume:
        config = json.loads(cfg_path.read_text()) if main_rank and cfg_path.exists() else None
        config = distributed.share_object(config, group)
        if config is None:
            raise TrainError(f"--resume: {run} holds no run to resume")
    else:
        exists = distributed.share_object(main_rank and latest_checkpoint(run) is not None, group)
        if exists:
            raise TrainError(f"{run} already holds checkpoints; pass --resume or another --out")
        config = json.loads(Path(model_config).read_text())
        data_info = json.loads((data / "data.json").read_text())
        config.setdefault("vocab_size", data_info["vocab_size"])
        if main_rank:
            cfg_path.write_text(json.dumps(config, indent=2))
            (run / "train_args.json").write_text(
                json.dumps(
                    dict(data=str(data), steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                         min_lr=min_lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                         seed=seed),
                    indent=2,
                )
            )
    args = ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = Model(args)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    schedule = lambda s: learning_rate(s, lr, warmup, steps, min_lr)  # noqa: E731
    optimizer = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
    start = 0
    if resume:
        resumed = resume_checkpoint(run, model, optimizer, "model.safetensors", "step", group)
        if resumed is None:
            raise TrainError(f"--resume: no checkpoint in {run}/checkpoints")
        ckpt, start = resumed
        if main_rank:
            print(f"resuming from {ckpt} (step {start})", file=sys.stderr)
    elif main_rank:
        (run / "metrics.jsonl").write_text("")
    distributed.broadcast_parameters(model, group)  # every rank starts from rank 0's weights
    mx.eval(model.parameters())

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def train_step(x, y, lr_now):
        loss, grads = value_and_grad(model, x, y)
        if N > 1:  # every rank's rows hold seq_len tokens: the plain mean is the global mean
            grads = average_gradients(grads, group=group)
            loss = mx.distributed.all_sum(loss, group=group) / N
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
        optimizer.learning_rate = lr_now
        optimizer.update(model, grads)
        return loss, norm

    step_fn = mx.compile(train_step, inputs=state, outputs=state)
    metrics = open(run / "metrics.jsonl", "a") if main_rank else None

    def record(row):
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    if main_rank:
        print(
            f"model: {n_params / 1e6:.2f}M parameters, layers {args.layers_type}; "
            f"train {train_tokens.size:,} tokens, val {val_tokens.size:,} tokens"
            + (f"; data parallel over {N} ranks, {batch_size // N} rows each" if N > 1 else ""),
            file=sys.stderr,
        )
    bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not main_rank)
    watchdog = distributed.watchdog()
    watchdog.arm("training")
    rows = slice(group.rank() * (batch_size // N), (group.rank() + 1) * (batch_size // N))
    tic, tok_since, last = time.perf_counter(), 0, {}
    for step in range(start, steps):
        x, y = sample_batch(train_tokens, batch_size, seq_len, seed, step)  # the global batch
        loss, norm = step_fn(x[rows], y[rows], mx.array(schedule(step), dtype=mx.float32))
        mx.eval(state, loss)
        watchdog.beat()
        tok_since += x.size
        done = step + 1
        if done % log_every == 0 or done == steps:
            dt = time.perf_counter() - tic
            last = {"step": done, "train_loss": loss.item(), "lr": schedule(step),
                    "grad_norm": norm.item(), "tokens_per_sec": tok_since / dt}
            record(last)
            bar.set_postfix(loss=f"{last['train_loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
            tic, tok_since = time.perf_counter(), 0
        if done % eval_every == 0 or done == steps:
            val = evaluate(model, val_tokens, batch_size, seq_len, eval_batches_n, group, watchdog.beat)
            record({"step": done, "val_loss": val, "val_ppl": math.exp(val)})
            if main_rank:
                bar.write(f"step {done}: val loss {val:.4f}, ppl {math.exp(val):.2f}")
            tic = time.perf_counter()
        if (done % save_every == 0 or done == steps) and main_rank:
            save_checkpoint(run, f"step_{done:07d}", dict(tree_flatten(model.parameters())), "model.safetensors",
                            optimizer, {"step": done, "train_loss": last.get("train_loss")})
            plot_losses(run)
            tic = time.perf_counter()
        bar.update(1)
    watchdog.disarm()
    bar.close()
    if metrics is not None:
        metrics.close()
    return model


# --------------------------------------------------------------------------- export


def export(run: Path, data: Optional[Path], out: Path, dtype: str = "float16", force: bool = False):
    from .io import save_model_dir

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise TrainError(f"no checkpoint in {run}/checkpoints")
    config = json.loads((run / "model_config.json").read_text())
    if data is None:
        data = Path(json.loads((run / "train_args.json").read_text())["data"])
    args = ModelArgs.from_dict(config)
    model = Model(args)
    model.load_weights(str(ckpt / "model.safetensors"))
    extra = [data / f for f in TOKENIZER_FILES if (data / f).exists()]
    config = {k: v for k, v in asdict(args).items() if k != "layer_types"}
    config.update(model_type="cheems", source_format="cheems_mlx")
    return save_model_dir(model, config, out, dtype=dtype, extra_files=extra, force=force)


# --------------------------------------------------------------------------- CLI


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cheems_mlx.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="train a tokenizer (or reuse one) and tokenize a text corpus")
    pp.add_argument("--text", type=Path, nargs="+", required=True)
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--vocab-size", type=int, default=None, help="of the trained tokenizer (default 4096)")
    pp.add_argument("--tokenizer", type=Path, default=None,
                    help="reuse the sentencepiece tokenizer of this model / data folder instead of training one "
                         "(a draft model for speculative decoding must share its target's tokens)")
    pp.add_argument("--val-fraction", type=float, default=0.05)
    pf = sub.add_parser("fit", help="train a model on prepared data")
    pf.add_argument("--data", type=Path, required=True)
    pf.add_argument("--model-config", type=Path, help="JSON of ModelArgs fields (not needed with --resume)")
    pf.add_argument("--out", type=Path, required=True, help="run folder")
    pf.add_argument("--steps", type=int, required=True)
    pf.add_argument("--batch-size", type=int, default=16)
    pf.add_argument("--seq-len", type=int, default=256)
    pf.add_argument("--lr", type=float, default=3e-3)
    pf.add_argument("--min-lr", type=float, default=3e-4)
    pf.add_argument("--warmup", type=int, default=100)
    pf.add_argument("--weight-decay", type=float, default=0.1)
    pf.add_argument("--grad-clip", type=float, default=1.0)
    pf.add_argument("--eval-every", type=int, default=200)
    pf.add_argument("--eval-batches", type=int, default=16)
    pf.add_argument("--save-every", type=int, default=200)
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--resume", action="store_true")
    add_dist_timeout(pf)
    pe = sub.add_parser("export", help="write a model folder from a run's latest checkpoint")
    pe.add_argument("--run", type=Path, required=True)
    pe.add_argument("--data", type=Path, help="prepared data folder (tokenizer); default: the run's")
    pe.add_argument("--out", type=Path, required=True)
    pe.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    pe.add_argument("--force", action="store_true")
    a = p.parse_args(argv)

    def body():
        if a.cmd == "prepare":
            info = prepare(a.text, a.out, a.vocab_size, a.val_fraction, a.tokenizer)
            print(json.dumps(info, indent=2))
        elif a.cmd == "fit":
            if not a.resume and a.model_config is None:
                raise TrainError("--model-config is required unless --resume")
            if a.steps < 1 or a.batch_size < 1 or a.seq_len < 2:
                raise TrainError("--steps, --batch-size must be >= 1 and --seq-len >= 2")
            group = distributed.init(a.dist_timeout)
            fit(a.data, a.model_config, a.out, a.steps, a.batch_size, a.seq_len, a.lr, a.min_lr,
                a.warmup, a.weight_decay, a.grad_clip, a.eval_every, a.eval_batches, a.save_every,
                a.seed, a.resume)
            distributed.finish(group)
        else:
            path = export(a.run, a.data, a.out, a.dtype, a.force)
            print(f"wrote {path}")

    return run_cli(body, (TrainError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
