"""``python -m cheems_mlx.fuse``: merge trained adapters into the base model and save a
model folder (same flags as ``mlx_lm.fuse``; the fusing itself is the adapter layers'
own ``fuse``)."""

import argparse
import sys
from pathlib import Path

from mlx.utils import tree_unflatten

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja",
                   "vocab*", "merges*", "added_tokens.json")


def fuse(model_ref, adapter_path, save_path, dequantize=False, force=False, dtype=None, log=print):
    """Fuse and save; ``dtype`` (float16 / bfloat16 / float32) casts the fused model, default
    the base model's stored dtype. The fused model is checked in the dtype it is saved in
    (``numerics.overflows`` on a probe text) and the user told when it will not fit."""
    from mlx_lm.utils import dequantize_model

    from . import numerics
    from .io import cast_model, save_model_dir
    from .loading import load, read_config, resolve_model_path

    src = resolve_model_path(model_ref)
    stored = dtype or _stored_dtype(src, read_config(src)) or "stored"
    model, tokenizer, config = load(model_ref, adapter_path=adapter_path, return_config=True, dtype=stored)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise ValueError(f"{adapter_path} added no adapter layers to fuse")
    model.update_modules(tree_unflatten(fused))
    config = {k: v for k, v in config.items() if k != "model_file"}
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype is not None:
        cast_model(model, dtype)
    bad, peak = numerics.overflows(model, numerics.probe_ids(tokenizer, vocab_size=model.args.vocab_size))
    if bad:
        what = "non-finite values" if peak == float("inf") else f"activations of {peak:.3g}"
        log(f"[warning] the fused model overflows float16 ({what}; float16 holds at most 65504): loading it "
            f"computes it in a wider dtype; save it as bfloat16 instead with --dtype bfloat16")
    extra = sorted({p for g in TOKENIZER_GLOBS for p in Path(src).glob(g) if p.is_file()})
    return save_model_dir(model, config, save_path, extra_files=extra, force=force)


def _stored_dtype(path, config):
    """float16 / bfloat16 / float32: the dtype most of a converted folder's floating-point
    weights are stored in (read from the safetensors headers); None for other folders."""
    from .convert.checkpoint import read_safetensors_header

    if not config.get("source_format"):  # an unconverted checkpoint: keep what load gives
        return None
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    counts = {}
    for f in sorted(Path(path).glob("model*.safetensors")):
        for k, info in read_safetensors_header(f).items():
            if k != "__metadata__" and info.get("dtype") in names:
                n = 1
                for d in info.get("shape", []):
                    n *= d
                counts[names[info["dtype"]]] = counts.get(names[info["dtype"]], 0) + n
    return max(counts, key=counts.get) if counts else None


def main(argv=None) -> int:
    from .cli import run_cli
    from .loading import LoadError

    p = argparse.ArgumentParser(prog="python -m cheems_mlx.fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model folder or Hub repo id (default: embedded model)")
    p.add_argument("--adapter-path", default="adapters")
    p.add_argument("--save-path", default="fused_model")
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype of the fused model (default: the base model's)")
    a = p.parse_args(argv)
    def body():
        out = fuse(a.model, a.adapter_path, a.save_path, a.dequantize, a.force, a.dtype,
                   log=lambda m: print(m, file=sys.stderr))
        print(f"saved: {out}")

    return run_cli(body, (LoadError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
