"""The pieces pretraining (train.py) and fine-tuning (lora.py) share: the plain chat template,
the learning-rate schedule, held-out evaluation on token windows, and checkpoints.

A checkpoint is a folder ``<run>/checkpoints/<name>/`` holding the weights (the whole model,
``model.safetensors``, for pretraining; the trainable adapters, ``adapters.safetensors``, for
fine-tuning), ``optimizer.safetensors`` (the optimizer state) and ``state.json`` (the step:
``"step"`` for pretraining, ``"iteration"`` for fine-tuning, and anything else worth
keeping); ``<run>/checkpoints/latest`` names the newest. A checkpoint is written under a
temporary name and renamed into place, so an interrupted save leaves the previous one intact.
``resume_checkpoint`` continues a run exactly: rank 0 reads the checkpoint and drops the
metrics logged after it, every rank receives rank 0's optimizer state and step.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import distributed

# A plain-text "chat" template for models pretrained on running text: messages are
# concatenated (a system message first, then a space), an assistant turn ends with </s>, and
# the generation prompt adds nothing -- so chat-style requests, mlx-lm's chat and
# completion fine-tuning datasets and --system-prompt work, and a single user message
# encodes exactly as the plain prompt does (the space after <s> gives the first word
# sentencepiece's word-start marker, as plain encoding does).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def learning_rate(step, lr, warmup, total, min_lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Non-overlapping windows from the start of the held-out split (deterministic)."""
    n = min(max_batches * batch_size, (tokens.size - 1) // seq_len)
    windows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]
    for i in range(0, n, batch_size):
        rows = np.stack(windows[i : i + batch_size]).astype(np.int32)
        yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def evaluate(model, tokens, batch_size, seq_len, max_batches, group=None, beat=None) -> float:
    """Mean cross-entropy over the held-out windows; with a group of N ranks, each rank
    takes every N-th batch's rows r::N and the sums are all_sum-ed."""
    N, r = (group.size(), group.rank()) if group is not None else (1, 0)
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x[r::N], y[r::N]
        if y.shape[0] == 0:
            continue
        logits = model(x).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        count += y.size
        if beat is not None:
            beat()
    if N > 1:
        sums = mx.distributed.all_sum(mx.array([total, count], dtype=mx.float32), group=group, stream=mx.cpu)
        total, count = sums.tolist()
    return total / max(count, 1)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Path, name: str, weights: Dict[str, mx.array], weights_file: str, optimizer,
                    state: Dict) -> Path:
    """Write the checkpoint ``run/checkpoints/<name>/`` (``weights`` as ``weights_file``, the
    optimizer state, ``state``) and make it the latest."""
    ckpt = run / "checkpoints" / name
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / weights_file), weights)
    opt_state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def latest_checkpoint(run: Path) -> Optional[Path]:
    marker = run / "checkpoints" / "latest"
    if not marker.exists():
        return None
    ckpt = run / "checkpoints" / marker.read_text().strip()
    return ckpt if ckpt.exists() else None


def resume_checkpoint(run: Path, model, optimizer, weights_file: str, step_key: str, group,
                      strict: bool = True) -> Optional[Tuple[Optional[Path], int]]:
    """Load ``run``'s latest checkpoint into ``model`` and ``optimizer`` and drop the rows of
    ``run/metrics.jsonl`` logged after its step: (checkpoint, step), the checkpoint ``None``
    on ranks other than 0; ``None`` on every rank when ``run`` has no checkpoint."""
    main_rank = group.rank() == 0
    ckpt = latest_checkpoint(run) if main_rank else None
    if not distributed.share_object(ckpt is not None, group):
        return None
    optimizer.init(model.trainable_parameters())
    start = 0
    if main_rank:
        model.load_weights(str(ckpt / weights_file), strict=strict)
        optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
        start = json.loads((ckpt / "state.json").read_text())[step_key]
        # drop metrics logged after that checkpoint so the curve has no duplicates
        metrics_file = run / "metrics.jsonl"
        rows = [l for l in metrics_file.read_text().splitlines() if l.strip()]
        metrics_file.write_text("".join(l + "\n" for l in rows if json.loads(l)[step_key] <= start))
    if group.size() > 1:
        start = distributed.share_object(start, group)
        items = tree_flatten(optimizer.state) if main_rank else None
        optimizer.state = tree_unflatten(distributed.broadcast_arrays(items, group))
    return ckpt, start
