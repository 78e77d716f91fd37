"""Writing a model folder: all-or-nothing (temporary sibling folder, then rename).

Layout: ``config.json`` (native config + ``"model_file": "cheems_model.py"``),
``model.safetensors`` (or shards + index, via mlx-lm's ``save_model``),
``cheems_model.py`` (the two-line shim mlx-lm imports with ``--trust-remote-code``),
plus tokenizer / generation files copied as they are.
"""

import json
import shutil
import uuid
from pathlib import Path
from typing import Dict, Iterable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

SHIM_NAME = "cheems_model.py"
SHIM = (
    '# mlx-lm imports this file when run with --trust-remote-code (config.json "model_file").\n'
    "from cheems_mlx.model import Model, ModelArgs  # noqa: F401\n"
)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class OutputExistsError(FileExistsError):
    pass


def cast_model(model, dtype: str):
    """Cast floating parameters to ``dtype`` except those the model keeps in float32."""
    target = DTYPES[dtype]
    keep = model.cast_predicate

    def cast(path, x):
        if mx.issubdtype(x.dtype, mx.floating) and keep(path):
            return x.astype(target)
        return x

    model.update(tree_map_with_path(cast, model.parameters()))
    return model


def _finish(tmp: Path, dst: Path, force: bool):
    if dst.exists():
        if not force:
            raise OutputExistsError(f"{dst} already exists (pass --force to replace it)")
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def temp_sibling(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"


def check_destination(dst: Path, force: bool):
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} already exists (pass --force to replace it)")
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError(f"{dst} exists and is not a folder")


def save_model_dir(
    model,
    config: Dict,
    dst: Path,
    dtype: Optional[str] = None,
    extra_files: Iterable[Path] = (),
    force: bool = False,
) -> Path:
    """Write ``model`` (with ``config``) to ``dst`` atomically; returns ``dst``."""
    from mlx_lm.utils import save_model

    dst = Path(dst)
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    try:
        tmp.mkdir()
        if dtype is not None:
            cast_model(model, dtype)
        save_model(tmp, model, donate_model=False)
        config = {k: v for k, v in config.items() if v is not None}
        config["model_file"] = SHIM_NAME
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / SHIM_NAME).write_text(SHIM)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        _finish(tmp, dst, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
