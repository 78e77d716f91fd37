"""mlx-lm's GPTQ (``mlx_lm gptq``) on a cheems_mlx model with local calibration text,
against plain round-to-nearest (RTN) quantization of the same layout.

    python examples/quantization/gptq_compare.py --model MODEL_DIR --data PREPARED_DIR \
        --calibration-text train.txt [--bits 4] [--num-samples 64] [--sequence-length 256]

``mlx_lm gptq`` has no flag for local data: it reads ``~/.cache/mlx-lm/calibration_v5.txt``
and downloads that file only when it is missing. This script therefore runs it (with
``--trust-remote-code``, offline) under a temporary ``HOME`` whose cache holds
``--calibration-text``. GPTQ ignores ``Model.quant_predicate``: it quantizes every
``nn.Linear`` (routers and ``dt_proj`` included) with GPTQ at ``--bits`` and every
embedding (the word embedding and the CDMoE expert tables) by rounding at
``--fallback-bits`` (6). The RTN baseline reproduces exactly that layout with mlx-lm's
``quantize_model``; the table also shows the converter's own RTN output (model predicate:
routers / dt_proj at 8 bits, everything else at ``--bits``). Perplexity: held-out
windows of 256 (``cheems_mlx.evaluate.window_nll``), computed in float32 through the
dequantized layers (the same function as the quantized ones; see measure.py).
"""

import argparse
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def main(argv=None):
    from cheems_mlx.convert.convert import convert
    from cheems_mlx.evaluate import window_nll
    from cheems_mlx.loading import load_model_only
    from mlx_lm.utils import compute_bits_per_weight, dequantize_model, quantize_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="prepared folder with val.npy")
    p.add_argument("--calibration-text", type=Path, required=True)
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--fallback-bits", type=int, default=6)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=0)
    a = p.parse_args(argv)

    tokens = np.load(a.data / "val.npy")
    work = Path(tempfile.mkdtemp(prefix="cheems-gptq-"))
    rows = []
    try:
        f32 = convert(a.model, work / "float32", dtype="float32", verbose=False)
        home = work / "home"
        (home / ".cache" / "mlx-lm").mkdir(parents=True)
        shutil.copyfile(a.calibration_text, home / ".cache" / "mlx-lm" / "calibration_v5.txt")
        env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1")
        cmd = [
            sys.executable, "-m", "mlx_lm", "gptq", "--model", str(f32), "--mlx-path", str(work / "gptq"),
            "--trust-remote-code", "--bits", str(a.bits), "--group-size", "64",
            "--fallback-bits", str(a.fallback_bits), "--num-samples", str(a.num_samples),
            "--sequence-length", str(a.sequence_length),
        ]
        print("$ HOME=<tmp> " + " ".join(cmd[1:]), file=sys.stderr)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        ours = convert(f32, work / "rtn-ours", quantize=True, q_bits=a.bits, verbose=False)

        def evaluate(name, model):
            bpw = compute_bits_per_weight(model)
            model = dequantize_model(model)  # the same function, through fast float matmuls
            model.set_dtype(mx.float32)
            nll, count = window_nll(model, tokens, 256, max_windows=a.max_windows)
            rows.append((name, bpw, math.exp(nll)))
            print(f"{name}: ppl {math.exp(nll):.4f}, {bpw:.2f} bits/weight ({count} tokens)", file=sys.stderr)

        evaluate("float32", load_model_only(f32)[0])
        model, config = load_model_only(f32)
        same = lambda path, m: (  # noqa: E731
            {"bits": a.fallback_bits, "group_size": 64, "mode": "affine"} if isinstance(m, nn.Embedding) else True
        )
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = quantize_model(model, config, 64, a.bits, quant_predicate=same)
        evaluate(f"RTN, GPTQ's layout ({a.bits}-bit linears, {a.fallback_bits}-bit embeddings)", model)
        evaluate(f"GPTQ ({a.bits}-bit linears, {a.fallback_bits}-bit embeddings)", load_model_only(work / "gptq")[0])
        evaluate(f"converter -q --q-bits {a.bits} (RTN, model predicate)", load_model_only(ours)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][2]
    print("| variant | bits/weight | perplexity | vs float32 |\n|---|---:|---:|---:|")
    for name, bpw, ppl in rows:
        print(f"| {name} | {bpw:.2f} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
