"""``python -m cheems_mlx.bench SUITE --out DIR``: benchmarks that measure peers side by
side in one run and write JSON, a markdown table and a PNG.

Suites: ``experts`` (CDMoE vs a classic full-softmax-router MoE over the same rank-1
experts vs mlx-lm's SwitchGLU); ``ssd`` (the chunked scan vs the token recurrence vs
mlx-lm's ``ssm_attn`` at equal shapes, and a chunk-size sweep); ``attention`` (the DMA
ops path with keep-window W against dense causal attention: prefill and decode with a
long cache); ``decode`` / ``prefill`` (one run: a converted 55M Doge through mlx-lm's generation
loop vs transformers' cached forward loop on the same checkpoint, the memory-bandwidth
floor, the default model through the generate CLI and its LoRA tokens/s, with a profile
of where the time goes: ``step_profile`` counts a decode step's operations); ``kernels`` (each
module with its Metal kernels against its ops path, on a Mac; elsewhere it says it cannot);
``speculative`` (the default model: plain greedy decoding vs prompt-lookup decoding with N
proposed tokens vs mlx-lm's draft-model decoding, on copy-heavy and free text: decode
tokens/s, the share of tokens accepted from proposals and whether the tokens equal plain's).

Ratios, not absolute times, are what to compare across machines. On Linux the run
reports which BLAS MLX's float32 matmuls go through (``cheems_mlx.blas``: found and loaded
by the package itself, no ``LD_PRELOAD``).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import blas
from .plots import line_plot

SUITES = ("experts", "decode", "prefill", "attention", "ssd", "kernels", "speculative", "all")


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": blas.in_use().split(" (")[0],
    }


def machine_line(m) -> str:
    """The opening of a generated table's caption: platform, CPUs and the BLAS in use."""
    return f"Machine: {m['platform']}, {m['cpus']} CPUs, BLAS: {m['blas']}"


def timeit(fn, reps=3):
    mx.eval(fn())  # warm-up (and compilation of graphs)
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def peak_memory(fn) -> float:
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() / 2**20


# --------------------------------------------------------------------------- experts


class ClassicMoE(nn.Module):
    """The baseline of the paper's speed claim: a softmax router over all E experts,
    top-k, the same rank-1 experts as CDMoE (down/up rows, silu)."""

    def __init__(self, d, num_experts, top_k):
        super().__init__()
        self.router = nn.Linear(d, num_experts, bias=False)
        self.down_embed = nn.Embedding(num_experts, d)
        self.up_embed = nn.Embedding(num_experts, d)
        self.top_k = top_k

    def route(self, x):
        """Softmax-over-top-k weights and indices from a full router over all E experts."""
        logits = self.router(x)  # (b, l, E)
        idx = mx.stop_gradient(mx.argpartition(-logits, self.top_k - 1, axis=-1)[..., : self.top_k])
        return mx.softmax(mx.take_along_axis(logits, idx, axis=-1), axis=-1), idx

    def __call__(self, x):
        w, idx = self.route(x)
        down, up = self.down_embed(idx), self.up_embed(idx)  # (b, l, k, d)
        h = nn.silu((down @ x[..., None]).squeeze(-1)) * w
        return (h[..., None, :] @ up).squeeze(-2)


class SwitchMoE(nn.Module):
    """mlx-lm's SwitchGLU (gather_mm) with rank-1 SwiGLU experts and a softmax router."""

    def __init__(self, d, num_experts, top_k):
        super().__init__()
        from mlx_lm.models.switch_layers import SwitchGLU

        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = SwitchGLU(d, 1, num_experts)
        self.top_k = top_k

    route = ClassicMoE.route

    def __call__(self, x):
        w, idx = self.route(x)
        return (self.experts(x, idx) * w[..., None]).sum(axis=-2)


def cdmoe_experts_only(d, num_experts, top_k):
    """CDMoE's routed part (the shared MLP is the same for every design and left out)."""
    from .cdmoe import CDMoE
    from .model import ModelArgs

    args = ModelArgs(hidden_size=d, intermediate_size=8, num_attention_heads=8, num_hidden_layers=1,
                     layers_type=["attn"], is_moe=True, moe_router="router_gate", num_experts=num_experts,
                     num_experts_per_tok=top_k)
    layer = CDMoE(args)

    class RoutedOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def route(self, x):
            return self.layer.route(x)

        def __call__(self, x):
            b, l, _ = x.shape
            weights, indices = self.route(x)
            down, up = self.layer.down_embed(indices), self.layer.up_embed(indices)
            h = nn.silu((down @ x[:, :, None, :, None]).squeeze(-1)) * weights.astype(x.dtype)
            return (h.reshape(b, l, 1, -1) @ up.reshape(b, l, -1, d)).squeeze(-2)

    return RoutedOnly()


def suite_experts(out: Path, d=512, top_k=16, prefill=2048, sizes=(256, 1024, 4096, 16384, 65536)):
    rows = []
    designs = {"cdmoe": cdmoe_experts_only, "classic_moe": ClassicMoE, "switch_glu": SwitchMoE}
    for E in sizes:
        for name, make in designs.items():
            mx.random.seed(0)
            m = make(d, E, top_k)
            mx.eval(m.parameters())
            n_params = sum(v.size for _, v in tree_flatten(m.parameters()))
            xp = mx.random.normal((1, prefill, d))
            xd = mx.random.normal((1, 1, d))
            row = {
                "experts": E, "design": name, "parameters": n_params,
                "prefill_ms": 1e3 * timeit(lambda: m(xp)),
                "prefill_routing_ms": 1e3 * timeit(lambda: m.route(xp)),
                "decode_ms": 1e3 * timeit(lambda: m(xd), reps=20),
                "prefill_peak_mib": peak_memory(lambda: m(xp)),
            }
            rows.append(row)
            print(f"E={E:>6} {name:>12}: prefill {row['prefill_ms']:9.2f} ms  decode {row['decode_ms']:7.3f} ms  "
                  f"peak {row['prefill_peak_mib']:8.1f} MiB  params {n_params/1e6:7.2f}M", flush=True)
            del m
    for r in rows:
        base = next(x for x in rows if x["experts"] == r["experts"] and x["design"] == "cdmoe")
        r["prefill_vs_cdmoe"] = r["prefill_ms"] / base["prefill_ms"]
        r["decode_vs_cdmoe"] = r["decode_ms"] / base["decode_ms"]
    result = {"suite": "experts", "machine": machine(), "dtype": "float32", "hidden_size": d,
              "top_k": top_k, "prefill_tokens": prefill,
              "note": "routed part only (the shared MLP is identical across designs); SwitchGLU experts are "
                      "rank-1 SwiGLU (3d parameters each, CDMoE / classic 2d)", "rows": rows}
    (out / "experts.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
             f"{result['machine']['device']}, BLAS: {result['machine']['blas']}, float32, d={d}, top-k={top_k}, "
             f"prefill {prefill} tokens.", "",
             "| experts | design | params (M) | prefill ms | x CDMoE | of which routing ms | decode ms | x CDMoE "
             "| prefill peak MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['design']} | {r['parameters']/1e6:.2f} | {r['prefill_ms']:.1f} | "
                     f"{r['prefill_vs_cdmoe']:.2f} | {r['prefill_routing_ms']:.1f} | {r['decode_ms']:.3f} | "
                     f"{r['decode_vs_cdmoe']:.2f} | {r['prefill_peak_mib']:.0f} |")
    (out / "experts.md").write_text("\n".join(lines) + "\n")
    line_plot(out / "experts.png", [
        {"title": title, "xlabel": "experts", "ylabel": "ms", "logx": 2, "logy": True,
         "series": {name: [(r["experts"], r[key]) for r in rows if r["design"] == name] for name in designs}}
        for key, title in (("prefill_ms", f"prefill ({prefill} tokens)"), ("decode_ms", "decode (1 token)"))
    ])
    return result


# --------------------------------------------------------------------------- decode / prefill


def measure_bandwidth(mib=512) -> float:
    """Bytes per second of a large memory copy (read + write), the decode floor's unit:
    the best of numpy's memcpy and an MLX copy."""
    import numpy as np

    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = []
    for _ in range(5):
        tic = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - tic)
    a = mx.random.normal((mib * 2**20 // 4,))
    mx.eval(a)
    t_mlx = timeit(lambda: a * 1.0, reps=5)
    return 2 * src.nbytes / min(min(best), t_mlx)


DOGE_55M = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=True, attn_implementation="sdpa")


HF_CACHED_LOOP = r"""
import json, sys, time
import numpy as np, torch
from transformers import DogeForCausalLM
path, prompt, new_tokens, reps, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
hf = DogeForCausalLM.from_pretrained(path).eval()
ids = torch.tensor(np.random.default_rng(0).integers(3, 32768, prompt))[None]
runs = []
with torch.no_grad():
    for rep in range(reps + 1):  # the first is a warm-up
        tic = time.perf_counter()
        res = hf(ids, use_cache=True)
        tok = res.logits[:, -1:].argmax(-1)
        first = time.perf_counter()
        cache = res.past_key_values
        for _ in range(new_tokens - 1):
            res = hf(tok, past_key_values=cache, use_cache=True)
            cache, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
        end = time.perf_counter()
        if rep:
            runs.append((prompt / (first - tic), (new_tokens - 1) / (end - first)))
print(json.dumps(runs))
"""


def generate_cli_tps(max_tokens=128, prompt="And God said", extra=()) -> dict:
    """The default model through ``python -m cheems_mlx.generate --verbose`` in a fresh
    process, as a user runs it (no LD_PRELOAD): its reported prompt / generation tok/s."""
    import re
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--prompt", prompt, "--max-tokens",
                          str(max_tokens), "--verbose", *extra], capture_output=True, text=True, env=env, timeout=600)
    found = dict(re.findall(r"^(Prompt|Generation): \d+ tokens, ([\d.]+) tokens-per-sec", out.stderr, re.M))
    if "Generation" not in found:
        raise RuntimeError(f"generate failed: {out.stderr[-2000:]}")
    return {"prefill_tps": float(found["Prompt"]), "decode_tps": float(found["Generation"])}


def lora_tps(iters=20) -> float:
    """LoRA fine-tuning tokens/s of the default model on the example completion data
    (``python -m cheems_mlx.lora``, fresh process, no LD_PRELOAD): the last report's."""
    import re
    import subprocess
    import tempfile

    data = Path(__file__).resolve().parents[1] / "examples" / "lora" / "data" / "completion"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "cheems_mlx.lora", "--train", "--data", str(data), "--iters",
                              str(iters), "--steps-per-report", str(iters // 2), "--adapter-path", tmp],
                             capture_output=True, text=True, env=env, timeout=900)
    rates = re.findall(r"Tokens/sec ([\d.]+)", out.stdout + out.stderr)
    if not rates:
        raise RuntimeError(f"lora failed: {(out.stdout + out.stderr)[-2000:]}")
    return float(rates[-1])


def suite_generation(out: Path, prompts=(512, 2048), new_tokens=64, reps=3, threads=None):
    """A fresh random transformers Doge of ~55M parameters (16 layers, d 512, 4/2 heads,
    32k tied vocabulary) converted with cheems_mlx.convert (float32) and run through mlx-lm's
    generate_step (the loop users get), against transformers' own cached forward loop on the
    same checkpoint (prefill forward, then one forward per token with its KV cache: no
    ``generate`` overhead; PyTorch CPU, same thread count); the memory-bandwidth floor
    (every decode step reads all weights and the K/V cache once); the embedded default model
    through the generate CLI against its float32 floor; LoRA tokens/s of the default model;
    then where the time goes. Each measurement is run ``reps`` times: medians."""
    import tempfile

    import numpy as np
    from mlx_lm.generate import generate_step

    try:
        import torch
        from transformers import DogeConfig, DogeForCausalLM
    except ImportError as e:
        raise SystemExit(f"the decode / prefill suites need torch and transformers: {e}")
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    cfg = DOGE_55M
    torch.manual_seed(0)
    hf = DogeForCausalLM(DogeConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p_ in hf.named_parameters():
            if n.endswith("self_attn.A"):
                p_.copy_(torch.randn(p_.shape))
    n_params = sum(p_.numel() for p_ in hf.parameters())
    workdir = tempfile.TemporaryDirectory()
    tmp = workdir.name
    hf.save_pretrained(f"{tmp}/hf")
    from .convert.convert import convert
    from .loading import load_model_only

    convert(f"{tmp}/hf", f"{tmp}/mlx", dtype="float32", verbose=False)
    ours, _ = load_model_only(Path(f"{tmp}/mlx"))
    mx.eval(ours.parameters())
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    bandwidth = measure_bandwidth()

    def mlx_run(prompt):
        ids = mx.array(np.random.default_rng(0).integers(3, 32768, prompt))
        tic = time.perf_counter()
        first, n = None, 0
        for tok, _ in generate_step(ids, ours, max_tokens=new_tokens):
            if first is None:
                first = time.perf_counter()
            n += 1
        end = time.perf_counter()
        return prompt / (first - tic), (n - 1) / (end - first)

    def hf_run(prompt):
        """Medians from a separate process (MLX's BLAS threads stay out of torch's way), at
        ``threads`` and at 1 thread, the faster of each: on a shared machine torch's OpenMP
        threads can wait on each other for milliseconds per operation (measured here under
        load: a decode step 40 ms with 1 thread, 1 s with 2)."""
        import subprocess

        best = (0.0, 0.0)
        for n in sorted({threads, 1}):
            try:  # a run that oversubscribed threads make crawl is cut off (and said so)
                out = subprocess.run([sys.executable, "-c", HF_CACHED_LOOP, f"{tmp}/hf", str(prompt),
                                      str(new_tokens), str(reps), str(n)], capture_output=True, text=True,
                                     check=True, timeout=240)
            except subprocess.TimeoutExpired:
                hf_threads[prompt] = hf_threads.get(prompt, []) + [(n, 0.0, 0.0)]
                continue
            runs = json.loads(out.stdout.strip().splitlines()[-1])
            pre, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            hf_threads[prompt] = hf_threads.get(prompt, []) + [(n, pre, dec)]
            best = (max(best[0], pre), max(best[1], dec))
        return best

    hf_threads = {}  # prompt -> [(threads, prefill, decode)]

    def median_of(fn):
        runs = [fn() for _ in range(reps)]
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    rows = []
    mlx_run(16)  # warm-up (compilation)
    for prompt in prompts:
        for name, fn in (("cheems_mlx", lambda: median_of(lambda: mlx_run(prompt))),
                         ("transformers (torch CPU, cached forward loop, best of 1 / N threads)",
                          lambda: hf_run(prompt))):
            pre, dec = fn()
            rows.append({"model": "Doge 55M", "prompt": prompt, "system": name, "prefill_tps": pre,
                         "decode_tps": dec})
            print(f"prompt {prompt:>5} {name[:46]:>46}: prefill {pre:9.1f} tok/s  decode {dec:7.1f} tok/s", flush=True)
        kv_bytes = 4 * (prompt + new_tokens // 2) * 2 * cfg["num_key_value_heads"] * (512 // 4) * cfg["num_hidden_layers"]
        rows.append({"model": "Doge 55M", "prompt": prompt, "system": "bandwidth floor",
                     "decode_tps": bandwidth / (weight_bytes + kv_bytes)})
    for r in rows:
        base = next(x for x in rows if x["prompt"] == r["prompt"] and x["system"].startswith("transformers"))
        floor = next(x for x in rows if x["prompt"] == r["prompt"] and x["system"] == "bandwidth floor")
        r["decode_vs_transformers"] = r["decode_tps"] / base["decode_tps"]
        r["decode_of_floor"] = r["decode_tps"] / floor["decode_tps"]
        if "prefill_tps" in r:
            r["prefill_vs_transformers"] = r["prefill_tps"] / base["prefill_tps"]

    from .loading import load

    default, _ = load(dtype="float32")
    default_bytes = sum(v.nbytes for _, v in tree_flatten(default.parameters()))
    cli = [generate_cli_tps() for _ in range(reps)]
    default_row = {"model": "default (8.8M, float32 as computed)", "prompt": 4, "system": "cheems_mlx.generate CLI",
                   "prefill_tps": statistics.median(c["prefill_tps"] for c in cli),
                   "decode_tps": statistics.median(c["decode_tps"] for c in cli),
                   "floor_tps": bandwidth / default_bytes}
    default_row["decode_of_floor"] = default_row["decode_tps"] / default_row["floor_tps"]
    print(f"default model via the CLI: decode {default_row['decode_tps']:.1f} tok/s, floor "
          f"{default_row['floor_tps']:.0f} tok/s ({default_row['decode_of_floor']:.0%})", flush=True)
    lora = statistics.median(lora_tps() for _ in range(reps))
    print(f"default model LoRA: {lora:.0f} tokens/s", flush=True)
    step = step_profile(default)
    profile = profile_generation(ours, hf)
    workdir.cleanup()
    result = {"suite": "decode+prefill", "machine": machine(), "dtype": "float32", "threads": threads, "reps": reps,
              "parameters": n_params, "weight_bytes": weight_bytes, "bandwidth_gbps": bandwidth / 1e9,
              "new_tokens": new_tokens, "config": cfg, "rows": rows, "transformers_by_threads": hf_threads,
              "default_model": default_row,
              "lora_tokens_per_second": lora, "default_step": step, "profile": profile}
    (out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {result['machine']['platform']}, {threads} threads, BLAS: {result['machine']['blas']}, "
             f"float32, no LD_PRELOAD; medians of {reps} runs. A fresh random transformers Doge of "
             f"{n_params / 1e6:.1f}M parameters (d 512, 16 layers, 4/2 heads, vocab 32768, tied), "
             f"{new_tokens} greedy tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s.", "",
             "| prompt | system | prefill tok/s | x transformers | decode tok/s | x transformers | of floor |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pre = f"{r['prefill_tps']:.0f} | {r['prefill_vs_transformers']:.2f}" if "prefill_tps" in r else "-- | --"
        lines.append(f"| {r['prompt']} | {r['system']} | {pre} | {r['decode_tps']:.1f} | "
                     f"{r['decode_vs_transformers']:.2f} | {r['decode_of_floor']:.2f} |")
    lines += ["", "transformers per thread count (prefill / decode tok/s): " + "; ".join(
        f"prompt {p}: " + ", ".join(f"{n} thread{'s' * (n > 1)} " + (f"{pre:.0f} / {dec:.1f}" if dec else "cut off")
                                    for n, pre, dec in runs)
        for p, runs in hf_threads.items()) + "."]
    d = default_row
    lines += ["", f"The embedded default model through `python -m cheems_mlx.generate --verbose` (128 tokens; "
                  f"computed in float32, {default_bytes / 1e6:.1f} MB): decode **{d['decode_tps']:.0f} tok/s**, "
                  f"float32 floor {d['floor_tps']:.0f} tok/s: **{d['decode_of_floor']:.0%} of the floor**. "
                  f"LoRA fine-tuning (`python -m cheems_mlx.lora`, example completion data): "
                  f"**{lora:.0f} tokens/s**.", "",
              "One decode step of the default model (64-token cache) in each form (`CHEEMS_MLX_COMPILE` "
              "= 1, the default / layers / 0):", "", "| form | MLX operations | ms |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['ops']} | {v['step_ms']:.2f} |" for k, v in step["forms"].items()]
    lines += ["", "| part | ms |", "|---|---:|"]
    lines += [f"| {k} (per-layer compiled) | {v:.2f} |" for k, v in step["layers_ms"].items()]
    lines += [f"| {k} (each module eager) | {v:.2f} |" for k, v in step["modules_uncompiled_ms"].items()]
    lines += ["", "Where the time goes (Doge 55M: decode against a 512-token cache; prefill attention core at "
                  "2,048 tokens):", "", "| part | ms | GB/s |", "|---|---:|---:|"]
    for r in profile:
        lines.append(f"| {r['part']} | {r['ms']:.2f} | {r['gbps']:.1f} |" if "gbps" in r else
                     f"| {r['part']} | {r['ms']:.2f} | |")
    (out / "generation.md").write_text("\n".join(lines) + "\n")
    return result


def count_ops(*outputs) -> dict:
    """The primitives MLX would run to evaluate ``outputs`` (their unevaluated graph), by
    name: read off ``mx.export_to_dot``. A compiled function counts as one."""
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(f"{tmp}/g.dot", *outputs)
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', Path(f"{tmp}/g.dot").read_text())
    counts = {}
    for name in labels:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@contextlib.contextmanager
def compile_mode(mode: str):
    """CHEEMS_MLX_COMPILE=mode inside the block (model.compiled_decode_enabled reads it)."""
    previous = os.environ.get("CHEEMS_MLX_COMPILE")
    os.environ["CHEEMS_MLX_COMPILE"] = mode
    try:
        yield
    finally:
        os.environ.pop("CHEEMS_MLX_COMPILE") if previous is None else os.environ.update(CHEEMS_MLX_COMPILE=previous)


STEP_MODES = {"1": "whole-model compiled step", "layers": "per-layer compiled functions", "0": "every operation eager"}


def step_profile(model, prompt=64, reps=15) -> dict:
    """One decode step of ``model`` against a ``prompt``-token cache in each form
    (``STEP_MODES``: the whole model as one compiled function, as shipped; each layer's
    compiled functions, the form before; every operation eager): the MLX operations it runs
    (by kind) and its median time; then the time per part, each part evaluated on its own:
    per layer type ("ssd layers", "attn layers") with the per-layer compiled functions, and
    per module eagerly (norms, residuals, mixers, feed-forwards). "rest" is the embedding,
    the head and the glue. Per-part times include one evaluation each, so they add up to a
    little more than the step."""
    from .model import DecoderLayer

    def fresh():
        cache = model.make_cache()
        mx.eval(model(mx.arange(3, 3 + prompt)[None] % model.args.vocab_size, cache=cache))
        return cache

    tok = mx.array([[5]])
    forms = {}
    for mode, name in STEP_MODES.items():
        with compile_mode(mode):
            mx.eval(model(tok, cache=fresh()))  # traces the compiled functions
            ops = count_ops(model(tok, cache=fresh()))
            times = []
            for cache in [fresh() for _ in range(reps)]:
                tic = time.perf_counter()
                mx.eval(model(tok, cache=cache))
                times.append(time.perf_counter() - tic)
        forms[name] = {"ops": sum(ops.values()), "ops_by_kind": ops, "step_ms": 1e3 * statistics.median(times)}

    def parts(name_of: dict) -> dict:
        """ms per part: ``name_of`` maps module classes to a function naming an instance."""
        spent, originals, depth = {}, {cls: cls.__call__ for cls in name_of}, [0]

        def timed(cls):
            def call(self, *args, **kwargs):
                if depth[0]:
                    return originals[cls](self, *args, **kwargs)
                depth[0] += 1
                tic = time.perf_counter()
                out = originals[cls](self, *args, **kwargs)
                mx.eval(out)
                name = name_of[cls](self)
                spent.setdefault(name, [0.0] * reps)[rep] += time.perf_counter() - tic
                depth[0] -= 1
                return out
            return call

        per_step, caches = [], [fresh() for _ in range(reps)]
        try:
            for cls in name_of:
                cls.__call__ = timed(cls)
            for rep, cache in enumerate(caches):
                tic = time.perf_counter()
                mx.eval(model(tok, cache=cache))
                per_step.append(time.perf_counter() - tic)
        finally:
            for cls, f in originals.items():
                cls.__call__ = f
        ms = {name: 1e3 * statistics.median(v) for name, v in spent.items()}
        ms["rest"] = 1e3 * statistics.median(per_step) - sum(ms.values())
        return ms

    with compile_mode("layers"):
        by_layer = parts({DecoderLayer: lambda layer: f"{layer.layer_type} layers"})
    modules = {}
    for layer in model.layers:
        modules[type(layer.pre_sequence_layernorm)] = lambda m: "norms"
        modules[type(layer.post_sequence_residual)] = lambda m: "residuals"
        modules[type(layer.mixer)] = lambda m: f"{type(m).__name__}"
        modules[type(layer.feed_forward)] = lambda m: f"feed-forward ({type(m).__name__})"
    with compile_mode("0"):
        by_module = parts(modules)
    shipped = forms[STEP_MODES["1"]]
    return {"ops": shipped["ops"], "ops_by_kind": shipped["ops_by_kind"], "step_ms": shipped["step_ms"],
            "forms": forms, "layers_ms": by_layer, "modules_uncompiled_ms": by_module}


def _matrices(model) -> list:
    """The weight matrices one decode step multiplies by: every Linear, plus the tied
    embedding used as the output head."""
    mats = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(w.shape[0] > 8192 for w in mats):  # tied head: the embedding as a Linear
        mats += [m.weight for _, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return mats


def profile_generation(ours, hf, prompt=512, prefill=2048):
    """Where the time goes. Decode: one step against a ``prompt``-token cache, split into
    the weight matrix-vector products (each timed alone, MLX and PyTorch on the same
    matrices) and the rest. Prefill: the attention core of one layer at ``prefill`` tokens:
    the DMA attention as our ops path runs it, MLX's causal SDPA and PyTorch's."""
    import numpy as np
    import torch

    from .dma import mask_min

    def step_ms(model):
        cache = model.make_cache()
        ids = mx.array(np.random.default_rng(0).integers(3, 32768, (1, prompt)))
        mx.eval(model(ids, cache=cache))
        tok = ids[:, -1:]
        times = []
        for _ in range(12):
            tic = time.perf_counter()
            mx.eval(model(tok, cache=cache))
            times.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(1)
        return 1e3 * statistics.median(times[2:])

    def gemv_ms(mats):
        total = 0.0
        for w in mats:
            x = mx.random.normal((1, w.shape[1]))
            total += timeit(lambda: x @ w.T, reps=7)
        return 1e3 * total

    def torch_gemv_ms(mats):
        total = 0.0
        with torch.no_grad():
            for w in mats:
                tw = torch.from_numpy(np.array(w))
                x = torch.randn(1, w.shape[1])
                x @ tw.T
                times = []
                for _ in range(7):
                    tic = time.perf_counter()
                    x @ tw.T
                    times.append(time.perf_counter() - tic)
                total += statistics.median(times)
        return 1e3 * total

    rows = []
    for name, model in (("cheems_mlx", ours),):
        mats = _matrices(model)
        nbytes = sum(w.nbytes for w in mats)
        total, gemv = step_ms(model), gemv_ms(mats)
        rows.append({"part": f"decode step, {name}", "ms": total})
        rows.append({"part": f"  weight matrix-vector products alone (MLX, {nbytes / 1e6:.0f} MB)", "ms": gemv,
                     "gbps": nbytes / gemv / 1e6})
        rows.append({"part": "  everything else (norms, rope, masks, softmax, cache, op dispatch)",
                     "ms": total - gemv})
    mats = _matrices(ours)
    nbytes = sum(w.nbytes for w in mats)
    tg = torch_gemv_ms(mats)
    rows.append({"part": f"same matrix-vector products in PyTorch ({torch.get_num_threads()} threads)", "ms": tg,
                 "gbps": nbytes / tg / 1e6})

    attn = ours.model.layers[0].attn
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    L = prefill
    q, k, v = (mx.random.normal((1, h, L, P)) for h in (H, Hkv, Hkv))
    bias = mx.random.uniform(shape=(1, attn.num_mask_heads, L))
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))[None, None]
    mx.eval(q, k, v, bias, causal)
    sdpa = mx.fast.scaled_dot_product_attention
    rows.append({"part": f"prefill {L}: DMA attention as run (ops_attention: 256-query blocks, "
                         "dma.masked_attention), one layer",
                 "ms": 1e3 * timeit(lambda: attn.ops_attention(q, k, v, bias, causal, None, mask_min(mx.float32)))})
    rows.append({"part": f"prefill {L}: MLX SDPA, causal, one layer",
                 "ms": 1e3 * timeit(lambda: sdpa(q, k, v, scale=P**-0.5, mask="causal"))})
    tq, tk, tv = (torch.from_numpy(np.array(a)) for a in (q, k, v))
    with torch.no_grad():
        F = torch.nn.functional
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
            times.append(time.perf_counter() - tic)
    rows.append({"part": f"prefill {L}: PyTorch SDPA, causal, one layer", "ms": 1e3 * statistics.median(times)})
    for r in rows:
        print(f"{r['part']:>80}: {r['ms']:9.2f} ms" + (f"  {r['gbps']:.1f} GB/s" if "gbps" in r else ""), flush=True)
    return rows


# --------------------------------------------------------------------------- attention


def suite_attention(out: Path, lengths=(1024, 4096, 16384), windows=(256, 1024), d=512, heads=8, kv_heads=4,
                    step=2048):
    """One attention layer: prefill of L tokens in mlx-lm's 2,048-token steps through the
    cache, then the time of one decode step against the L-token cache."""
    from mlx_lm.models.base import create_causal_mask
    from mlx_lm.models.cache import KVCache

    from .dma import DynamicMaskAttention
    from .model import ModelArgs

    class DenseAttention(nn.Module):
        def __init__(self):
            super().__init__()
            P = d // heads
            self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv_heads * P, bias=False)
            self.v_proj, self.o_proj = nn.Linear(d, kv_heads * P, bias=False), nn.Linear(d, d, bias=False)
            self.rope = nn.RoPE(P)

        def __call__(self, x, cache):
            b, l, _ = x.shape
            P = d // heads
            q = self.q_proj(x).reshape(b, l, heads, P).transpose(0, 2, 1, 3)
            k = self.k_proj(x).reshape(b, l, kv_heads, P).transpose(0, 2, 1, 3)
            v = self.v_proj(x).reshape(b, l, kv_heads, P).transpose(0, 2, 1, 3)
            q, k = self.rope(q, offset=cache[0].offset), self.rope(k, offset=cache[0].offset)
            mask = create_causal_mask(l, cache[0].offset) if l > 1 else None
            k, v = cache[0].update_and_fetch(k, v)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=P**-0.5, mask=mask)
            return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, l, d))

    def dma(w):
        args = ModelArgs(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=1, layers_type=["attn"], keep_window_size=w)
        layer = DynamicMaskAttention(args)
        layer.A = mx.random.uniform(-1, 1, layer.A.shape)
        return layer

    designs = [("dense", DenseAttention, lambda: [KVCache()])]
    for w in windows:
        designs.append((f"dma W={w}", lambda w=w: dma(w), lambda: [KVCache(), KVCache()]))
    rows = []
    for L in lengths:
        mx.random.seed(0)
        x = mx.random.normal((1, L, d)) * 0.5
        for name, make, make_cache in designs:
            layer = make()
            mx.eval(layer.parameters())

            def prefill(n=L):
                cache = make_cache()
                for i in range(0, n, step):
                    mx.eval(layer(x[:, i : min(i + step, n)], cache))
                return cache

            prefill(min(L, 1024))  # warm-up: the first call compiles (the DMA block masks)
            mx.clear_cache()
            mx.reset_peak_memory()
            tic = time.perf_counter()
            cache = prefill()
            prefill_s = time.perf_counter() - tic
            peak = mx.get_peak_memory() / 2**20
            tok = x[:, -1:]
            times = []
            for _ in range(5):
                tic = time.perf_counter()
                mx.eval(layer(tok, cache))
                times.append(time.perf_counter() - tic)
                for c in cache:  # keep the cache at L tokens
                    c.trim(1)
            rows.append({"length": L, "design": name, "prefill_ms": 1e3 * prefill_s,
                         "decode_ms": 1e3 * statistics.median(times), "prefill_peak_mib": peak})
            print(f"L={L:>6} {name:>12}: prefill {1e3 * prefill_s:10.1f} ms  decode {rows[-1]['decode_ms']:8.2f} ms  "
                  f"peak {peak:8.0f} MiB", flush=True)
            del layer, cache
    result = {"suite": "attention", "machine": machine(), "dtype": "float32", "hidden_size": d, "heads": heads,
              "kv_heads": kv_heads, "prefill_step": step, "rows": rows}
    (out / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{machine_line(result['machine'])}, float32, one layer d={d}, {heads}/{kv_heads} heads, "
             f"prefill in steps of {step}.", "",
             "| tokens | design | prefill ms | decode ms (1 token, L cached) | prefill peak MiB |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['design']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | "
                     f"{r['prefill_peak_mib']:.0f} |")
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    line_plot(out / "attention.png", [
        {"title": title, "xlabel": "tokens", "ylabel": "ms", "logx": 2, "logy": True,
         "series": {name: [(r["length"], r[key]) for r in rows if r["design"] == name] for name, _, _ in designs}}
        for key, title in (("prefill_ms", "prefill"), ("decode_ms", "decode, 1 token"))
    ])
    return result


# --------------------------------------------------------------------------- ssd


def suite_ssd(out: Path, heads=8, head_dim=64, lengths=(1024, 4096), chunks=(64, 128, 256, 512)):
    """Prefill-style scans over L tokens (batch 1, H heads, P = N = head_dim), float32."""
    from mlx_lm.models.ssm import ssm_attn

    from .ssd import ssd_chunked_scan, ssd_step

    rows = []
    for L in lengths:
        mx.random.seed(0)
        x = mx.random.normal((1, L, heads, head_dim))
        B = mx.random.normal((1, L, heads, head_dim)) * 0.3
        C = mx.random.normal((1, L, heads, head_dim)) * 0.3
        dt_raw = mx.random.normal((1, L, heads))
        dt = nn.softplus(dt_raw)
        A = -mx.arange(1, heads + 1, dtype=mx.float32) / heads
        ref, _ = ssd_chunked_scan(x, dt, A, B, C, 256)

        def recurrence():
            state, ys = None, []
            for t in range(L):
                y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
                ys.append(y)
                if t % 256 == 255:
                    mx.eval(state, ys)
            return mx.stack(ys, axis=1)

        # mlx-lm's SSD with the same math: A = -exp(A_log), D = 0, dt_bias = 0, no dt clamp
        A_log = mx.log(-A)
        zeros = mx.zeros((heads,))

        def mlx_lm_ssd():
            return ssm_attn(x, A_log, B, C, zeros, dt_raw, zeros, None, (0.0, float("inf")))[0]

        err = float(mx.abs(mlx_lm_ssd() - ref).max() / mx.maximum(mx.abs(ref).max(), 1.0))
        cases = [(f"chunked Q={q}", lambda q=q: ssd_chunked_scan(x, dt, A, B, C, q)[0]) for q in chunks]
        cases += [("mlx-lm ssm_attn (256)", mlx_lm_ssd), ("recurrence", recurrence)]
        for name, fn in cases:
            ms = 1e3 * timeit(fn, reps=1 if name == "recurrence" else 3)
            rows.append({"length": L, "method": name, "ms": ms, "tokens_per_s": L / ms * 1e3,
                         "peak_mib": peak_memory(fn) if name != "recurrence" else None})
            print(f"L={L:>5} {name:>22}: {ms:9.1f} ms", flush=True)
        rows.append({"length": L, "method": "mlx-lm vs ours: max rel diff", "value": err})
    result = {"suite": "ssd", "machine": machine(), "dtype": "float32", "heads": heads, "head_dim": head_dim,
              "rows": rows}
    (out / "ssd.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{machine_line(result['machine'])}, float32, batch 1, {heads} heads x {head_dim} (P = N).", "",
             "| tokens | method | ms | tokens/s | peak MiB |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        if "ms" in r:
            peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['length']} | {r['method']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} |")
    lines.append("")
    for r in rows:
        if "value" in r:
            lines.append(f"- L={r['length']}: mlx-lm ssm_attn vs our chunked scan, max |diff| / max |y| = {r['value']:.1e}")
    (out / "ssd.md").write_text("\n".join(lines) + "\n")
    line_plot(out / "ssd.png", [{
        "title": "SSD chunked scan: chunk-size sweep", "xlabel": "chunk size Q", "ylabel": "ms", "logx": 2,
        "series": {f"chunked, L={L}": [(int(r["method"].split("=")[1]), r["ms"]) for r in rows
                                        if r.get("length") == L and r["method"].startswith("chunked")]
                   for L in lengths}}])
    return result


# --------------------------------------------------------------------------- speculative

KJV = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. "
)
SPECULATIVE_TEXTS = {"copy-heavy": KJV * 4 + "In the beginning God", "free": "The king went out to the field and said"}


def suite_speculative(out: Path, lookups=(2, 4, 8), new_tokens=96, reps=3, model_path=None, draft_path=None,
                      draft_tokens=(2, 4)):
    """Greedy decoding of ``new_tokens`` tokens on the default model (float32): plain vs
    prompt-lookup (N proposed tokens) vs a draft model -- the model itself (the acceptance
    ceiling, not a speed-up) and, with ``draft_path``, a smaller model sharing its tokenizer
    (``draft_tokens`` proposals); decode tokens/s is the median of ``reps`` runs after a
    warm-up, the methods taking turns run by run; "tokens / forward" counts the target
    model's forwards."""
    from mlx_lm.generate import stream_generate

    from .loading import load
    from .speculative import stream_prompt_lookup

    model, tokenizer = load(model_path, dtype="float32")
    methods = [("plain", stream_generate, {})]
    methods += [(f"prompt lookup N={k}", stream_prompt_lookup, {"num_draft_tokens": k}) for k in lookups]
    methods += [("draft = the model itself, N=3", stream_generate, {"draft_model": model, "num_draft_tokens": 3})]
    draft_note = ""
    if draft_path is not None:
        draft, _ = load(draft_path, dtype="float32")
        n_draft = sum(v.size for _, v in tree_flatten(draft.parameters()))
        n_target = sum(v.size for _, v in tree_flatten(model.parameters()))
        draft_note = (f" Draft model: {Path(draft_path).name}, {n_draft / 1e6:.2f}M parameters against the "
                      f"target's {n_target / 1e6:.2f}M.")
        methods += [(f"draft model ({n_draft / 1e6:.1f}M), N={k}", stream_generate,
                     {"draft_model": draft, "num_draft_tokens": k}) for k in draft_tokens]
    rows = []
    for text_name, text in SPECULATIVE_TEXTS.items():
        prompt = tokenizer.encode(text)
        plain_tokens = None
        # the methods take turns, rep by rep (a slow spell of a shared machine then hits all of
        # them alike); the first round warms up (compilation)
        runs = {name: [] for name, _, _ in methods}
        for _ in range(reps + 1):
            for name, generate, kw in methods:
                runs[name].append(list(generate(model, tokenizer, prompt, max_tokens=new_tokens, **kw)))
        for name, generate, kw in methods:
            tps = statistics.median(run[-1].generation_tps for run in runs[name][1:])
            tokens = [r.token for r in runs[name][-1]]
            plain_tokens = tokens if plain_tokens is None else plain_tokens
            accepted = sum(r.from_draft for r in runs[name][-1])
            rows.append({"text": text_name, "method": name, "prompt_tokens": len(prompt), "tokens": len(tokens),
                         "decode_tokens_per_s": tps, "accepted": accepted,
                         "accepted_share": accepted / max(len(tokens), 1),
                         "tokens_per_forward": len(tokens) / max(len(tokens) - accepted, 1),
                         "same_tokens_as_plain": tokens == plain_tokens})
            print(f"{text_name:>10} {name:>30}: {tps:7.1f} tok/s, "
                  f"{accepted}/{len(tokens)} accepted, same as plain: {tokens == plain_tokens}", flush=True)
    plain = {r["text"]: r["decode_tokens_per_s"] for r in rows if r["method"] == "plain"}
    for r in rows:
        r["speedup_vs_plain"] = r["decode_tokens_per_s"] / plain[r["text"]]
    result = {"suite": "speculative", "machine": machine(), "dtype": "float32", "new_tokens": new_tokens, "rows": rows}
    result["draft"] = draft_note.strip()
    (out / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{machine_line(result['machine'])}, float32, the default model, greedy, {new_tokens} new tokens."
             f"{draft_note}", "",
             "| text | method | decode tok/s | vs plain | accepted | tokens / target forward | same tokens |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['text']} | {r['method']} | {r['decode_tokens_per_s']:.1f} | {r['speedup_vs_plain']:.2f}x "
                     f"| {r['accepted']}/{r['tokens']} | {r['tokens_per_forward']:.2f} | {r['same_tokens_as_plain']} |")
    (out / "speculative.md").write_text("\n".join(lines) + "\n")
    return result


# --------------------------------------------------------------------------- kernels

KERNELS_UNAVAILABLE = (
    "Metal is not available on this machine ({device}): the Metal kernels cannot be timed "
    "here. Their correctness is checked on Linux by the CPU emulator (pytest tests/test_kernels_*.py, "
    "tests/test_metal_emulator.py); run `python -m cheems_mlx.bench kernels` on an Apple-silicon "
    "Mac to time them against the ops path."
)


def suite_kernels(out: Path, d=1024, heads=16, head_dim=64, prefill=2048, cache_len=4096, dtype="float16",
                  num_experts=128 * 128):
    """Each module with its Metal kernels against the same module on the pure-MLX ops path
    (CHEEMS_MLX_KERNELS=0), on the GPU: SSD (scan kernel for the prefill, step kernel for
    decode), DMA (tiled prefill with tile skipping, flash-decoding), CDMoE (routing + mixing,
    float and 4-bit expert tables). Returns None where Metal is absent, after saying so."""
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache

    from . import kernels
    from .cdmoe import CDMoE
    from .dma import DynamicMaskAttention
    from .model import ModelArgs
    from .ssd import StateSpaceDuality

    if not kernels.metal_available():
        msg = KERNELS_UNAVAILABLE.format(device=f"{platform.system()} {platform.machine()}, {mx.default_device()}")
        (out / "kernels.json").write_text(json.dumps({"suite": "kernels", "machine": machine(),
                                                      "measured": False, "reason": msg}, indent=2) + "\n")
        (out / "kernels.md").write_text(msg + "\n")
        print(msg, file=sys.stderr)
        return None

    dt = getattr(mx, dtype)
    common = dict(hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads // 4, head_dim=head_dim,
                  num_hidden_layers=1, max_position_embeddings=2 * cache_len)

    def ssd():
        layer = StateSpaceDuality(ModelArgs(**common, layers_type=["ssd"], ssd_chunk_size=256))
        layer.set_dtype(dt)
        return layer, lambda: ArraysCache(2)

    def dma(w):
        layer = DynamicMaskAttention(ModelArgs(**common, layers_type=["attn"], keep_window_size=w))
        layer.A = mx.random.uniform(-1, 1, layer.A.shape)
        layer.set_dtype(dt)
        return layer, lambda: CacheList(KVCache(), KVCache())

    def cdmoe(bits=None):
        layer = CDMoE(ModelArgs(**common, intermediate_size=4 * d, is_moe=True, num_experts=num_experts,
                                num_expert_heads=4, num_experts_per_tok=16, expert_retrieval_size=128))
        layer.set_dtype(dt)
        if bits:
            nn.quantize(layer, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Embedding))
        return layer, None

    designs = [("ssd", ssd), ("dma W=256", lambda: dma(256)), (f"dma W={cache_len}", lambda: dma(cache_len)),
               ("cdmoe", cdmoe), ("cdmoe 4-bit tables", lambda: cdmoe(4))]
    rows = []
    previous = os.environ.get("CHEEMS_MLX_KERNELS")
    try:
        for name, make in designs:
            mx.random.seed(0)
            layer, make_cache = make()
            layer.eval()
            x = (mx.random.normal((1, prefill, d)) * 0.5).astype(dt)
            long_x = mx.concatenate([x] * (cache_len // prefill), axis=1)
            row = {"module": name}
            for path in ("ops", "kernel"):
                os.environ["CHEEMS_MLX_KERNELS"] = "1" if path == "kernel" else "0"
                if make_cache is None:
                    row[f"{path}_prefill_ms"] = 1e3 * timeit(lambda: layer(x))
                    row[f"{path}_decode_ms"] = 1e3 * timeit(lambda: layer(x[:, :1]), reps=20)
                    continue
                cache = make_cache()
                tic = time.perf_counter()
                for i in range(0, cache_len, prefill):
                    mx.eval(layer(long_x[:, i:i + prefill], cache))
                row[f"{path}_prefill_ms"] = 1e3 * (time.perf_counter() - tic) / (cache_len // prefill)
                row[f"{path}_decode_ms"] = 1e3 * timeit(lambda: layer(x[:, :1], cache), reps=20)
            row["prefill_speedup"] = row["ops_prefill_ms"] / row["kernel_prefill_ms"]
            row["decode_speedup"] = row["ops_decode_ms"] / row["kernel_decode_ms"]
            rows.append(row)
            print(f"{name:>22}: prefill ops {row['ops_prefill_ms']:8.2f} ms kernel {row['kernel_prefill_ms']:8.2f} ms"
                  f" | decode ops {row['ops_decode_ms']:7.3f} ms kernel {row['kernel_decode_ms']:7.3f} ms", flush=True)
    finally:
        if previous is None:
            os.environ.pop("CHEEMS_MLX_KERNELS", None)
        else:
            os.environ["CHEEMS_MLX_KERNELS"] = previous
    result = {"suite": "kernels", "machine": machine(), "measured": True, "dtype": dtype, "hidden_size": d,
              "heads": heads, "head_dim": head_dim, "prefill": prefill, "cache_len": cache_len, "rows": rows}
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {result['machine']['platform']}, {mx.default_device()}, {dtype}; d {d}, {heads} heads of "
             f"{head_dim}; prefill of {prefill} tokens (attention: up to a {cache_len}-token cache), decode of one "
             "token against it.", "",
             "| module | prefill ms ops | prefill ms kernels | x | decode ms ops | decode ms kernels | x |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['module']} | {r['ops_prefill_ms']:.2f} | {r['kernel_prefill_ms']:.2f} | "
                     f"{r['prefill_speedup']:.2f} | {r['ops_decode_ms']:.3f} | {r['kernel_decode_ms']:.3f} | "
                     f"{r['decode_speedup']:.2f} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cheems_mlx.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="experts: expert counts; ssd / attention: sequence lengths; "
                        "speculative: the numbers of proposed tokens")
    p.add_argument("--draft-model", default=None,
                   help="speculative: also decode with this draft model (a smaller model with the same tokenizer)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine()))
    if a.suite in ("experts", "all"):
        suite_experts(a.out, **({"sizes": tuple(a.sizes)} if a.sizes else {}))
    if a.suite in ("decode", "prefill", "all"):
        suite_generation(a.out, **({"prompts": tuple(a.sizes)} if a.sizes and a.suite != "all" else {}))
    if a.suite in ("attention", "all"):
        suite_attention(a.out, **({"lengths": tuple(a.sizes)} if a.sizes and a.suite == "attention" else {}))
    if a.suite in ("ssd", "all"):
        suite_ssd(a.out, **({"lengths": tuple(a.sizes)} if a.sizes and a.suite == "ssd" else {}))
    if a.suite in ("speculative", "all"):
        suite_speculative(a.out, draft_path=a.draft_model,
                          **({"lookups": tuple(a.sizes)} if a.sizes and a.suite == "speculative" else {}))
    if a.suite in ("kernels", "all"):
        measured = suite_kernels(a.out)
        if measured is None and a.suite == "kernels":
            return 1  # nothing could be measured here (said why above)
    return 0


if __name__ == "__main__":
    sys.exit(main())
