"""Tables and plots of the paper-claim runs (examples/paper/run_all.sh) for
docs/paper-claims.md: every number there comes from OUT, none is typed by hand.

    python examples/paper/report.py runs/paper --docs docs
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from cheems_mlx.plots import line_plot

# the paper's MQAR accuracies quoted in the issue (Wonderful Matrices, MQAR figure)
PAPER_MQAR = {(512, 128): {"attention": 0.73, "ssd": 0.72, "dma": 1.00},
              (256, 64): {"attention": 0.68, "ssd": 0.55, "dma": 1.00}}
MIXERS = ("attention", "ssd", "dma", "cheems")


def mqar_section(out: Path, docs: Path) -> list:
    results = out / "mqar" / "results.jsonl"
    rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()] if results.exists() else []
    latest = {}
    for r in rows:  # a rerun of the same setting replaces the earlier one
        latest[(r["seq_len"], r["width"], r["mixer"], r["seed"])] = r
    settings = sorted({(L, d) for L, d, _, _ in latest})
    lines = ["| length | width | kv pairs | train examples | mixer | parameters (non-embedding) | "
             "accuracy here | paper | minutes |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    panels = []
    for L, d in settings:
        series = {}
        for mixer in MIXERS:
            for (L2, d2, m, seed), r in sorted(latest.items()):
                if (L2, d2, m) != (L, d, mixer):
                    continue
                paper = PAPER_MQAR.get((L, d), {}).get(mixer)
                lines.append(
                    f"| {L} | {d} | {r['num_kv_pairs']} | {r['train_examples']:,} | {mixer} | "
                    f"{r['parameters'] - r['embedding_parameters']:,} | {r['accuracy']:.3f} | "
                    f"{'--' if paper is None else f'{paper:.2f}'} | {r['seconds'] / 60:.1f} |")
                series[f"{mixer} (seed {seed})"] = [(c["step"] * r["batch_size"], c["accuracy"]) for c in r["curve"]]
        panels.append({"title": f"MQAR, length {L}, width {d}", "xlabel": "training examples",
                       "ylabel": "held-out accuracy", "series": series})
    if panels:
        line_plot(docs / "paper" / "mqar.png", panels)
    return lines


def rope_section(out: Path, docs: Path) -> list:
    runs = {}
    for run in sorted((out / "rope").glob("*_seed*")):
        if not (run / "metrics.jsonl").exists():
            continue
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        vals = [r for r in rows if "val_loss" in r]
        if not vals:
            continue
        rope, seed = run.name.split("_seed")
        runs.setdefault(rope, {})[int(seed)] = {"val_loss": vals[-1]["val_loss"], "step": vals[-1]["step"],
                                                "train": [(r["step"], r["train_loss"]) for r in rows
                                                          if "train_loss" in r]}
    lines = ["| RoPE on B, C | seeds | steps | held-out loss (mean +- sd) | held-out perplexity (mean +- sd) |",
             "|---|---|---:|---:|---:|"]
    ppl = {}
    for rope in ("on", "off"):
        if rope not in runs:
            continue
        seeds = sorted(runs[rope])
        losses = [runs[rope][s]["val_loss"] for s in seeds]
        ppls = [math.exp(x) for x in losses]
        ppl[rope] = {s: math.exp(runs[rope][s]["val_loss"]) for s in seeds}
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        lines.append(f"| {rope} | {', '.join(map(str, seeds))} | {runs[rope][seeds[0]]['step']} | "
                     f"{statistics.mean(losses):.4f} +- {sd(losses):.4f} | "
                     f"{statistics.mean(ppls):.2f} +- {sd(ppls):.2f} |")
    if "on" in ppl and "off" in ppl:
        common = sorted(set(ppl["on"]) & set(ppl["off"]))
        gains = [100 * (1 - ppl["on"][s] / ppl["off"][s]) for s in common]
        lines += ["", f"Perplexity reduction from RoPE, paired by seed ({', '.join(map(str, common))}): "
                      + ", ".join(f"{g:+.2f}%" for g in gains)
                      + f"; mean {statistics.mean(gains):+.2f}% (paper: more than 4%)."]
    line_plot(docs / "paper" / "rope_ssd.png", [{
        "title": "SSD with / without RoPE on B and C (KJV)", "xlabel": "step", "ylabel": "train loss",
        "series": {f"rope {rope}, seed {s}": v["train"] for rope in runs for s, v in sorted(runs[rope].items())}}])
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--docs", type=Path, default=Path("docs"))
    a = p.parse_args(argv)
    (a.docs / "paper").mkdir(parents=True, exist_ok=True)
    tables = {"mqar": mqar_section(a.out, a.docs), "rope": rope_section(a.out, a.docs)}
    (a.docs / "paper" / "tables.json").write_text(json.dumps(tables, indent=2) + "\n")
    for name, lines in tables.items():
        (a.docs / "paper" / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
