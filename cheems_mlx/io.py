"""Writing a model folder: all-or-nothing (temporary sibling folder, then rename).

Layout: ``config.json`` (native config + ``"model_file": "cheems_model.py"``),
``model.safetensors`` (or shards + index, via mlx-lm's ``save_model``),
``cheems_model.py`` (the two-line shim mlx-lm imports with ``--trust-remote-code``),
plus tokenizer / generation files copied as they are. Used by the converter and by
the trainer's export.
"""

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

SHIM_NAME = "cheems_model.py"
SHIM = (
    "# mlx-lm imports this file when run with --trust-remote-code (config.json \"model_file\").\n"
    "from cheems_mlx.model import Model, ModelArgs  # noqa: F401\n"
)
DTYPES = ("float32", "float16", "bfloat16")


class OutputExistsError(FileExistsError):
    pass


def cast_model(model, dtype: Union[str, mx.Dtype]) -> None:
    """Cast floating parameters to ``dtype``; those ``model.cast_predicate`` keeps stay float32."""
    target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    keep = getattr(model, "cast_predicate", lambda _: True)
    flat = []
    for k, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(target if keep(k) else mx.float32)
        flat.append((k, v))
    model.update(tree_unflatten(flat))
    mx.eval(model.parameters())


def check_destination(dst: Path, force: bool) -> None:
    """Fail before any work when ``dst`` exists (without ``force``) or cannot be created."""
    if os.path.lexists(dst) and not force:
        raise OutputExistsError(f"output {dst} already exists; use --force to replace it")
    parent = dst.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot create the output {dst}: {parent} is not a writable folder")


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``, replacing an existing ``dst`` only once ``tmp`` is complete
    (and putting the old one back if that rename fails)."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{secrets.token_hex(6)}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def save_model_dir(
    model,
    config: Dict,
    dst: Union[str, Path],
    dtype: Optional[Union[str, mx.Dtype]] = None,
    extra_files: Iterable[Path] = (),
    force: bool = False,
    write_extra: Optional[Callable[[Path], List[str]]] = None,
) -> Path:
    """Write ``model`` and ``config`` to ``dst`` atomically and return ``dst``.
    ``extra_files`` are copied in; ``write_extra(tmp_folder)`` may add more."""
    from mlx_lm.utils import save_config, save_model

    dst = Path(dst).expanduser().absolute()
    check_destination(dst, force)
    if dtype is not None:
        cast_model(model, dtype)
    config = {k: v for k, v in config.items() if v is not None}
    config["model_file"] = SHIM_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        (tmp / SHIM_NAME).write_text(SHIM)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)  # follows Hub-cache symlinks
        if write_extra is not None:
            write_extra(tmp)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
