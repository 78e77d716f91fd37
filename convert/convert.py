"""Convert a Cheems / Doge checkpoint (local folder or Hugging Face Hub repo) to an
mlx-lm model folder.

    convert(hf_path, mlx_path, dtype=None, force=False, moe_routing=None, revision=None)

Steps: resolve the source folder, read ``config.json`` and the weights, detect the format,
map names / config, build the native ``Model`` and check every tensor against it (all in
``checkpoint.py``, which ``cheems_mlx.load`` also uses); then cast, and write
``model.safetensors`` + ``config.json`` + ``cheems_model.py`` + the tokenizer files into a
temporary sibling of the output folder that is renamed into place at the end.

Every expected failure raises :class:`FormatError` with a one-line message that names
the file and / or tensor concerned.
"""

import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from cheems_mlx.io import DTYPES, SHIM, SHIM_NAME, OutputExistsError, cast_model, check_destination, save_model_dir

from .checkpoint import (
    ROUTINGS,
    Converted,
    SourceWeights,
    _check_routing,
    _fail,
    build_model,
    load_weights,
    read_config,
    resolve_source,
    source_dtype,
)
from .formats import is_native

DOGE_FORMATS = ("doge", "doge_legacy")

MODEL_FILE, MODEL_FILE_TEXT = SHIM_NAME, SHIM

# tokenizer / generation files copied as they are (glob patterns, top level only)
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tokenizer*.json",
    "tokenizer*.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "chat_template*.jinja",
    "vocab.json",
    "vocab.txt",
    "vocab*",
    "merges.txt",
    "merges*",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "tiktoken*",
    "preprocessor_config.json",
    "processor_config.json",
)

# --------------------------------------------------------------------------- output


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.name in copied or not p.is_file() or p.name == "config.json":
                continue
            if p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".index.json"):
                continue
            shutil.copyfile(p, dst / p.name)  # follows Hub-cache symlinks
            copied.append(p.name)
    return copied


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _dtype_name(d) -> str:
    return str(d).replace("mlx.core.", "")




def load_quantized_folder(src: Path, config: dict, config_path: Path, moe_routing: Optional[str]) -> Converted:
    """A quantized cheems_mlx folder, loaded with its quantized layers (mlx-lm's loader)."""
    from cheems_mlx.loading import LoadError, load_model_only

    fmt = f"native {config.get('source_format')}"
    _check_routing(moe_routing, config, fmt)
    overrides = {"moe_routing": moe_routing} if moe_routing is not None else {}
    try:
        model, loaded = load_model_only(src, model_config=overrides)
    except (LoadError, ValueError, KeyError, TypeError) as e:
        raise _fail(f"{config_path}: cannot load this quantized model ({e})") from None
    nconfig = {k: v for k, v in loaded.items() if k != "model_file"}
    floats = {k: v for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    return Converted(model=model, config=nconfig, fmt=fmt, source_dtype=source_dtype(floats))


def _check_finite(model, nconfig: dict, what: str) -> None:
    """A few tokens through the model: a quantization that breaks it fails here, not later."""
    n = min(4, int(nconfig.get("vocab_size", 4)))
    logits = model(mx.arange(n, dtype=mx.int32)[None]).astype(mx.float32)
    if not mx.all(mx.isfinite(logits)).item():
        raise _fail(f"the {what} model produces non-finite logits; try more bits or another --dtype")


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    dtype: Optional[str] = None,
    force: bool = False,
    moe_routing: Optional[str] = None,
    revision: Optional[str] = None,
    *,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: Optional[str] = None,
    quant_predicate: Optional[str] = None,
    dequantize: bool = False,
    verbose: bool = True,
) -> Path:
    """Convert the checkpoint at ``hf_path`` (folder or Hub repo id) into an mlx-lm model
    folder at ``mlx_path`` and return that path.

    dtype: float32 / float16 / bfloat16; default: the source weights' dtype. Parameters
    for which ``Model.cast_predicate`` is False (``A``, CDMoE ``keys``) stay float32.
    force: replace an existing ``mlx_path`` (only once the new folder is complete).
    moe_routing: per_token / transformers_reshape; default: the format's (Doge:
    transformers_reshape, the reference behaviour; Cheems: per_token).
    quantize: quantize the weights (``cheems_mlx.quantize``, i.e. mlx-lm's
    ``quantize_model`` with ``Model.quant_predicate``): ``q_bits`` (affine: 2, 3, 4, 5, 6,
    8; default 4), ``q_group_size`` (affine: 32, 64, 128; default 64), ``q_mode`` (affine,
    mxfp4, nvfp4, mxfp8; the fp modes have fixed bits / group size), ``quant_predicate``
    (an mlx-lm mixed-bit recipe: mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6). The
    non-quantized parameters (and the scales) are cast to ``dtype`` first.
    dequantize: turn a quantized cheems_mlx folder back into a floating-point one.
    A quantized source is only accepted with ``dequantize``: to quantize it with other
    settings, dequantize it first (or better, quantize the original float model).
    """
    from cheems_mlx import quantize as Q

    if dtype is not None and dtype not in DTYPES:
        raise _fail(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if moe_routing is not None and moe_routing not in ROUTINGS:
        raise _fail(f"unknown moe_routing {moe_routing!r}; expected one of {ROUTINGS}")
    if quantize and dequantize:
        raise _fail("choose either --quantize or --dequantize, not both")
    q_opts = {"--q-bits": q_bits, "--q-group-size": q_group_size, "--q-mode": q_mode, "--quant-predicate": quant_predicate}
    given = [k for k, v in q_opts.items() if v is not None]
    if given and not quantize:
        raise _fail(f"{', '.join(given)} only apply with -q/--quantize (quantization settings)")
    if quantize:
        try:
            Q.resolve_settings(q_bits, q_group_size, q_mode, quant_predicate)  # fail before any work
        except Q.QuantizeError as e:
            raise _fail(str(e)) from None

    dst = Path(mlx_path).expanduser().absolute()
    try:
        check_destination(dst, force)
    except OutputExistsError as e:
        raise _fail(str(e)) from None

    src = resolve_source(hf_path, revision)
    if _same_or_inside(src, dst):
        raise _fail(f"the output folder {dst} must not be (or contain) the source folder {src}")
    config, config_path = read_config(src)
    src_quant = config.get("quantization") or config.get("quantization_config")
    if src_quant and is_native(config):
        if not dequantize:
            again = (
                "it cannot be quantized again (re-quantizing compounds the rounding error): quantize the "
                "original float model, or first --dequantize it into a new folder and quantize that copy"
                if quantize
                else "only --dequantize converts a quantized model"
            )
            raise _fail(f"{src} is already quantized ({Q.describe(config.get('quantization'))}); {again}")
        conv = load_quantized_folder(src, config, config_path, moe_routing)
        sw = SourceWeights(kind="safetensors", files=sorted(src.glob("model*.safetensors")))
    else:
        if dequantize and not src_quant:
            raise _fail(f"--dequantize: {src} is not quantized (its config.json has no quantization entry)")
        sw = load_weights(src)
        conv = build_model(config, sw, config_path, moe_routing)
    model, nconfig = conv.model, conv.config

    if (
        nconfig.get("is_moe")
        and nconfig.get("moe_router") == "router_gate"
        and moe_routing is None
        and conv.fmt in DOGE_FORMATS  # a converted folder already records its routing
    ):
        print(
            f"note: {conv.fmt} MoE checkpoint: moe_routing defaults to 'transformers_reshape', which "
            f"reproduces transformers exactly but routes non-causally across a full forward pass; "
            f"--moe-routing per_token gives causal per-token routing",
            file=sys.stderr,
        )

    if dtype is not None:
        target = getattr(mx, dtype)
    else:
        target = conv.source_dtype or mx.float32
        if target not in (mx.float32, mx.float16, mx.bfloat16):
            target = mx.float32

    report = None
    if dequantize:
        try:
            model, nconfig = Q.dequantize(model, nconfig)
        except Q.QuantizeError as e:
            raise _fail(f"{src}: {e}") from None
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    if quantize:
        cast_model(model, target)  # scales and biases take the weights' dtype
        try:
            model, nconfig, report = Q.quantize(model, nconfig, q_bits, q_group_size, q_mode, quant_predicate)
        except Q.QuantizeError as e:
            raise _fail(f"{src}: {e}") from None
        _check_finite(model, nconfig, "quantized")

    copied: List[str] = []
    save_model_dir(
        model, dict(nconfig), dst, dtype=None if quantize else target, force=force,
        write_extra=lambda tmp: copied.extend(copy_tokenizer_files(src, tmp)),
    )

    if report is not None and report.indivisible_note():
        print(report.indivisible_note(), file=sys.stderr)
    if verbose:
        types = Counter(getattr(layer, "layer_type", "?") for layer in model.layers)
        layers = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
        moe = f", MoE {nconfig['num_experts']} experts ({nconfig['moe_routing']})" if nconfig.get("is_moe") else ""
        n_files = len(sw.files)
        print(f"format: {conv.fmt} ({sw.kind}, {n_files} file{'s' if n_files != 1 else ''}) from {src}")
        if src_quant:
            print(f"dequantized: {Q.describe(config.get('quantization'))} -> floating point")
        print(f"layers: {nconfig['num_hidden_layers']} ({layers}){moe}")
        print(f"dtype: {_dtype_name(target)}, parameters: {n_params:,}")
        if report is not None:
            for line in report.lines():
                print(line)
        if not copied:
            print("tokenizer: no tokenizer files in the source")
        print(f"saved: {dst}")
    return dst
