"""``python -m cheems_mlx.lora``: LoRA / DoRA / full fine-tuning with mlx-lm's flags.

Reused from mlx-lm: the argument parser and YAML config handling, the datasets (text,
chat and completion JSONL; ``--mask-prompt``), batching (``iterate_batches``: length
sorted, right padded, truncated to ``--max-seq-length`` with a warning), the loss, the
LoRA / DoRA layers and the optimizers / schedules. What is ours, and why:

- **targets by name** (``--lora-targets``): every matrix of this architecture has a
  name (attention q/k/v/o and its dynamic-mask ``dt_proj``; SSD c/b/x/dt/out; the
  shared expert MLP; the CDMoE router / retrieval queries; the expert tables) and
  groups of them; mlx-lm's default would put LoRA on every Embedding, i.e. the expert
  tables.
- **DoRA on quantized expert tables**: mlx-lm's ``DoRAEmbedding`` cannot wrap a
  ``QuantizedEmbedding``; those tables get a LoRA adapter instead (with a note). Putting
  adapters on and loading them back is ``cheems_mlx.adapters``.
- **the training loop**: mlx-lm's ``train`` saves adapter weights only; here a
  checkpoint also holds the optimizer state and the step (dropout noise is seeded
  per step), and
  ``--resume`` continues with exactly the losses of an uninterrupted run (the data
  order is replayed from ``--seed``); the checkpoints are ``cheems_mlx.training``'s, shared
  with pretraining. It also writes ``metrics.jsonl`` and
  ``loss.png`` and reports peak memory.
- **input checks**: a malformed JSONL line names its file and line; an empty split,
  unknown target names, or an adapter that does not fit the base model are one-line
  errors.
"""

import json
import math
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Dict, List, Set

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from . import numerics
from .adapters import LoRAError, apply_lora, load_adapters
from .plots import loss_curve

# target name -> module paths relative to a decoder layer
TARGETS: Dict[str, List[str]] = {
    "q_proj": ["attn.q_proj"],
    "k_proj": ["attn.k_proj"],
    "v_proj": ["attn.v_proj"],
    "o_proj": ["attn.o_proj"],
    "attn.dt_proj": ["attn.dt_proj"],
    "c_proj": ["ssd.c_proj"],
    "b_proj": ["ssd.b_proj"],
    "x_proj": ["ssd.x_proj"],
    "ssd.dt_proj": ["ssd.dt_proj"],
    "out_proj": ["ssd.out_proj"],
    "dt_proj": ["attn.dt_proj", "ssd.dt_proj"],
    "gate_proj": ["feed_forward.gate_proj"],
    "up_proj": ["feed_forward.up_proj"],
    "down_proj": ["feed_forward.down_proj"],
    "queries": ["feed_forward.queries"],
    "router_gate": ["feed_forward.router_gate"],
    "down_embed": ["feed_forward.down_embed"],
    "up_embed": ["feed_forward.up_embed"],
}
GROUPS: Dict[str, List[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj", "attn.dt_proj"],
    "ssd": ["c_proj", "b_proj", "x_proj", "ssd.dt_proj", "out_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "router": ["queries", "router_gate"],
    "experts": ["down_embed", "up_embed"],
}
GROUPS["all-linear"] = GROUPS["attention"] + GROUPS["ssd"] + GROUPS["mlp"] + GROUPS["router"]
GROUPS["all"] = GROUPS["all-linear"] + GROUPS["experts"]
# the default: every projection but the two dynamic-decay ones (dt_proj of the SSD and
# of the dynamic mask) and the router; adapters there made training diverge (NaN) at
# learning rates that are fine elsewhere -- docs/lora.md has the measurement
GROUPS["default"] = ["q_proj", "k_proj", "v_proj", "o_proj", "c_proj", "b_proj", "x_proj", "out_proj"] + GROUPS["mlp"]
DEFAULT_TARGETS = ["default"]


def resolve_targets(names: List[str], model) -> Set[str]:
    """Module paths (relative to a layer) for target names / groups, restricted to the
    modules the model has. Unknown names are an error."""
    wanted: List[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in GROUPS:
            wanted.extend(GROUPS[name])
        elif name in TARGETS:
            wanted.append(name)
        else:
            valid = sorted(TARGETS) + sorted(GROUPS)
            raise LoRAError(f"unknown LoRA target {name!r}; valid names: {', '.join(valid)}")
    present = {k for layer in model.layers for k, _ in layer.named_modules()}
    keys = {path for name in wanted for path in TARGETS[name] if path in present}
    if not keys:
        raise LoRAError(f"none of the LoRA targets {names} exists in this model")
    return keys


def prepare_model_for_training(model, args) -> None:
    model.freeze()
    if args.num_layers == -1:
        args.num_layers = len(model.layers)
    if args.num_layers > len(model.layers) or args.num_layers < 1:
        raise LoRAError(f"--num-layers must be -1 (all) or in [1, {len(model.layers)}] (got {args.num_layers})")
    if args.fine_tune_type == "full":
        for layer in model.layers[-args.num_layers:]:
            layer.unfreeze()
        args.lora_parameters = None
    elif args.fine_tune_type in ("lora", "dora"):
        apply_lora(model, args.num_layers, args.lora_parameters, args.fine_tune_type)
    else:
        raise LoRAError(f"unknown --fine-tune-type {args.fine_tune_type!r} (lora, dora, full)")


# --------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoRAError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LoRAError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        return []
    first = rows[0][1]
    if "messages" in first:
        need = ("messages",)
    elif "prompt" in first and "completion" in first:
        need = ("prompt", "completion")
    elif "text" in first:
        need = ("text",)
    else:
        raise LoRAError(
            f"{path}:{rows[0][0]}: unknown record format (keys {sorted(first)}); expected "
            "'text', 'prompt' + 'completion', or 'messages'"
        )
    for n, row in rows:
        missing = [k for k in need if k not in row]
        if missing:
            raise LoRAError(f"{path}:{n}: missing {missing} (the file's first record uses {list(need)})")
    return [r for _, r in rows]


def load_datasets(args, tokenizer, log=print):
    from mlx_lm.tuner.datasets import create_dataset

    from .training import PLAIN_CHAT_TEMPLATE

    data = Path(args.data)
    if not data.is_dir():
        raise LoRAError(f"--data {data} is not a folder with train/valid/test .jsonl files")
    splits = {}
    for name in ("train", "valid", "test"):
        f = data / f"{name}.jsonl"
        rows = read_jsonl(f) if f.exists() else []
        if rows and "text" not in rows[0] and not tokenizer.has_chat_template:
            # mlx-lm renders chat and prompt/completion records with the chat template
            log("[note] the tokenizer has no chat template: using plain concatenation "
                "(prompt + completion + </s>)")
            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        try:
            splits[name] = create_dataset(rows, tokenizer, args) if rows else []
        except ValueError as e:
            raise LoRAError(f"{f}: {e}") from None
    if args.train and not splits["train"]:
        raise LoRAError(f"{data / 'train.jsonl'} is missing or empty")
    if args.train and not splits["valid"]:
        raise LoRAError(f"{data / 'valid.jsonl'} is missing or empty (needed for validation loss)")
    if args.test and not splits["test"]:
        raise LoRAError(f"{data / 'test.jsonl'} is missing or empty")
    for name, ds in splits.items():
        if ds and len(ds) < args.batch_size and (name != "test" or args.test):
            raise LoRAError(f"{name}.jsonl has {len(ds)} records, fewer than --batch-size {args.batch_size}")
    return splits["train"], splits["valid"], splits["test"]


# --------------------------------------------------------------------------- training


def make_optimizer(args):
    from mlx_lm.tuner.utils import build_schedule

    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    name = args.optimizer.lower()
    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
               "muon": optim.Muon}
    if name not in classes:
        raise LoRAError(f"unsupported optimizer {args.optimizer!r}; expected one of {sorted(classes)}")
    return classes[name](learning_rate=lr, **args.optimizer_config.get(name, {}))


def train(args, model, train_set, valid_set, log=print):
    """The training loop. Under ``mlx.launch`` it is data parallel: every rank holds the
    whole model and takes ``batch_size / N`` rows of each batch (mlx-lm's
    ``iterate_batches`` with the group), the gradients are averaged weighting each rank by
    its token count (so the step equals the single-process step on the whole batch), and
    only rank 0 writes the adapters, checkpoints and metrics."""
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint, iterate_batches

    from . import distributed
    from .training import latest_checkpoint, resume_checkpoint, save_checkpoint

    world = mx.distributed.init()  # the group cheems_mlx.distributed.init joined, or this process alone
    N, main_rank = world.size(), world.rank() == 0
    if not main_rank:
        log = lambda *a, **k: None  # noqa: E731
    watchdog = distributed.watchdog()
    adapter_path = Path(args.adapter_path)
    if main_rank:
        adapter_path.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(args)
    start = 0
    metrics_file = adapter_path / "metrics.jsonl"
    if args.resume:  # rank 0 reads the checkpoint; the other ranks receive it
        resumed = resume_checkpoint(adapter_path, model, optimizer, "adapters.safetensors", "iteration", world,
                                    strict=False)
        if resumed is None:
            raise LoRAError(f"--resume: no checkpoint in {adapter_path / 'checkpoints'}")
        ckpt, start = resumed
        log(f"Resuming from {ckpt} (iteration {start})")
    else:
        if args.resume_adapter_file is not None and main_rank:
            log(f"Loading fine-tuned weights from {args.resume_adapter_file}")
            model.load_weights(args.resume_adapter_file, strict=False)
        if main_rank:
            metrics_file.write_text("")
    # the same starting adapters everywhere (random LoRA init, resumed or loaded weights)
    distributed.broadcast_parameters(model, world, trainable_only=True)
    if main_rank:
        cfg = {k: v for k, v in vars(args).items() if k not in ("resume",)}
        (adapter_path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))

    if args.grad_checkpoint:  # all our decoder layers share one class
        grad_checkpoint(model.layers[0])
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (loss, toks), grad = loss_value_and_grad(model, *batch)
        if N > 1:  # the mean over all ranks' tokens: weight each rank's mean by its tokens
            total = mx.distributed.all_sum(toks, group=world)
            weight = toks.astype(mx.float32) * N / total.astype(mx.float32)
            grad = average_gradients(tree_map(lambda g: g * weight.astype(g.dtype), grad), group=world)
            loss = mx.distributed.all_sum(loss * toks.astype(loss.dtype), group=world) / total.astype(loss.dtype)
            toks = total
        if args.grad_clip:
            grad, _ = optim.clip_grad_norm(grad, args.grad_clip)
        optimizer.update(model, grad)
        return loss, toks

    train_ds, valid_ds = CacheDataset(train_set), CacheDataset(valid_set)
    # mlx-lm's iterate_batches shuffles with numpy's global RNG, which evaluation also
    # draws from; keep the training stream's RNG state apart so the order depends only
    # on --seed and the step (a resumed run replays it exactly)
    np.random.seed(args.seed)
    train_rng = np.random.get_state()
    batches = iterate_batches(train_ds, args.batch_size, args.max_seq_length, loop=True,
                              comm_group=world if N > 1 else None)

    def next_batch():
        nonlocal train_rng
        np.random.set_state(train_rng)
        b = next(batches)
        train_rng = np.random.get_state()
        return b

    for _ in range(start):  # replay the data order of the interrupted run
        next_batch()

    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"Trainable parameters: {100 * n_train / n_params:.3f}% ({n_train / 1e6:.3f}M/{n_params / 1e6:.3f}M)"
        + (f"; data parallel over {N} ranks, {args.batch_size // N} rows each" if N > 1 else ""))
    mx.reset_peak_memory()
    metrics = open(metrics_file, "a") if main_rank else None

    def record(row):
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    watchdog.arm("training")
    losses, ntoks, steps, elapsed = 0.0, 0, 0, 0.0
    for it in range(start + 1, args.iters + 1):
        if it == 1 or it % args.steps_per_eval == 0 or it == args.iters:
            tic = time.perf_counter()
            model.eval()
            np.random.seed(args.seed + 1)  # the same validation batches at every evaluation
            # mlx-lm's evaluate splits each batch over the ranks and all_sums the losses
            val = evaluate(model, valid_ds, args.batch_size, args.val_batches, args.max_seq_length,
                           progress_callback=watchdog.beat)
            model.train()
            record({"iteration": it - 1, "val_loss": val})
            log(f"Iter {it - 1}: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
        batch = next_batch()
        tic = time.perf_counter()
        model.train()
        mx.random.seed(args.seed * 1_000_003 + it)  # dropout noise is a function of the step
        loss, toks = step(batch)
        mx.eval(state, loss, toks)
        watchdog.beat()
        elapsed += time.perf_counter() - tic
        if not math.isfinite(loss.item()):  # never save (or go on training) NaN adapters
            last = latest_checkpoint(adapter_path)
            kept = f"the last finite checkpoint is {last}" if last else "no checkpoint was saved"
            raise LoRAError(
                f"training diverged at iteration {it} (loss {loss.item()}); {kept}. Lower --learning-rate "
                f"(this run: {args.learning_rate:g}; 1e-4 to 5e-4 is stable on small models), the LoRA scale "
                f"(--lora-scale, now {args.lora_parameters.get('scale')}) or the number of targets"
            )
        losses += loss.item()
        ntoks += toks.item()
        steps += 1
        if it % args.steps_per_report == 0 or it == args.iters:
            row = {"iteration": it, "train_loss": losses / steps, "tokens_per_second": ntoks / elapsed,
                   "learning_rate": float(optimizer.learning_rate), "peak_memory_gb": mx.get_peak_memory() / 1e9}
            record(row)
            log(f"Iter {it}: Train loss {row['train_loss']:.3f}, It/sec {steps / elapsed:.3f}, "
                f"Tokens/sec {row['tokens_per_second']:.1f}, Peak mem {row['peak_memory_gb']:.3f} GB")
            losses, ntoks, steps, elapsed = 0.0, 0, 0, 0.0
        if (it % args.save_every == 0 or it == args.iters) and main_rank:
            adapters = dict(tree_flatten(model.trainable_parameters()))
            save_checkpoint(adapter_path, f"{it:07d}", adapters, "adapters.safetensors", optimizer, {"iteration": it})
            mx.save_safetensors(str(adapter_path / "adapters.safetensors"), adapters)  # the adapter folder's copy
            loss_curve(metrics_file, adapter_path / "loss.png", f"{args.fine_tune_type} on {args.data}", "iteration")
    watchdog.disarm()
    if metrics is not None:
        metrics.close()
    if args.iters <= start:
        log(f"Nothing to do: the run already reached iteration {start}")
    return model


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    import yaml
    from mlx_lm.lora import CONFIG_DEFAULTS, build_parser, yaml_loader

    from .cli import add_dist_timeout

    parser = build_parser()
    parser.prog = "python -m cheems_mlx.lora"
    parser.add_argument("--lora-targets", type=str, default=None,
                        help="comma-separated target names or groups "
                             f"({', '.join(sorted(GROUPS))}; default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--lora-scale", type=float, default=None)
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="clip the global gradient norm to this value (default 1.0; 0 turns it off)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --adapter-path from its latest checkpoint")
    add_dist_timeout(parser)
    a = vars(parser.parse_args(argv))
    if a.get("config"):
        with open(a["config"]) as f:
            cfg = yaml.load(f, yaml_loader) or {}
        for k, v in cfg.items():
            if a.get(k) is None or (k in ("train", "test", "mask_prompt", "grad_checkpoint") and a.get(k) is False):
                a[k] = v
    if a.get("grad_clip") is None:
        a["grad_clip"] = 1.0
    if a.get("num_layers") is None:
        a["num_layers"] = -1  # all layers (mlx-lm's 16 is meant for larger models)
    for k, v in CONFIG_DEFAULTS.items():
        if a.get(k) is None:
            a[k] = v
    if a["model"] == CONFIG_DEFAULTS["model"] and "--model" not in (argv or sys.argv):
        a["model"] = None  # our default model, not mlx-lm's
    if a["data"] == CONFIG_DEFAULTS["data"] and "--data" not in (argv or sys.argv) and not (a.get("config")):
        a["data"] = None
    args = types.SimpleNamespace(**a)
    args.lora_parameters = dict(args.lora_parameters)
    if args.lora_rank is not None:
        args.lora_parameters["rank"] = args.lora_rank
    if args.lora_scale is not None:
        args.lora_parameters["scale"] = args.lora_scale
    if args.lora_targets is not None:
        args.lora_parameters["targets"] = [t for t in args.lora_targets.split(",") if t.strip()]
    args.lora_parameters.setdefault("targets", list(DEFAULT_TARGETS))
    return args


def check_args(args):
    if not args.train and not args.test:
        raise LoRAError("nothing to do: pass --train and/or --test")
    if args.data is None:
        raise LoRAError("--data is required (a folder with train.jsonl / valid.jsonl / test.jsonl)")
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length"):
        if getattr(args, name) < 1:
            raise LoRAError(f"--{name.replace('_', '-')} must be >= 1")
    if args.grad_accumulation_steps != 1:
        raise LoRAError("--grad-accumulation-steps is not supported here (use a larger --batch-size)")
    if args.learning_rate <= 0 and not args.lr_schedule:
        raise LoRAError("--learning-rate must be positive")
    world = mx.distributed.init().size()
    if args.batch_size % world:
        raise LoRAError(f"--batch-size {args.batch_size} is the batch of all ranks together and must be "
                        f"divisible by the {world} ranks")


def _half_precision(model) -> bool:
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        return False
    return any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(model.parameters()))


def check_in_deploy_dtype(args, dtype, valid_set, log=print) -> bool:
    """The base model in the dtype it is stored (and generated) in, with the saved adapters,
    on the validation texts: True when its activations fit that dtype. Training ran in
    float32 (on the CPU) and cannot tell; float16 overflows at 65,504, and adapters that push
    the residual stream past it make ``generate --adapter-path`` print NaN tokens. When they
    do not fit, say so and what to do (generation then computes in a wider dtype)."""
    from .loading import load

    if dtype != mx.float16:
        return True  # bfloat16 / float32 have float32's range
    name = numerics.dtype_name(dtype)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=name)
    V = model.args.vocab_size
    sequences = [[t for t in valid_set.process(valid_set[i])[0] if t < V][: args.max_seq_length]
                 for i in range(min(8, len(valid_set)))]
    bad, peak = numerics.overflows(model, [s for s in sequences if s] or numerics.probe_ids(tokenizer, vocab_size=V))
    if bad:
        what = "non-finite values" if peak == float("inf") else f"activations of {peak:.3g}"
        log(f"[warning] with these adapters the model overflows {name}, the base model's dtype ({what} on "
            f"the validation texts; {name} holds at most 65504). generate / server / cheems_mlx.load compute "
            f"it in {numerics.dtype_name(numerics.wider_dtype())} instead (slower, more memory). To keep {name}: "
            f"train again with a lower --learning-rate (this run: {args.learning_rate:g}) or --lora-scale, or "
            f"fuse into a bfloat16 model (python -m cheems_mlx.fuse --dtype bfloat16)")
        return False
    log(f"[check] adapters verified in {name}, the base model's dtype: peak activation {peak:.3g} of 65504")
    return True


def run(args, log=print):
    from .loading import load

    if mx.distributed.init().rank() != 0:  # data parallel: rank 0 speaks for all
        log = lambda *a, **k: None  # noqa: E731
    check_args(args)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer = load(args.model, dtype="stored")  # the stored dtype: what fuse saves
    deploy_dtype = numerics.model_dtype(model)  # what generate / fuse will compute in
    if mx.default_device() == mx.cpu and _half_precision(model):
        # MLX's CPU backend has no fast float16/bfloat16 matmul; train in float32 there
        from .io import cast_model

        cast_model(model, "float32")
        log("[note] CPU: the half-precision base model is trained in float32")
    train_set, valid_set, test_set = load_datasets(args, tokenizer, log=log)
    if args.fine_tune_type != "full":
        args.lora_parameters["keys"] = sorted(resolve_targets(args.lora_parameters["targets"], model))
    if args.train:
        prepare_model_for_training(model, args)
        train(args, model, train_set, valid_set, log=log)
        if mx.distributed.init().rank() == 0:
            check_in_deploy_dtype(args, deploy_dtype, valid_set, log)
    elif args.adapter_path and Path(args.adapter_path).exists():
        load_adapters(model, args.adapter_path)
    if args.test:
        from mlx_lm.tuner.datasets import CacheDataset
        from mlx_lm.tuner.trainer import evaluate

        from . import distributed

        model.eval()
        watchdog = distributed.watchdog()
        with watchdog.watch("evaluating the test set"):  # split over the ranks by mlx-lm's evaluate
            test_loss = evaluate(model, CacheDataset(test_set), args.batch_size, args.test_batches,
                                 args.max_seq_length, progress_callback=watchdog.beat)
        log(f"Test loss {test_loss:.3f}, Test ppl {math.exp(test_loss):.3f}.")
        return test_loss
    return None


def main(argv=None) -> int:
    from . import distributed
    from .cli import run_cli
    from .loading import LoadError

    def body():
        args = parse_args(argv)
        group = distributed.init(args.dist_timeout)
        run(args)
        distributed.finish(group)

    return run_cli(body, (LoRAError, LoadError))


if __name__ == "__main__":
    sys.exit(main())
