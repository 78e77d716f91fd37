"""What keeping the small sensitive layers in higher precision buys: the measurement behind
``Model.quant_predicate``.

    python examples/quantization/predicate_ablation.py --model MODEL_DIR --data PREPARED_DIR \
        [--bits 4 3] [--max-windows 0] [--json out.json]

For each bit width, the model is quantized (affine, group 64, mlx-lm's
``quantize_model``) under several policies for the layers the model's predicate protects
(SSD / DMA ``dt_proj``, the CDMoE router ``queries`` / ``router_gate``):

- ``float``   : protected layers kept in floating point (the model's predicate),
- ``8-bit``   : protected layers at 8 bits,
- ``routers-q``: routers quantized with the rest, dt_proj kept in floating point,
- ``dt-q``    : dt_proj quantized with the rest, routers kept in floating point,
- ``none``    : everything quantized at the same width (no protection).

Reported per policy: held-out perplexity (``cheems_mlx.evaluate.window_nll``, computed
in float32 through the dequantized layers), weight bytes (scales in the model's stored
dtype), and routing agreement (the share of (token, head, layer) expert sets identical
to the float model's, over the first 8 windows).
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

PROTECTED = ("dt_proj", "router_gate", "queries")
ROUTERS = ("router_gate", "queries")


def policies(group_size):
    def leaf(path):
        return path.rsplit(".", 1)[-1]

    eight = {"bits": 8, "group_size": group_size, "mode": "affine"}
    return {
        "float": lambda p, m: leaf(p) not in PROTECTED,
        "8-bit": lambda p, m: dict(eight) if leaf(p) in PROTECTED else True,
        "routers-q": lambda p, m: leaf(p) != "dt_proj",
        "dt-q": lambda p, m: leaf(p) not in ROUTERS,
        "none": lambda p, m: True,
    }


def record_routing(model):
    """Make every CDMoE remember the expert indices it routes to."""
    seen = []
    for layer in model.layers:
        ff = layer.feed_forward
        if not hasattr(ff, "route"):
            continue
        original = ff.route

        def route(x, _orig=original):
            w, idx = _orig(x)
            seen.append(idx)
            return w, idx

        ff.route = route
    return seen


def routing_agreement(ref, other):
    same, total = 0, 0
    for a, b in zip(ref, other):
        a = np.sort(np.array(a), axis=-1)
        b = np.sort(np.array(b), axis=-1)
        eq = np.all(a == b, axis=-1)
        same += int(eq.sum())
        total += eq.size
    return same / max(total, 1)


def run_routing(model, tokens, seq_len, windows=8):
    seen = record_routing(model)
    rows = np.stack([tokens[i * seq_len : (i + 1) * seq_len] for i in range(windows)]).astype(np.int32)
    mx.eval(model(mx.array(rows)))
    return [np.array(s) for s in seen]


def main(argv=None):
    from cheems_mlx.evaluate import window_nll
    from cheems_mlx.loading import load_model_only
    from mlx_lm.utils import dequantize_model, quantize_model
    import contextlib
    import io

    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=0, help="0 = all")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    tokens = np.load(a.data / "val.npy")
    base, config = load_model_only(a.model)  # quantized below in its stored dtype (scales too)
    ref = copy.deepcopy(base)
    ref.set_dtype(mx.float32)
    nll0, count = window_nll(ref, tokens, a.seq_len, max_windows=a.max_windows)
    ref_routes = run_routing(ref, tokens, a.seq_len)
    float_bytes = sum(v.nbytes for _, v in tree_flatten(base.parameters()))
    out = {"model": str(a.model), "tokens_scored": count, "float32_ppl": math.exp(nll0), "rows": []}
    print(f"float32: ppl {math.exp(nll0):.4f} ({count} tokens), {float_bytes / 1e6:.2f} MB", file=sys.stderr)
    for bits in a.bits:
        for name, pred in policies(a.group_size).items():
            model = copy.deepcopy(base)
            with contextlib.redirect_stdout(io.StringIO()):
                model, _ = quantize_model(model, dict(config), a.group_size, bits, quant_predicate=pred)
            nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            # evaluated through the dequantized layers in float32: the same function, and fast
            # on a CPU (see measure.py --eval-with)
            model = dequantize_model(model)
            model.set_dtype(mx.float32)
            nll, _ = window_nll(model, tokens, a.seq_len, max_windows=a.max_windows)
            agree = routing_agreement(ref_routes, run_routing(model, tokens, a.seq_len))
            row = {
                "bits": bits,
                "policy": name,
                "perplexity": math.exp(nll),
                "change": math.exp(nll - nll0) - 1,
                "routing_agreement": agree,
                "bytes": nbytes,
            }
            out["rows"].append(row)
            print(
                f"{bits}-bit {name:>9}: ppl {row['perplexity']:.4f} ({100 * row['change']:+.2f}%), "
                f"routing {100 * agree:.1f}%, {nbytes / 1e6:.3f} MB",
                file=sys.stderr,
            )
    lines = ["| bits | dt_proj / routers | perplexity | vs float32 | same experts | weights (MB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(
            f"| {r['bits']} | {r['policy']} | {r['perplexity']:.4f} | {100 * r['change']:+.2f}% | "
            f"{100 * r['routing_agreement']:.1f}% | {r['bytes'] / 1e6:.3f} |"
        )
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
