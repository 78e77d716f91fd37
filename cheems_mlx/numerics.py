"""Numerics that cannot silently go bad: the compute-dtype check every loaded model passes.

float16 holds values up to 65,504. A model (or a base model with LoRA adapters trained in
float32) whose residual stream grows past that overflows to Inf and then NaN, and a
sampler fed NaN logits prints ``<unk><unk>...`` -- measured on the default model after a
LoRA run at ``--learning-rate 2e-3``: residual activations of 5.6e5, NaN logits in float16,
the right answers in float32. This module owns the check and the fix:

- ``activation_peak``: one forward pass over a probe text, layer by layer, in the model's
  own dtype: the largest |value| of the residual stream and whether the logits are finite.
- ``overflows``: the verdict for a half-precision model -- non-finite output, or a peak
  within a factor ``HEADROOM`` of the dtype's maximum (activations on other inputs vary;
  the default model peaks at ~1.1e3 on the probe, 60x below float16's maximum).
- ``ensure_safe_dtype``: what ``cheems_mlx.load`` runs after loading (adapters included):
  a float16 model that overflows is computed in a wider dtype instead -- bfloat16 on the GPU
  (float32's range at float16's speed and memory), float32 on the CPU -- with one note on
  stderr. bfloat16 models never overflow before float32 would, and float32 is the reference.
- ``check_finite_logprobs``: the generate CLI's per-token guard: a token drawn from
  non-finite logits is never printed; the error names the fix (``--dtype``).

The LoRA trainer and ``fuse`` call ``overflows`` on the model in the dtype it will be used
in, on the user's own validation text, and say what to do before the user finds out.
"""

import sys
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

HEADROOM = 8.0  # a half-precision peak must stay below max / HEADROOM
PROBE_TEXT = (
    "In the beginning God created the heaven and the earth. The quick brown fox jumps over "
    "the lazy dog, 1234567890 times. Question: what is the capital of France? Answer: Paris. "
    "def main():\n    return 42\n"
)


def model_dtype(model) -> mx.Dtype:
    """The dtype of most floating-point parameters (scales of quantized layers included)."""
    counts = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            counts[v.dtype] = counts.get(v.dtype, 0) + v.size
    return max(counts, key=counts.get) if counts else mx.float32


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def probe_ids(tokenizer, texts: Optional[Sequence[str]] = None, max_tokens: int = 256,
              vocab_size: Optional[int] = None) -> List[List[int]]:
    """Token ids of ``texts`` (default: ``PROBE_TEXT``), each cut to ``max_tokens``; ids the
    model's vocabulary does not have (a tokenizer larger than the embedding) are left out."""
    out = []
    for t in texts or [PROBE_TEXT]:
        ids = [i for i in tokenizer.encode(t) if vocab_size is None or i < vocab_size][:max_tokens]
        if ids:
            out.append(ids)
    return out


def activation_peak(model, ids: Sequence[int]) -> Tuple[float, bool]:
    """(largest |residual-stream value| over the layers, logits all finite) for one
    sequence, computed in the model's own dtype."""
    inner = model.model
    if max(ids) >= model.args.vocab_size:  # an embedding gather out of range reads garbage
        raise ValueError(f"token id {max(ids)} is outside the vocabulary of {model.args.vocab_size}")
    h = inner.word_embed(mx.array([list(ids)]))
    peaks = []
    for layer in model.layers:
        h = layer(h)
        peaks.append(mx.abs(h).max().astype(mx.float32))
    h = inner.final_layernorm(h)
    logits = inner.word_embed.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    finite = mx.isfinite(logits).all()
    peak = mx.max(mx.stack(peaks)) if peaks else mx.array(0.0)
    mx.eval(peak, finite)
    return float(peak.item()), bool(finite.item())


def overflows(model, sequences: Sequence[Sequence[int]]) -> Tuple[bool, float]:
    """(True when the model's dtype cannot hold its activations with ``HEADROOM`` to spare,
    the largest peak seen). Always False for float32 and bfloat16 (float32's range)."""
    dtype = model_dtype(model)
    if dtype != mx.float16:
        return False, 0.0
    limit = float(mx.finfo(mx.float16).max) / HEADROOM
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        for ids in sequences:
            peak, finite = activation_peak(model, ids)
            if not finite or not peak == peak or peak > limit:  # NaN compares false
                return True, float("inf") if not finite or peak != peak else peak
            worst = max(worst, peak)
    finally:
        model.train(was_training)
    return False, worst


def wider_dtype() -> mx.Dtype:
    """bfloat16 on the GPU (float32's range, half the memory); float32 on the CPU, whose
    half-precision matmuls are slower than float32 anyway."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def ensure_safe_dtype(model, tokenizer, texts: Optional[Sequence[str]] = None, log=None) -> Optional[str]:
    """Compute a float16 model that overflows in a wider dtype (``wider_dtype``), saying so
    once; returns the new dtype's name, or None when the model is left as it is."""
    from .io import cast_model

    bad, peak = overflows(model, probe_ids(tokenizer, texts, vocab_size=model.args.vocab_size))
    if not bad:
        return None
    target = wider_dtype()
    name = dtype_name(target)
    what = "non-finite values" if peak == float("inf") else f"activations of {peak:.3g}"
    (log or _stderr)(
        f"[note] this model overflows float16 ({what}; float16 holds at most 65504): computing in "
        f"{name} instead (pass --dtype to choose)"
    )
    cast_model(model, target)
    return name


def check_finite_logprobs(logprobs: mx.array, dtype: mx.Dtype, step: int) -> None:
    """Raise ``NonFiniteLogits`` when a generation step's log-probabilities hold NaN: what
    any +Inf or NaN logit (an overflow) turns them into; -Inf alone is a masked token.
    The step's log-probabilities are evaluated already: numpy reads them where it can, since
    a new MLX operation would queue behind the next step, which generation has started."""
    if logprobs.dtype == mx.bfloat16:  # numpy has no bfloat16
        bad = mx.isnan(logprobs).any().item()
    else:
        bad = np.isnan(np.asarray(logprobs)).any()
    if bad:
        name = dtype_name(dtype)
        fix = "--dtype bfloat16 or --dtype float32" if dtype == mx.float16 else "--dtype float32"
        raise NonFiniteLogits(
            f"the model produced non-finite logits (NaN / Inf) in {name} at generated token {step}; "
            f"nothing was sampled from them. Its activations overflow {name}: rerun with {fix}"
        )


class NonFiniteLogits(RuntimeError):
    """Generation stopped before sampling from NaN / Inf logits; the message names the fix."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
