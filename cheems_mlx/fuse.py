"""``python -m cheems_mlx.fuse``: merge trained adapters into the base model and save a
model folder (same flags as ``mlx_lm.fuse``; the fusing itself is the adapter layers'
own ``fuse``)."""

import argparse
import sys
from pathlib import Path

from mlx.utils import tree_unflatten

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja",
                   "vocab*", "merges*", "added_tokens.json")


def fuse(model_ref, adapter_path, save_path, dequantize=False, force=False):
    from mlx_lm.utils import dequantize_model

    from .io import save_model_dir
    from .loading import load, resolve_model_path

    src = resolve_model_path(model_ref)
    model, _, config = load(model_ref, adapter_path=adapter_path, return_config=True)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise ValueError(f"{adapter_path} added no adapter layers to fuse")
    model.update_modules(tree_unflatten(fused))
    config = {k: v for k, v in config.items() if k != "model_file"}
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    extra = sorted({p for g in TOKENIZER_GLOBS for p in Path(src).glob(g) if p.is_file()})
    return save_model_dir(model, config, save_path, extra_files=extra, force=force)


def main(argv=None) -> int:
    from .cli import run_cli
    from .loading import LoadError

    p = argparse.ArgumentParser(prog="python -m cheems_mlx.fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model folder or Hub repo id (default: embedded model)")
    p.add_argument("--adapter-path", default="adapters")
    p.add_argument("--save-path", default="fused_model")
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)

    def body():
        out = fuse(a.model, a.adapter_path, a.save_path, a.dequantize, a.force)
        print(f"saved: {out}")

    return run_cli(body, (LoadError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
