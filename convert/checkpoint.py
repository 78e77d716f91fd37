"""Reading a source checkpoint into a native model, in memory: the first half of the
converter, and what ``cheems_mlx.load`` uses to open an unconverted PyTorch checkpoint
folder directly.

``resolve_source`` (a local folder, or a Hub repo fetched with
``huggingface_hub.snapshot_download``), ``read_config``, ``load_weights`` (safetensors,
validated before loading; or PyTorch ``.bin`` / ``.pt`` through
``torch.load(weights_only=True)`` only) and ``build_model``: detect the format, map names
and config (``formats.py``), build the native ``Model`` and check every tensor against it.
Writing the converted folder is ``convert.py``.

Every expected failure raises :class:`FormatError` with a one-line message that names
the file and / or tensor concerned.
"""

import json
import math
import os
import pickle
import re
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .formats import FormatError, detect_format, native_config, native_key

ROUTINGS = ("per_token", "transformers_reshape")

# files fetched from the Hub: configs / tokenizer first, weights in a second pass (so a
# repo holding both safetensors and .bin weights only downloads the safetensors)
_HUB_META_PATTERNS = [
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "tokenizer*",
    "vocab*",
    "merges*",
]
_HUB_SAFETENSORS_PATTERNS = ["*.safetensors"]
_HUB_TORCH_PATTERNS = ["*.bin", "*.pt"]

# PyTorch files in a checkpoint folder that are not model weights (trainer state)
_NOT_WEIGHTS = re.compile(
    r"^(training_args|optimizer|scheduler|scaler|trainer_state|rng_state.*|adapter_model)\.(bin|pt|pth)$"
)

# safetensors dtype -> item size in bytes
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps the header at 100 MB


def _fail(msg: str) -> "FormatError":
    return FormatError(" ".join(str(msg).split()))  # always one line


# --------------------------------------------------------------------------- source


def _looks_like_local_path(s: str) -> bool:
    """True for strings that cannot be a Hub repo id ("name" or "owner/name")."""
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(s)
    except Exception:
        return True
    return False


def _hub_download(repo: str, revision: Optional[str], patterns: List[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise _fail(f"{repo!r} is not a local folder and huggingface_hub is not importable ({e})")

    rev = f" (revision {revision!r})" if revision else ""
    not_cached = (
        f"could not fetch {repo!r}{rev} from the Hugging Face Hub and it is not in the local cache "
        f"(no local folder of that name exists either)"
    )
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        cause = e.__cause__ or e
        hint = "HF_HUB_OFFLINE is set" if offline else type(cause).__name__
        raise _fail(f"{not_cached} [{hint}]") from None
    except RevisionNotFoundError:
        raise _fail(f"revision {revision!r} of {repo!r} does not exist on the Hugging Face Hub") from None
    except GatedRepoError:
        raise _fail(
            f"{repo!r} is a gated repo on the Hugging Face Hub: log in (hf auth login) and accept its terms"
        ) from None
    except RepositoryNotFoundError:
        raise _fail(
            f"{repo!r} is neither a local folder nor a Hugging Face Hub repo you can access "
            f"(not found, or private: log in with hf auth login)"
        ) from None
    except Exception as e:  # connection / httpx errors and the like: any failure to reach the Hub
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise _fail(f"{not_cached} [{type(e).__name__}{': ' + detail if detail else ''}]") from None


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def resolve_source(hf_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """The local folder holding the checkpoint: ``hf_path`` itself, or its Hub snapshot."""
    s = str(hf_path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise _fail(f"source {p} is a file; give the checkpoint folder (with config.json and the weights)")
        if revision is not None:
            print(f"note: --revision {revision} is ignored for the local folder {p}", file=sys.stderr)
        return p
    if isinstance(hf_path, Path) or _looks_like_local_path(s):
        raise _fail(f"source folder {s} does not exist")

    folder = _hub_download(s, revision, _HUB_META_PATTERNS + _HUB_SAFETENSORS_PATTERNS)
    if not _has_safetensors(folder):
        folder = _hub_download(s, revision, _HUB_META_PATTERNS + _HUB_TORCH_PATTERNS)
    return folder


# --------------------------------------------------------------------------- config


def read_config(folder: Path) -> Tuple[dict, Path]:
    path = folder / "config.json"
    if not path.is_file():
        raise _fail(f"{path}: config.json not found (a checkpoint folder needs config.json next to the weights)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise _fail(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise _fail(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config, path


# --------------------------------------------------------------------------- weights


@dataclass
class SourceWeights:
    tensors: Dict[str, mx.array] = field(default_factory=dict)
    origin: Dict[str, Path] = field(default_factory=dict)  # source tensor name -> file
    files: List[Path] = field(default_factory=list)
    kind: str = ""  # "safetensors" or "pytorch"

    def add(self, key: str, value: mx.array, path: Path):
        if key in self.tensors:
            raise _fail(f"{path}: tensor {key!r} also appears in {self.origin[key]}")
        self.tensors[key] = value
        self.origin[key] = path


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without loading the data: every tensor must
    have a known dtype, a shape, and a byte range inside the file that matches its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _ST_MAX_HEADER or 8 + n > size:
                raise _fail(
                    f"{path}: corrupted or truncated safetensors file: header length {n} does not fit "
                    f"in the file ({size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise _fail(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(f"{path}: corrupted safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise _fail(f"{path}: corrupted safetensors header (not a JSON object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise _fail(f"{where}: corrupted safetensors header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise _fail(f"{where}: unknown safetensors dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _fail(f"{where}: corrupted safetensors header (shape {shape!r})")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(f"{where}: corrupted safetensors header (data_offsets {offsets!r})")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(
                f"{where}: corrupted safetensors header: data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]} bytes but shape {shape} x {dtype} needs {nbytes}"
            )
        if offsets[1] > data_size:
            raise _fail(
                f"{where}: truncated safetensors file: the tensor's data ends at byte {8 + n + offsets[1]} "
                f"but the file has {size} bytes"
            )
    return header


def load_safetensors(path: Path) -> Dict[str, mx.array]:
    header = read_safetensors_header(path)
    if not [k for k in header if k != "__metadata__"]:
        return {}
    try:
        return dict(mx.load(str(path), format="safetensors"))
    except Exception as e:
        raise _fail(f"{path}: cannot load safetensors file ({e})") from None


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise _fail(
            f"{path}: reading PyTorch checkpoints needs torch, which is not installed: "
            f'pip install "cheems-mlx[torch]" (or pip install torch)'
        ) from None
    return torch


def _torch_to_mx(torch, name: str, t, path: Path) -> mx.array:
    t = t.detach().cpu()
    try:
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; bf16 -> f32 -> bf16 is exact
            return mx.array(t.float().numpy()).astype(mx.bfloat16)
        return mx.array(t.contiguous().numpy())
    except Exception as e:
        raise _fail(f"{path}: tensor {name!r} of dtype {t.dtype} cannot be converted ({e})") from None


def _unpickling_detail(e: Exception) -> str:
    """The informative line of torch's long weights_only message."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    for line in lines:
        m = re.search(r"GLOBAL ([\w.<>]+)", line)
        if m:
            return f"it references the Python object {m.group(1)}"
    for line in lines:
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest[:200]
            after = lines[lines.index(line) + 1 :]
            if after:
                return after[0][:200]
    return (lines[-1] if lines else type(e).__name__)[:200]


def load_torch(path: Path) -> Dict[str, mx.array]:
    """A PyTorch state dict, read with ``torch.load(weights_only=True)`` only."""
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _fail(
            f"{path}: refusing to unpickle arbitrary code: torch.load(weights_only=True) rejected this "
            f"file ({_unpickling_detail(e)}); only plain tensor state dicts are read -- re-save the "
            f"weights as a state dict of tensors or as safetensors"
        ) from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(f"{path}: cannot read PyTorch checkpoint (truncated or not a torch file?): {msg}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise _fail(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = _torch_to_mx(torch, str(k), v, path)
    if not out:
        raise _fail(f"{path}: no tensors found in this PyTorch checkpoint")
    return out


def _read_index(path: Path) -> Dict[str, str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"{path}: invalid JSON ({e})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise _fail(f"{path}: no valid 'weight_map' (tensor name -> shard file)")
    return wm


def _load_sharded(index_path: Path, loader, sw: SourceWeights):
    wm = _read_index(index_path)
    folder = index_path.parent
    by_shard: Dict[str, List[str]] = {}
    for key, shard in wm.items():
        by_shard.setdefault(shard, []).append(key)
    for shard in by_shard:
        if not (folder / shard).is_file():
            raise _fail(f"{index_path}: shard {shard!r} listed in the index does not exist in {folder}")
    for shard, keys in by_shard.items():
        path = folder / shard
        tensors = loader(path)
        sw.files.append(path)
        for key in keys:
            if key not in tensors:
                raise _fail(f"{path}: tensor {key!r} is not in this shard, but {index_path.name} says it is")
            sw.add(key, tensors[key], path)


def _load_files(paths, loader, kind: str, sw: SourceWeights) -> SourceWeights:
    sw.kind = kind
    for path in paths:
        sw.files.append(path)
        for k, v in loader(path).items():
            sw.add(k, v, path)
    return sw


def load_weights(folder: Path) -> SourceWeights:
    """All tensors of the checkpoint in ``folder`` (safetensors preferred over PyTorch)."""
    sw = SourceWeights()
    st_index = folder / "model.safetensors.index.json"
    pt_index = folder / "pytorch_model.bin.index.json"
    if st_index.is_file():
        sw.kind = "safetensors"
        _load_sharded(st_index, load_safetensors, sw)
        return sw
    st_files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else sorted(
        folder.glob("model*.safetensors")
    )
    if st_files:
        return _load_files(st_files, load_safetensors, "safetensors", sw)
    if pt_index.is_file():
        sw.kind = "pytorch"
        _load_sharded(pt_index, load_torch, sw)
        return sw
    if (folder / "pytorch_model.bin").is_file():
        pt_files = [folder / "pytorch_model.bin"]
    else:
        pt_files = sorted(
            p for p in list(folder.glob("*.bin")) + list(folder.glob("*.pt")) if not _NOT_WEIGHTS.match(p.name)
        )
    if pt_files:
        return _load_files(pt_files, load_torch, "pytorch", sw)
    raise _fail(
        f"no weights found in {folder}: expected model.safetensors, sharded safetensors with "
        f"model.safetensors.index.json, pytorch_model.bin (or *.bin / *.pt, sharded with "
        f"pytorch_model.bin.index.json)"
    )


# --------------------------------------------------------------------------- model


@dataclass
class Converted:
    model: object
    config: dict  # native config (what goes into config.json, minus model_file)
    fmt: str
    source_dtype: Optional[mx.Dtype]


def _shape(a) -> Tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


def source_dtype(tensors: Dict[str, mx.array]) -> Optional[mx.Dtype]:
    """The floating dtype holding most of the source parameters (by element count)."""
    count: Counter = Counter()
    for v in tensors.values():
        if mx.issubdtype(v.dtype, mx.floating):
            count[v.dtype] += v.size
    if not count:
        return None
    return max(count.items(), key=lambda kv: kv[1])[0]


def _check_tensors_finite(tensors: Dict[str, mx.array], describe) -> None:
    """Refuse NaN / Inf anywhere in the weights (a corrupted or diverged checkpoint), naming
    the first such tensor (``describe(native_name)``) and how many values are bad."""
    names = sorted(tensors)
    bad = [mx.logical_not(mx.isfinite(tensors[k])).sum() for k in names]
    mx.eval(bad)
    for k, n in zip(names, bad):
        if n.item():
            others = sum(1 for m in bad if m.item()) - 1
            more = f" (and {others} more tensor{'s' if others > 1 else ''})" if others else ""
            raise _fail(
                f"{describe(k)} holds {n.item():,} NaN / Inf value{'s' if n.item() > 1 else ''} of "
                f"{tensors[k].size:,}{more}: the checkpoint is corrupted or its training diverged"
            )


def build_model(
    config: dict,
    sw: SourceWeights,
    config_path: Path,
    moe_routing: Optional[str] = None,
) -> Converted:
    """Map the source onto the native layout, build the model and load the weights,
    checking every tensor name and shape against what the config implies."""
    from cheems_mlx.model import Model, ModelArgs

    if "quantization" in config or "quantization_config" in config:
        raise _fail(f"{config_path}: quantized checkpoints are not supported (config has a quantization entry)")

    # native name -> (source name, source file); dropped tensors are not carried along
    native: Dict[str, mx.array] = {}
    where: Dict[str, Tuple[str, Path]] = {}
    for key, value in sw.tensors.items():
        nk = native_key(key)
        if nk is None:
            continue
        if nk in native:
            other = where[nk][0]
            raise _fail(f"{sw.origin[key]}: tensors {other!r} and {key!r} both map to {nk!r}")
        native[nk] = value
        where[nk] = (key, sw.origin[key])

    try:
        fmt = detect_format(config, sw.tensors.keys())
        nconfig = native_config(config, fmt, {k: _shape(v) for k, v in native.items()})
    except FormatError as e:
        raise _fail(f"{config_path}: {e}") from None
    nconfig.pop("model_file", None)
    if moe_routing is not None:
        _check_routing(moe_routing, nconfig, fmt)
        nconfig["moe_routing"] = moe_routing

    try:
        args = ModelArgs.from_dict(nconfig)
        model = Model(args)
    except (ValueError, TypeError, KeyError) as e:
        raise _fail(f"{config_path}: {e}") from None

    if args.tie_word_embeddings:
        native.pop("lm_head.weight", None)
    native = model.sanitize(native)

    expected = dict(tree_flatten(model.parameters()))

    def src(k):
        name, path = where[k]
        return f"{path}: tensor {name!r}" + (f" (native {k!r})" if name != k else "")

    problems = []
    for k in sorted(native):
        if k not in expected:
            problems.append(
                f"{src(k)} {list(_shape(native[k]))} is unexpected: the {fmt} model built from "
                f"{config_path.name} has no such parameter"
            )
    for k in sorted(expected):
        if k not in native:
            hint = ""
            if k == "lm_head.weight":
                hint = " (config.json sets tie_word_embeddings to false)"
            files = ", ".join(str(p) for p in sw.files) if len(sw.files) <= 2 else f"{sw.files[0].parent}"
            problems.append(
                f"missing tensor {k!r} (expected shape {list(_shape(expected[k]))}){hint}: not found in {files}"
            )
    for k in sorted(set(native) & set(expected)):
        if _shape(native[k]) != _shape(expected[k]):
            problems.append(
                f"{src(k)} has shape {list(_shape(native[k]))} but {config_path.name} implies "
                f"{list(_shape(expected[k]))} (the config contradicts the weights)"
            )
    for k in sorted(set(native) & set(expected)):
        if not mx.issubdtype(native[k].dtype, mx.floating):
            problems.append(f"{src(k)} has dtype {native[k].dtype}; expected a floating-point tensor")
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise _fail(problems[0] + more)
    _check_tensors_finite(native, src)

    model.update(tree_unflatten(list(native.items())))
    return Converted(model=model, config=nconfig, fmt=fmt, source_dtype=source_dtype(native))


def _check_routing(moe_routing: Optional[str], nconfig: dict, fmt: str) -> None:
    if moe_routing is None:
        return
    if moe_routing not in ROUTINGS:
        raise _fail(f"unknown moe_routing {moe_routing!r}; expected one of {ROUTINGS}")
    if moe_routing == "transformers_reshape" and nconfig.get("moe_router", "queries") != "router_gate":
        raise _fail(
            f"moe_routing 'transformers_reshape' applies only to Doge checkpoints (router_gate); "
            f"this one is {fmt!r}"
        )
