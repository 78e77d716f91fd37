"""Metal kernels: loading the sources in ``metal_kernels/``, deciding when to use them, and
the safety net that keeps a failing kernel from reaching a user.

Each kernel lives in ``metal_kernels/<name>.metal`` and reads as Metal: helper functions
first, then a line ``// ---- kernel body ----``, then the body that
``mx.fast.metal_kernel`` wraps in the signature it generates (everything above the marker
is passed as ``header=``). Helpers several kernels share live once, in
``metal_kernels/*_common.metal``: a line ``// #include "dma_common.metal"`` (a comment to
Metal, since each kernel is compiled alone) is replaced by that file's text, its own
includes resolved the same way, each file at most once per kernel. The modules (ssd.py, dma.py, cdmoe.py) keep their pure-MLX ops
path as the reference and dispatch with::

    out = kernels.attempt(kernel_path, ...) if kernels.enabled(training=self.training) else None
    if out is None: ...ops path...

The kernel path is taken only when Metal is available, the default device is the GPU,
the module is not training (a CustomKernel has no VJP; the ops path trains), and the
environment does not say ``CHEEMS_MLX_KERNELS=0``.

The safety net (inside ``attempt``; a kernel function called directly, as the kernel tests
do, launches the kernel raw and lets its errors through):
- first-use self-check: before a kernel family's first launch (the kernel and its template:
  dtype, head size, ...) the kernel runs on the small deterministic inputs its module
  declares next to its dispatch (``@self_check(name)``: a function of the template
  returning ``SelfCheck(kernel_fn, ops_fn, inputs, tolerance)``), evaluated eagerly, and is
  compared with the ops path at ``TOLERANCE`` (the kernel tests' tolerances);
- fallback: a build error (the factory raising, or Metal's compiler at the self-check's
  evaluation), a launch error or an error beyond tolerance sets the family aside for the
  process (a build error: the whole kernel), ``attempt`` returns None and the module takes
  its ops path; one ``KernelWarning`` per kernel names it, the MLX version, the device and
  how to report it (``python -m cheems_mlx.doctor``). An error MLX raises only when the
  caller evaluates a graph after the self-check passed cannot be undone here; the
  self-check evaluates the same template first so that build errors surface there.
- verdicts are cached on disk (``cache_dir()``: $CHEEMS_MLX_CACHE_DIR, else
  $XDG_CACHE_HOME/cheems_mlx, else ~/.cache/cheems_mlx; one small JSON file per verdict,
  written atomically), keyed by the MLX version, the kernel's source hash, the device and
  the family, so a later process does not pay again. ``CHEEMS_MLX_KERNELS``: ``0`` never
  use the kernels, ``1`` (default) check once per machine, ``check`` re-check every process.

Tests run the kernels on Linux through an emulator (tests/metal_emulator) with
``kernels.backend(factory)``: kernels are then built by ``factory`` (same signature as
``mx.fast.metal_kernel``) and used on any device, with a fresh set-aside state.
"""

import hashlib
import json
import os
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx

BODY_MARKER = "// ---- kernel body ----"
INCLUDE = re.compile(r'^[ \t]*//[ \t]*#include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
MODES = ("0", "1", "check")
# relative to max(1, max|ops|), by activation dtype: float32 differs from the ops path in
# summation order only, float16 / bfloat16 by the ops path's roundings to 2^-11 / 2^-8
# (reasons per kernel in tests/test_kernels_*.py, which use the same table)
TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}
REPORT = "please report it in an issue with the output of `python -m cheems_mlx.doctor`"

_factory: Optional[Callable] = None  # None: mx.fast.metal_kernel
_built: Dict[Tuple, "Kernel"] = {}
CHECKS: Dict[str, Callable[..., "SelfCheck"]] = {}  # kernel name -> its module's self-check


class KernelWarning(RuntimeWarning):
    """A Metal kernel was set aside; the module runs its ops path instead."""


class SetAside(Exception):
    """Raised inside ``attempt`` by a launch of a kernel that is set aside."""


@dataclass
class SelfCheck:
    """``kernel_fn(*inputs)`` and ``ops_fn(*inputs)`` return an array or a tuple of arrays
    of the same shapes; floating outputs must agree within ``tolerance`` (relative to
    max(1, max|ops|)), integer outputs exactly."""

    kernel_fn: Callable
    ops_fn: Callable
    inputs: Tuple
    tolerance: float


@dataclass
class _State:
    set_aside: Dict[Tuple, str] = field(default_factory=dict)  # (name, family or None) -> why
    verdicts: Dict[Tuple, bool] = field(default_factory=dict)  # (name, family) -> passed
    warned: set = field(default_factory=set)  # kernel names already warned about


_state = _State()
_lock = threading.RLock()
_local = threading.local()  # .guarded: inside attempt(); .checking: inside a self-check


def metal_available() -> bool:
    return mx.metal.is_available()


def mode() -> str:
    """``CHEEMS_MLX_KERNELS``: '0', '1' (default) or 'check'; anything else warns once and
    counts as '1'."""
    value = os.environ.get("CHEEMS_MLX_KERNELS", "1")
    if value in MODES:
        return value
    _warn_once(("CHEEMS_MLX_KERNELS", value),
               f"CHEEMS_MLX_KERNELS={value!r} is none of 0 (never), 1 (checked once), check "
               "(re-check every process): using 1")
    return "1"


def enabled(training: bool = False) -> bool:
    """Whether the modules should take their kernel path now."""
    if training or mode() == "0":
        return False
    if _factory is not None:
        return True
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _read(filename: str) -> str:
    return resources.files("cheems_mlx.metal_kernels").joinpath(filename).read_text()


def expand_includes(text: str, filename: str, read: Callable[[str], str] = _read, seen=None) -> str:
    """``text`` (of ``filename``) with every ``// #include "other.metal"`` line replaced by
    ``read("other.metal")``, expanded in turn; a file already included (or ``filename``
    itself) is left out, so each file appears once and a cycle ends."""
    seen = {filename} if seen is None else seen

    def include(m):
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        try:
            text = read(name)
        except FileNotFoundError:
            raise ValueError(f"metal_kernels/{filename} includes {name!r}, which is not in metal_kernels/") from None
        if BODY_MARKER in text:
            raise ValueError(f"metal_kernels/{name} is included by {filename} and must not hold a kernel body")
        return expand_includes(text, name, read, seen).rstrip("\n")

    return INCLUDE.sub(include, text)


def source(name: str) -> Tuple[str, str]:
    """(header, body) of ``metal_kernels/<name>.metal``, its includes resolved."""
    text = expand_includes(_read(f"{name}.metal"), f"{name}.metal")
    if BODY_MARKER not in text:
        raise ValueError(f"metal_kernels/{name}.metal has no '{BODY_MARKER}' line")
    header, body = text.split(BODY_MARKER, 1)
    return header, body


def source_hash(name: str) -> str:
    header, body = source(name)
    return hashlib.sha256((header + BODY_MARKER + body).encode()).hexdigest()[:16]


def device_name() -> str:
    """The device the kernels run on: the GPU's name, or the test backend's."""
    if _factory is not None:
        name = getattr(_factory, "__qualname__", None) or type(_factory).__qualname__
        return getattr(_factory, "device_name", None) or f"test backend {name}"
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return str(info.get("device_name", "unknown device"))


def self_check(*names: str):
    """Decorator for a module's self-check of the kernels ``names``: a function of their
    template parameters (as keywords) returning a ``SelfCheck``."""

    def register(fn):
        for name in names:
            CHECKS[name] = fn
        return fn

    return register


def family(template) -> Tuple:
    """The part of a launch that selects the compiled kernel: its template, as plain values
    (dtypes by name)."""
    return tuple((n, v if isinstance(v, (bool, int)) else str(v).replace("mlx.core.", "")) for n, v in template or ())


def family_kwargs(fam: Tuple) -> Dict[str, Any]:
    """A family back as keywords for the self-check (dtypes as ``mx.Dtype``)."""
    return {n: getattr(mx, v) if isinstance(v, str) and isinstance(getattr(mx, v, None), mx.Dtype) else v
            for n, v in fam}


class Kernel:
    """What ``kernel`` returns: called like the object ``mx.fast.metal_kernel`` returns; built
    on first use; inside ``attempt`` every launch is guarded (self-check, set aside)."""

    def __init__(self, name: str, build: Callable[[], Callable]):
        self.name = name
        self._build = build
        self._kernel = None
        self.build_error: Optional[str] = None  # the factory raised: the whole kernel is out

    def built(self) -> Callable:
        if self._kernel is None:
            try:
                self._kernel = self._build()
            except Exception as e:
                self.build_error = f"{type(e).__name__}: {e}"
                raise
        return self._kernel

    def __call__(self, *args, **kwargs):
        if not getattr(_local, "guarded", False) or in_self_check():
            return self.built()(*args, **kwargs)
        fam = family(kwargs.get("template"))
        _require(self.name, fam)
        try:
            return self.built()(*args, **kwargs)
        except SetAside:
            raise
        except Exception as e:  # noqa: BLE001 -- a build or launch error: this family is out
            whole = self.build_error is not None
            _set_aside(self.name, None if whole else fam, f"failed to {'build' if whole else 'launch'}: {one_line(e)}")


def kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    atomic_outputs: bool = False,
    ensure_row_contiguous: bool = True,
) -> Kernel:
    """The kernel ``name`` (built once per backend), called like the object
    ``mx.fast.metal_kernel`` returns."""
    factory = _factory or mx.fast.metal_kernel
    # the factory itself (not its id) is in the key: a collected factory's id can be reused
    key = (factory, name, tuple(input_names), tuple(output_names), atomic_outputs, ensure_row_contiguous)
    if key not in _built:
        def build():
            header, body = source(name)
            return factory(
                name=name,
                input_names=list(input_names),
                output_names=list(output_names),
                source=body,
                header=header,
                ensure_row_contiguous=ensure_row_contiguous,
                atomic_outputs=atomic_outputs,
            )

        _built[key] = Kernel(name, build)
    return _built[key]


def attempt(kernel_path: Callable, *args, **kwargs):
    """``kernel_path(*args, **kwargs)`` with every kernel launch guarded; None when a kernel
    it needs is set aside (the caller then takes its ops path)."""
    outer = getattr(_local, "guarded", False)
    _local.guarded = True
    try:
        return kernel_path(*args, **kwargs)
    except SetAside:
        return None
    finally:
        _local.guarded = outer


# ----------------------------------------------------------------------------- self-check


def probe(shape, seed: int, dtype=mx.float32, scale: float = 1.0) -> mx.array:
    """Deterministic normal values for the self-checks (a seeded key: the global RNG is
    left alone)."""
    return (scale * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)


def max_error(ours, ref) -> float:
    """Largest error of ``ours`` against ``ref`` (arrays or tuples of arrays): relative to
    max(1, max|ref|) for floating outputs, 0 or inf for integer ones; inf for a shape
    mismatch or a non-finite value."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(ours) != len(ref):
        return float("inf")
    worst = 0.0
    for a, b in zip(ours, ref):
        if a.shape != b.shape:
            return float("inf")
        if not mx.issubdtype(b.dtype, mx.floating):
            if not mx.array_equal(a.astype(mx.int64), b.astype(mx.int64)).item():
                return float("inf")
            continue
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        if not mx.all(mx.isfinite(a)).item():
            return float("inf")
        scale = max(1.0, mx.max(mx.abs(b)).item()) if b.size else 1.0
        worst = max(worst, mx.max(mx.abs(a - b)).item() / scale if b.size else 0.0)
    return worst


def run_check(check: SelfCheck) -> Dict[str, Any]:
    """Run a self-check eagerly: {'ok', 'max_error', 'tolerance', 'error' (a build / launch
    error's message, or the check's own failure, or None), 'kernel_s', 'ops_s'}, and
    'check_failed' when the ops side could not run. Launches inside are raw."""
    outer = getattr(_local, "checking", False)
    _local.checking = True
    result = {"ok": False, "max_error": None, "tolerance": check.tolerance, "error": None,
              "kernel_s": None, "ops_s": None}

    def timed(fn):
        tic = time.perf_counter()
        out = fn(*check.inputs)
        mx.eval(out)
        return out, time.perf_counter() - tic

    try:
        try:
            ref, result["ops_s"] = timed(check.ops_fn)
        except Exception as e:  # noqa: BLE001 -- the check itself is broken: do not trust the kernel
            result.update(error=f"the ops side of the check failed: {type(e).__name__}: {e}", check_failed=True)
            return result
        try:
            ours, result["kernel_s"] = timed(check.kernel_fn)
        except Exception as e:  # noqa: BLE001 -- a build / launch error is the verdict
            result["error"] = f"{type(e).__name__}: {e}"
            return result
        err = max_error(ours, ref)
        result["max_error"] = err
        result["ok"] = err <= check.tolerance
    finally:
        _local.checking = outer
    return result


def in_self_check() -> bool:
    """Whether the launches now are a self-check's (tests count the real ones)."""
    return getattr(_local, "checking", False)


def cache_dir() -> Path:
    env = os.environ.get("CHEEMS_MLX_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cheems_mlx"


def _verdict_path(name: str, fam: Tuple) -> Tuple[Path, Dict]:
    key = {"mlx": mx.__version__, "kernel": name, "source": source_hash(name), "device": device_name(),
           "family": [list(p) for p in fam]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "kernel-checks" / f"{name}-{digest}.json", key


def _read_verdict(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_verdict(path: Path, verdict: Dict) -> None:
    """Atomically (a temporary file renamed); a cache that cannot be written is skipped:
    the check then runs again in the next process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdict, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def _require(name: str, fam: Tuple) -> None:
    """Raise SetAside unless kernel ``name`` at family ``fam`` may be used: not set aside,
    and its self-check passed (on disk, or run now)."""
    with _lock:
        if (name, None) in _state.set_aside or (name, fam) in _state.set_aside:
            raise SetAside(name)
        if _state.verdicts.get((name, fam)):
            return
        check = CHECKS.get(name)
        if check is None:  # nothing declared to compare with
            _state.verdicts[(name, fam)] = True
            return
        path, key = _verdict_path(name, fam)
        verdict = _read_verdict(path) if mode() != "check" else None
        cached = verdict is not None
        if not cached:
            try:
                result = run_check(check(**family_kwargs(fam)))
            except Exception as e:  # noqa: BLE001 -- a self-check that cannot be made: do not trust the kernel
                result = {"ok": False, "error": f"the self-check could not be made: {type(e).__name__}: {e}",
                          "check_failed": True}
            verdict = dict(key, **result)
            if not verdict.get("check_failed"):  # a broken check (or one run inside a trace) says nothing
                _write_verdict(path, verdict)   # lasting about the kernel: only this process sets it aside
        _state.verdicts[(name, fam)] = bool(verdict.get("ok"))
        if not verdict.get("ok"):
            why = (f"failed to build or launch in its self-check: {one_line(verdict['error'])}"
                   if verdict.get("error") else
                   f"differs from the ops path in its self-check: max error {verdict.get('max_error'):.3g} > "
                   f"{verdict.get('tolerance'):g}")
            if cached:
                why += f" (verdict cached in {path}; CHEEMS_MLX_KERNELS=check re-checks)"
            factory = _factory or mx.fast.metal_kernel
            build_failed = any(k[0] is factory and kern.name == name and kern.build_error for k, kern in _built.items())
            _set_aside(name, None if build_failed else fam, why)


def _set_aside(name: str, fam: Optional[Tuple], why: str) -> None:
    """Set the family (None: the whole kernel) aside for the process, warn once per kernel,
    and raise SetAside."""
    with _lock:
        _state.set_aside[(name, fam)] = why
        if name not in _state.warned:
            _state.warned.add(name)
            where = "" if fam is None else " (" + ", ".join(f"{n}={v}" for n, v in fam) + ")"
            warnings.warn(
                f"cheems_mlx: Metal kernel {name}{where} {why}. It is set aside for this process and "
                f"its module takes the ops path (the reference it must match). MLX {mx.__version__}, device "
                f"{device_name()}: {REPORT}.",
                KernelWarning, stacklevel=2,
            )
    raise SetAside(name)


def _warn_once(key, message: str) -> None:
    with _lock:
        if key not in _state.warned:
            _state.warned.add(key)
            warnings.warn(message, KernelWarning, stacklevel=3)


def one_line(message) -> str:
    lines = [s.strip() for s in str(message).splitlines() if s.strip()]
    text = " | ".join(lines[:4])
    return text if len(text) <= 400 else text[:397] + "..."


def set_aside() -> Dict[Tuple, str]:
    """The kernels set aside in this process: (name, family or None) -> why."""
    return dict(_state.set_aside)


@contextmanager
def backend(factory: Callable):
    """Test-only: build kernels with ``factory`` and take the kernel path on any device, with
    a fresh set-aside state (restored on exit)."""
    global _factory, _state
    previous = _factory, _state
    _factory, _state = factory, _State()
    try:
        yield
    finally:
        _factory, _state = previous
