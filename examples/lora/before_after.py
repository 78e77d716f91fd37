"""Fine-tune the default model on the blessing task and show the effect.

    python examples/lora/before_after.py [--model M] [--iters 300] [--targets default all ...]

For each target set: LoRA training (cheems_mlx.lora), then validation loss and greedy
exact match on 30 held-out names, before and after. Prints a table and writes
examples/lora/results.json (and the runs' loss curves under --out).
"""

import argparse
import json
import math
import re
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate

import cheems_mlx
from cheems_mlx import lora
from cheems_mlx.io import cast_model

HERE = Path(__file__).parent
TEMPLATE = re.compile(r"^The LORD bless thee, [A-Z][a-z]+, and keep thee\.$")  # any name in the slot


def score(model, tokenizer, data_dir: Path):
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import evaluate

    args = lora.parse_args(["--data", str(data_dir), "--train", "--batch-size", "4", "--mask-prompt"])
    _, valid, _ = lora.load_datasets(args, tokenizer, log=lambda *a: None)
    model.eval()
    val = evaluate(model, CacheDataset(valid), 4, -1, 128)
    tests = [json.loads(l) for l in (data_dir / "test.jsonl").read_text().splitlines()]
    hits, shape_hits, samples = 0, 0, []
    for t in tests:
        text = "".join(r.text for r in stream_generate(model, tokenizer, t["prompt"], max_tokens=24))
        ok = text.strip() == t["completion"].strip()
        hits += ok
        shape_hits += bool(TEMPLATE.match(text.strip()))
        if len(samples) < 3:
            samples.append({"prompt": t["prompt"], "output": text})
    return {"val_loss": val, "val_ppl": math.exp(val), "exact_match": hits / len(tests),
            "template_match": shape_hits / len(tests), "samples": samples}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--data", type=Path, default=HERE / "data" / "completion")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--targets", nargs="+", default=["default"])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--out", type=Path, default=Path("runs/lora_example"))
    p.add_argument("--results", type=Path, default=HERE / "results.json")
    a = p.parse_args()

    model, tokenizer = cheems_mlx.load(a.model)
    cast_model(model, "float32")  # scored in float32, like the trained runs on the CPU
    before = score(model, tokenizer, a.data)
    print(f"before: val loss {before['val_loss']:.3f}, exact match {before['exact_match']:.2f}, "
          f"template {before['template_match']:.2f}")
    results = {"model": a.model or "default", "data": str(a.data), "iters": a.iters, "learning_rate": a.lr,
               "before": before, "runs": []}
    for targets in a.targets:
        out = a.out / targets.replace(",", "+")
        argv = ["--data", str(a.data), "--train", "--adapter-path", str(out), "--iters", str(a.iters),
                "--batch-size", "8", "--learning-rate", str(a.lr), "--steps-per-eval", "50", "--mask-prompt",
                "--save-every", "100", "--val-batches", "-1", "--lora-targets", targets, "--seed", "0"]
        if a.model:
            argv += ["--model", a.model]
        args = lora.parse_args(argv)
        tic = time.perf_counter()
        lora.run(args, log=lambda *m: None)
        seconds = time.perf_counter() - tic
        tuned, tok = cheems_mlx.load(a.model)
        cast_model(tuned, "float32")
        lora.load_adapters(tuned, out)
        after = score(tuned, tok, a.data)
        n_train = sum(v.size for _, v in mx.load(str(out / "adapters.safetensors")).items())
        metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        peak = max(r.get("peak_memory_gb", 0) for r in metrics)
        results["runs"].append({"targets": targets, "adapter_parameters": n_train, "train_seconds": seconds,
                                "peak_memory_gb": peak, "after": after})
        print(f"{targets:>24}: val loss {after['val_loss']:.3f}, exact match {after['exact_match']:.2f}, "
              f"template {after['template_match']:.2f}, "
              f"{n_train:,} adapter params, {seconds:.0f}s")
    a.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
