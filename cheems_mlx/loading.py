"""``cheems_mlx.load``: a converted model folder (or Hub repo id) -> (model, tokenizer).

Loading goes through mlx-lm's own ``load_model`` / ``load_tokenizer`` (quantized
weights, lazy loading and tokenizer wrapping come from there); only the model classes
are ours, passed in directly so no ``--trust-remote-code`` is needed. An unconverted
PyTorch checkpoint folder is read in memory by ``convert/checkpoint.py``; adapters are
applied by ``cheems_mlx.adapters``. Sharded (multi-rank) loading is
``cheems_mlx.distributed.sharded_load``. The dtype a loaded model computes in is decided
here too (``compute_dtype``: float32 on the CPU backend for half-precision weights, the
stored dtype on Metal).
"""

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model, load_tokenizer

from . import kernels
from .convert.formats import is_native
from .io import DTYPES
from .model import Model, ModelArgs

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
COMPUTE_DTYPES = ("auto", "stored") + DTYPES
HALF = (mx.float16, mx.bfloat16)


class LoadError(RuntimeError):
    """A model folder that cannot be loaded; the message says why and what to do."""


def resolve_model_path(path_or_repo: Optional[Union[str, Path]], revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched (or found in the cache)."""
    if path_or_repo is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise LoadError(
                f"the embedded default model is not installed ({DEFAULT_MODEL_DIR} has no "
                "config.json); pass --model PATH_OR_REPO"
            )
        return DEFAULT_MODEL_DIR
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; expected a model folder")
        return path
    looks_local = str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1
    if looks_local:
        raise LoadError(f"model folder {path} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo ...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise LoadError(
            f"could not fetch {path_or_repo!r} from the Hugging Face Hub and it is not in the "
            f"local cache{hint}: {type(e).__name__}"
        ) from None


def read_config(path: Path) -> Dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LoadError(f"{cfg_file} not found; is {path} a model folder?")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file} is not valid JSON: {e}") from None


def import_checkpoint(path: Path, moe_routing: Optional[str] = None):
    """A PyTorch checkpoint folder (any format the converter reads) mapped in memory:
    (model, native config). Same checks as ``python -m cheems_mlx.convert``."""
    try:
        from .convert.checkpoint import build_model, load_weights
        from .convert.checkpoint import read_config as read_source_config
        from .convert.formats import FormatError
    except ImportError as e:  # pragma: no cover - an install without the convert package
        raise LoadError(f"{path} is not a converted model and the converter is unavailable ({e})") from None
    try:
        config, config_path = read_source_config(path)
        converted = build_model(config, load_weights(path), config_path, moe_routing)
    except FormatError as e:
        raise LoadError(str(e)) from None
    converted.model.eval()
    return converted.model, dict(converted.config)


def load_model_only(path: Path, lazy: bool = False, model_config: Optional[dict] = None):
    overrides = {"model_file": None}  # we pass our classes directly; never exec the folder's file
    overrides.update(model_config or {})
    try:
        return load_model(
            path, lazy=lazy, model_config=overrides, get_model_classes=lambda config: (Model, ModelArgs)
        )
    except (FileNotFoundError, ValueError) as e:
        raise LoadError(f"could not load the weights in {path}: {e}") from None


def compute_dtype(model, dtype: str = "auto") -> str:
    """Cast ``model``'s floating parameters (in place, lazily) to the dtype it should compute
    in; returns a one-line note of what changed and its memory cost ('' when nothing did).

    ``auto``: on the CPU backend, half-precision (float16 / bfloat16) weights are computed in
    float32 -- MLX's CPU half-precision matmuls are ~3x slower than float32 ones through a
    BLAS -- at the cost of twice their bytes in memory; on Metal (or any GPU) the stored dtype
    stays. ``stored``: as stored. ``float32`` / ``float16`` / ``bfloat16``: that dtype (the
    parameters ``Model.cast_predicate`` keeps in float32 stay float32). Quantized weights stay
    quantized (their float scales follow the rule)."""
    if dtype not in COMPUTE_DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; expected one of {COMPUTE_DTYPES}")
    params = [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    if dtype == "auto":  # the CPU backend, unless the Metal kernels run (or are emulated in the tests)
        on_cpu = mx.default_device() == mx.cpu and not kernels.enabled()
        target = mx.float32 if on_cpu and any(v.dtype in HALF for _, v in params) else None
    else:
        target = None if dtype == "stored" else getattr(mx, dtype)
    castable = getattr(model, "cast_predicate", lambda k: True)
    changed = [(k, v, target if target == mx.float32 or castable(k) else mx.float32)
               for k, v in params if target is not None]
    changed = [(k, v, t) for k, v, t in changed if v.dtype != t]
    model.dtype_note = ""  # what generate --verbose prints
    if not changed:
        return ""
    model.update(tree_unflatten([(k, v.astype(t)) for k, v, t in changed]))
    before = sum(v.nbytes for _, v in params)
    after = before + sum(v.size * (t.size - v.dtype.size) for _, v, t in changed)
    stored = "/".join(sorted({str(v.dtype).split(".")[-1] for _, v, _ in changed}))
    why = " on the CPU backend" if dtype == "auto" else ""
    hint = " (--dtype stored keeps them)" if dtype == "auto" else ""
    model.dtype_note = (f"{stored} weights computed in {str(target).split('.')[-1]}{why}: "
                        f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB{hint}")
    return model.dtype_note


@contextlib.contextmanager
def quiet_transformers():
    """transformers reads config.json when mlx-lm loads the tokenizer and warns that
    ``cheems`` is not one of its model types; that warning is noise for our users."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tiktoken.model", "vocab.json")


def load_folder_tokenizer(path: Path, tokenizer_config: Optional[Dict[str, Any]] = None, eos_token_ids=None,
                          native: bool = True):
    """mlx-lm's ``load_tokenizer`` on a model folder, without transformers reading our config.

    transformers' ``AutoTokenizer`` parses config.json to pick a tokenizer class when it
    can; our ``model_type: cheems`` is unknown to it, so it falls back to its generic
    config class, whose RoPE validation fails on yarn / llama3 / longrope parameters
    (``'PreTrainedConfig' object has no attribute 'max_position_embeddings'``). The
    tokenizer needs nothing from config.json (the class comes from tokenizer_config.json or
    tokenizer.json), so an empty config object is passed instead. Source checkpoints
    (``native=False``: a transformers / legacy Doge folder whose model_type transformers
    may know) are read as transformers would, and only on failure without the config.
    """
    if not any((path / f).exists() for f in TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
        raise LoadError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the model it was trained or converted from into this folder"
        )
    from transformers import PreTrainedConfig

    blank = {"config": PreTrainedConfig()}
    attempts = [blank] if native else [{}, blank]
    for i, extra in enumerate(attempts):
        try:
            with quiet_transformers():
                return load_tokenizer(path, {**extra, **(tokenizer_config or {})}, eos_token_ids=eos_token_ids)
        except Exception as e:  # transformers raises many types for unreadable files
            if i + 1 < len(attempts):
                continue
            raise LoadError(f"could not load the tokenizer in {path}: {type(e).__name__}: {e}") from None


def limit_vocabulary(model, tokenizer) -> None:
    """A tokenizer with fewer tokens than the embedding has rows (a padded vocabulary): the
    rows past it have no text, so the model never predicts them (``Model.vocab_limit``)."""
    n_tokens = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else None
    if n_tokens and n_tokens < model.args.vocab_size:
        model.vocab_limit = n_tokens


def load(
    path_or_repo: Optional[Union[str, Path]] = None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
    return_config: bool = False,
    dtype: Optional[str] = None,
) -> Tuple:
    """Load a model and its tokenizer (mlx-lm's ``TokenizerWrapper``).

    ``path_or_repo``: a converted folder, an unconverted PyTorch checkpoint folder
    (official Cheems, transformers Doge, legacy Doge -- mapped in memory exactly as the
    converter does), or a Hub repo id; ``None`` loads the embedded default model.
    ``dtype``: what the weights compute in (``compute_dtype``). By default (``None`` /
    ``"auto"``) half-precision weights are computed in float32 on the CPU backend and kept
    as stored on Metal; ``"stored"`` keeps them everywhere. When that leaves a float16 model
    whose activations overflow float16 (checked once on a probe text, adapters included;
    ``cheems_mlx.numerics``), it is computed in a wider dtype, with a note. float16 /
    bfloat16 / float32: exactly that dtype, unchecked.
    """
    from . import numerics

    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; expected one of {COMPUTE_DTYPES}")
    path = resolve_model_path(path_or_repo, revision)
    native = is_native(read_config(path))
    if native:
        model, config = load_model_only(path, lazy=lazy, model_config=model_config)
    else:  # an official Cheems / transformers Doge / legacy Doge checkpoint: map it in memory
        model, config = import_checkpoint(path, moe_routing=(model_config or {}).get("moe_routing"))
    if adapter_path is not None:
        from .adapters import LoRAError, load_adapters

        try:
            load_adapters(model, adapter_path)
        except LoRAError as e:
            raise LoadError(str(e)) from None
    tokenizer = load_folder_tokenizer(path, tokenizer_config, config.get("eos_token_id"), native)
    limit_vocabulary(model, tokenizer)
    compute_dtype(model, dtype or "auto")
    if dtype in (None, "auto", "stored") and not lazy:  # a float16 result is checked (not on the CPU,
        numerics.ensure_safe_dtype(model, tokenizer)  # where "auto" already computes in float32)
    if return_config:
        return model, tokenizer, config
    return model, tokenizer
