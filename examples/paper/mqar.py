"""Multi-query associative recall (MQAR) with the paper's four mixers, equal budgets.

Trains one two-layer model per (mixer, width, sequence length) on fresh MQAR batches
(cheems_mlx.synthetic.mqar) and reports recall accuracy on a fixed held-out set.

    python examples/paper/mqar.py --mixer dma --width 64 --seq-len 256 --out runs/mqar

Mixers (each layer: mixer + gated MLP, same width, heads of 32, same depth):
- attention: causal softmax attention (our DMA layer with the dynamic mask switched off:
  A frozen at 0, so every key gets the same bias and no key is dropped);
- ssd:       SSD with RoPE on B and C in both layers;
- dma:       dynamic mask attention, keep-window rule with W = seq_len / 4;
- cheems:    the hybrid, SSD then DMA.
Appends one JSON line per run to OUT/results.jsonl (accuracy, loss curve, parameters, time).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from cheems_mlx.model import Model, ModelArgs
from cheems_mlx.synthetic import IGNORE, mqar

MIXERS = {
    "attention": ["attn", "attn"],
    "ssd": ["ssd", "ssd"],
    "dma": ["attn", "attn"],
    "cheems": ["ssd", "attn"],
}


def build(mixer: str, width: int, seq_len: int, vocab_size: int) -> Model:
    args = ModelArgs.from_dict(
        dict(
            model_type="cheems",
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=width // 32,
            num_key_value_heads=width // 32,
            head_dim=32,
            layers_type=MIXERS[mixer],
            max_position_embeddings=seq_len,
            ssd_chunk_size=64,
            keep_window_size=seq_len if mixer == "attention" else seq_len // 4,
            dynamic_mask_rule="keep_window",
            dynamic_mask_heads="kv",
            tie_word_embeddings=True,
            is_moe=False,
        )
    )
    model = Model(args)
    if mixer == "attention":  # m = exp(0 * .) = 1 for every key: plain causal attention
        for layer in model.model.layers:
            layer.attn.freeze(keys=["A"])
            layer.attn.dt_proj.freeze()
    return model


def loss_and_hits(model: Model, inputs: mx.array, targets: mx.array, positions: mx.array):
    """Cross-entropy and correct predictions at the query positions only (logits are
    computed for those rows alone: the 8k-word head is most of the cost otherwise)."""
    h = model.model(inputs)  # (b, L, d)
    b, _, d = h.shape
    rows = mx.arange(b)[:, None]
    h_q = h[rows, positions]  # (b, n, d)
    logits = model.model.word_embed.as_linear(h_q).astype(mx.float32)
    labels = targets[rows, positions]
    loss = nn.losses.cross_entropy(logits, labels, reduction="mean")
    hits = (mx.argmax(logits, axis=-1) == labels).sum()
    return loss, hits


def query_positions(targets: np.ndarray) -> np.ndarray:
    """(b, n) positions of the queries, in increasing order (every row has n)."""
    b = targets.shape[0]
    return np.nonzero(targets != IGNORE)[1].reshape(b, -1).astype(np.int32)


def run(args) -> dict:
    kv = args.num_kv_pairs or args.seq_len // 8
    mx.random.seed(args.seed)
    model = build(args.mixer, args.width, args.seq_len, args.vocab_size)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    embed = model.model.word_embed.weight.size
    mx.eval(model.parameters())

    test_rng = np.random.default_rng([args.seed, 999])
    test = mqar(test_rng, args.test_examples, args.seq_len, kv, args.vocab_size, args.power_a)

    def schedule(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * args.lr * (1 + math.cos(math.pi * progress))

    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.1)
    grad_fn = nn.value_and_grad(model, lambda m, x, y, p: loss_and_hits(m, x, y, p)[0])
    state = [model.state, optimizer.state]

    def train_step(x, y, p, lr):
        loss, grads = grad_fn(model, x, y, p)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.learning_rate = lr
        optimizer.update(model, grads)
        return loss

    step_fn = mx.compile(train_step, inputs=state, outputs=state)

    def accuracy():
        hits, total = 0, 0
        for i in range(0, args.test_examples, args.batch_size):
            x, y = test[0][i : i + args.batch_size], test[1][i : i + args.batch_size]
            p = query_positions(y)
            _, h = loss_and_hits(model, mx.array(x), mx.array(y), mx.array(p))
            hits += h.item()
            total += p.size
        return hits / total

    rng = np.random.default_rng([args.seed, 0])
    curve, tic = [], time.perf_counter()
    for step in range(args.steps):
        x, y = mqar(rng, args.batch_size, args.seq_len, kv, args.vocab_size, args.power_a)
        p = query_positions(y)
        loss = step_fn(mx.array(x), mx.array(y), mx.array(p), mx.array(schedule(step), dtype=mx.float32))
        mx.eval(state, loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = accuracy()
            curve.append({"step": step + 1, "loss": loss.item(), "accuracy": acc})
            print(f"{args.mixer} d{args.width} L{args.seq_len} step {step + 1}: "
                  f"loss {loss.item():.3f} acc {acc:.3f}", file=sys.stderr, flush=True)
    return dict(
        mixer=args.mixer, width=args.width, seq_len=args.seq_len, num_kv_pairs=kv,
        vocab_size=args.vocab_size, seed=args.seed, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, train_examples=args.steps * args.batch_size,
        test_examples=args.test_examples, parameters=trainable, embedding_parameters=embed,
        accuracy=curve[-1]["accuracy"], best_accuracy=max(c["accuracy"] for c in curve),
        curve=curve, seconds=time.perf_counter() - tic,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixer", choices=sorted(MIXERS), required=True)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-kv-pairs", type=int, default=None, help="default: seq_len / 8")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--power-a", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.width % 32:
        p.error("--width must be a multiple of 32 (heads of 32)")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
