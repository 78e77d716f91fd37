"""Size, held-out perplexity, top-1 agreement and decode speed of quantized variants.

    python examples/quantization/measure.py --model MODEL_DIR --data PREPARED_DIR --out OUT_DIR
    python examples/quantization/measure.py --model MODEL_DIR --text held_out.txt --out OUT_DIR

From one converted model folder (or any checkpoint the converter reads) this builds,
with ``cheems_mlx.convert`` into a temporary folder, the variants float32, float16 and
8 / 6 / 4 / 3-bit affine quantization (group size 64; the non-quantized parameters and
the scales in ``--q-dtype``, float16 by default), then for each one measures

- the weight file size (``model*.safetensors``) and mlx-lm's bits per weight,
- held-out perplexity over non-overlapping windows of ``--seq-len`` tokens
  (``cheems_mlx.evaluate.window_nll``, every token after the first of a window scored),
- top-1 agreement: how often the variant's argmax next token equals float32's, over the
  same positions,
- decode speed: tokens/s of mlx-lm's ``generate_step`` (greedy) over ``--decode-tokens``
  tokens after the same prompt, prefill and first token excluded, best of ``--repeats``.

On the CPU backend (the ``auto`` defaults) every variant is computed in float32: the
stored values (float16 weights, float16 scales) are upcast exactly after loading, so
perplexity and agreement measure the effect of the stored weights, and the decode speed
is that of the sensible way to run them on a CPU (mlx's float16 quantized matmul on CPU
is ~50x slower than its float32 one). Perplexity and agreement of the quantized variants
are computed after dequantizing their layers in memory (the same function through fast
float matmuls; the script checks this on one window and reports the relative difference,
``dequantized_eval_rel_diff``); decode speed always uses the quantized layers. On Apple
silicon the defaults are the stored dtypes and the quantized layers throughout.

Prints a markdown table and writes ``quantization.json`` and ``quantization.md`` into
``--out``. ``--data`` is a ``cheems_mlx.train prepare`` folder (``val.npy``); ``--text``
a text file tokenized with the model's tokenizer (documents separated by blank lines).
"""

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

VARIANTS = {
    "float32": dict(dtype="float32"),
    "float16": dict(dtype="float16"),
    "8-bit": dict(quantize=True, q_bits=8),
    "6-bit": dict(quantize=True, q_bits=6),
    "4-bit": dict(quantize=True, q_bits=4),
    "3-bit": dict(quantize=True, q_bits=3),
}


class Top1Recorder:
    """Wraps a model for ``window_nll``: returns its logits and keeps their argmax."""

    def __init__(self, model):
        self.model = model
        self.top1 = []

    def __call__(self, x):
        logits = self.model(x)
        self.top1.append(np.array(mx.argmax(logits, axis=-1)).reshape(-1))
        return logits


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


def decode_speed(model, prompt_ids, n_tokens: int, repeats: int) -> float:
    from mlx_lm.generate import generate_step

    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    for _ in generate_step(prompt, model, max_tokens=8, sampler=greedy):  # warm-up
        pass
    best = 0.0
    for _ in range(repeats):
        n, tic = 0, None
        for _ in generate_step(prompt, model, max_tokens=n_tokens, sampler=greedy):
            n += 1
            if n == 1:  # the first token comes out of the prefill
                tic = time.perf_counter()
        best = max(best, (n - 1) / (time.perf_counter() - tic))
    return best


def measure(a) -> dict:
    import cheems_mlx
    from cheems_mlx.convert.convert import convert
    from cheems_mlx.evaluate import text_tokens, window_nll
    from cheems_mlx.quantize import quantized_paths
    from mlx_lm.utils import compute_bits_per_weight, dequantize_model

    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "float32" not in names:
        raise SystemExit(f"error: --variants must include float32 and only use {', '.join(VARIANTS)}")
    names = ["float32"] + [v for v in names if v != "float32"]

    work = Path(tempfile.mkdtemp(prefix="cheems-quant-", dir=a.work))
    try:
        results = []
        ref_top1 = None
        tokens = None
        for name in names:
            folder = work / name
            kw = dict(VARIANTS[name])
            if kw.get("quantize"):
                kw.update(q_group_size=a.group_size, q_mode="affine", dtype=a.q_dtype)
            tic = time.perf_counter()
            convert(a.model, folder, verbose=False, **kw)
            built = time.perf_counter() - tic
            model, tokenizer = cheems_mlx.load(folder)
            bpw = compute_bits_per_weight(model)
            if a.compute_dtype == "float32":  # stored values kept; scales / activations in float32
                model.set_dtype(mx.float32)
            if tokens is None:
                if a.data is not None:
                    tokens = np.load(a.data / f"{a.split}.npy")
                else:
                    tokens = text_tokens(tokenizer, a.text)
                prompt_ids = tokenizer.encode(a.prompt)
            speed = decode_speed(model, prompt_ids, a.decode_tokens, a.repeats)
            check = None
            if a.eval_with == "dequantized" and quantized_paths(model):
                # the same function as the quantized model, through float matmuls: check it
                x = mx.array(tokens[: a.seq_len][None].astype(np.int32))
                q_logits = model(x)
                model = dequantize_model(model)
                check = mx.abs(model(x) - q_logits).max().item() / max(1.0, mx.abs(q_logits).max().item())
            rec = Top1Recorder(model)
            tic = time.perf_counter()
            nll, count = window_nll(rec, tokens, a.seq_len, a.batch_size, a.max_windows)
            eval_s = time.perf_counter() - tic
            top1 = np.concatenate(rec.top1)
            if ref_top1 is None:
                ref_top1 = top1
            row = {
                "variant": name,
                "file_bytes": weight_bytes(folder),
                "bits_per_weight": bpw,
                "nll": nll,
                "perplexity": math.exp(nll),
                "top1_agreement": float(np.mean(top1 == ref_top1)),
                "decode_tokens_per_s": speed,
                "dequantized_eval_rel_diff": check,
                "tokens_scored": count,
                "build_s": built,
                "eval_s": eval_s,
            }
            results.append(row)
            print(
                f"{name:>8}: {row['file_bytes'] / 1e6:7.2f} MB  ppl {row['perplexity']:.4f}  "
                f"top-1 {row['top1_agreement']:.4f}  decode {row['decode_tokens_per_s']:.1f} tok/s",
                file=sys.stderr,
            )
            del model, rec
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = results[0]
    for r in results:
        r["perplexity_change"] = r["perplexity"] / ref["perplexity"] - 1.0
    return {
        "model": str(a.model),
        "data": str(a.data / f"{a.split}.npy") if a.data is not None else str(a.text),
        "seq_len": a.seq_len,
        "tokens_scored": ref["tokens_scored"],
        "group_size": a.group_size,
        "mode": "affine",
        "q_dtype": a.q_dtype,
        "compute_dtype": a.compute_dtype,
        "eval_with": a.eval_with,
        "prompt": a.prompt,
        "decode_tokens": a.decode_tokens,
        "machine": f"{platform.system()} {platform.machine()}, mlx {mx.__version__}, "
        f"default device {mx.default_device()}",
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [
        "| variant | weights (MB) | bits/weight | perplexity | vs float32 | top-1 agreement | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        change = "—" if r["variant"] == "float32" else f"{100 * r['perplexity_change']:+.2f}%".replace("-0.00", "+0.00")
        lines.append(
            f"| {r['variant']} | {r['file_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | "
            f"{r['perplexity']:.4f} | {change} | {100 * r['top1_agreement']:.2f}% | "
            f"{r['decode_tokens_per_s']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"{report['tokens_scored']:,} held-out tokens ({report['data']}), windows of {report['seq_len']}; "
        f"quantized variants: affine, group {report['group_size']}, other parameters and scales "
        f"{report['q_dtype']}; computed in "
        f"{'float32 (stored values upcast)' if report['compute_dtype'] == 'float32' else 'the stored dtypes'}"
        f"{', perplexity / agreement through the dequantized layers' if report['eval_with'] == 'dequantized' else ''}; "
        f"decode: {report['decode_tokens']} greedy tokens after "
        f"{report['prompt']!r}; {report['machine']}."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (converted, or any checkpoint the converter reads)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a `cheems_mlx.train prepare` folder (uses SPLIT.npy)")
    src.add_argument("--text", type=Path, help="held-out text file (documents separated by blank lines)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--out", type=Path, required=True, help="folder for quantization.json / quantization.md")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--q-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the quantized variants' scales and non-quantized parameters")
    p.add_argument(
        "--compute-dtype",
        choices=["auto", "float32", "stored"],
        default="auto",
        help="float32: upcast the floating parameters (scales included) after loading, so every "
        "variant computes in float32 with its stored values; stored: compute in the stored dtype. "
        "auto: float32 on the CPU backend (its float16 / bfloat16 quantized matmuls are 10-50x "
        "slower than float32), stored on a GPU",
    )
    p.add_argument(
        "--eval-with",
        choices=["auto", "quantized", "dequantized"],
        default="auto",
        help="how perplexity / agreement are computed for the quantized variants: with the "
        "quantized layers, or after dequantizing them in memory (the same function through float "
        "matmuls; checked on one window, the relative difference is reported). auto: dequantized "
        "on the CPU backend, whose quantized matmul is ~20x slower than its float32 matmul",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=0, help="0 = all windows")
    p.add_argument("--prompt", default="And God said")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="decode runs per variant (best kept)")
    p.add_argument("--work", default=None, help="where the temporary variant folders go (default: system temp)")
    a = p.parse_args(argv)
    on_cpu = mx.default_device().type == mx.cpu
    if a.compute_dtype == "auto":
        a.compute_dtype = "float32" if on_cpu else "stored"
    if a.eval_with == "auto":
        a.eval_with = "dequantized" if on_cpu else "quantized"
    if a.data is not None and not (a.data / f"{a.split}.npy").exists():
        print(f"error: {a.data / (a.split + '.npy')} not found", file=sys.stderr)
        return 1
    if a.text is not None and not a.text.is_file():
        print(f"error: {a.text} not found", file=sys.stderr)
        return 1
    from cheems_mlx.convert import FormatError
    from cheems_mlx.loading import LoadError

    try:
        report = measure(a)
    except (FormatError, LoadError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    table = markdown(report)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "quantization.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
