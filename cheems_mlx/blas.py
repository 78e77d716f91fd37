"""Which CBLAS the float32 matrix products of MLX's CPU backend run on, chosen before MLX loads.

The ``mlx[cpu]`` wheel for Linux links a bundled reference (netlib) BLAS: ``libmlx.so``
leaves ``cblas_sgemm`` undefined and the dynamic linker looks in the process's global scope
first, so a CBLAS loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is first imported takes
the reference one's place (measured here: a 1024^3 float32 matmul 401 ms -> 14 ms with
OpenBLAS), exactly as ``LD_PRELOAD`` would. ``select()`` does that; cheems_mlx/__init__.py
calls it before anything imports MLX (so ``import cheems_mlx`` and every
``python -m cheems_mlx.*`` get it). This module is a leaf: it never imports MLX.

What is loaded, first match wins:
1. ``CHEEMS_MLX_BLAS=PATH`` loads that file; ``CHEEMS_MLX_BLAS=none`` loads nothing;
2. a CBLAS already in the global scope (``LD_PRELOAD``) is kept;
3. the first of ``candidates()`` that exports the plain symbol ``cblas_sgemm``: OpenBLAS,
   BLIS and FlexiBLAS at the usual Debian / Ubuntu / Fedora / Arch paths, MKL's
   ``libmkl_rt`` from this environment (the ``blas`` extra: PyPI's ``mkl`` wheel), then
   ``ctypes.util.find_library``. A library whose symbols are renamed (scipy-openblas's
   ``scipy_cblas_sgemm``) or a plain ``libblas.so.3`` that is the reference BLAS again is
   never taken.
In front of the BLAS found, a small ``cblas_sgemm`` (``gemv_shim.c``, built once with the
system C compiler into ``~/.cache/cheems_mlx``; ``CHEEMS_MLX_GEMV=0`` leaves it out) sends
one-row products -- every weight product of a decode step -- to the BLAS's ``cblas_sgemv``:
OpenBLAS runs them through its GEMM at about half the memory speed otherwise; products of
2-4 rows against a small matrix (a decode step's attention over its cache, a short
verification of drafted tokens) go there a row at a time, and small ones run on one thread
(the file's comment has the rules and measurements). Without a compiler the BLAS is loaded
alone.
Without any, one warning says the float32 matmuls run on the reference BLAS and how to
get a fast one. ``in_use()`` names the library MLX's ``cblas_sgemm`` resolves to (the
generate CLI prints it with ``--verbose``). On macOS MLX uses Accelerate and nothing here
applies.
"""

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import List, Optional

ENV = "CHEEMS_MLX_BLAS"
SYMBOL = "cblas_sgemm"
FAST_NAMES = ("openblas", "blis", "mkl", "flexiblas")
INSTALL_HINT = (
    "install a fast one: `apt-get install libopenblas0-pthread` (Debian / Ubuntu), "
    "`dnf install openblas` (Fedora), or `pip install 'cheems-mlx[blas]'` (MKL from PyPI, x86_64)"
)

_choice = {"path": None, "how": "not selected yet"}  # what select() did
_warned = set()


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas() -> Optional[str]:
    """The file providing ``cblas_sgemm`` in the process's global scope (what libmlx.so
    binds to ahead of its bundled BLAS), or None."""
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), SYMBOL), ctypes.c_void_p).value
    except AttributeError:
        return None
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return "an unnamed library"
    return os.fsdecode(info.dli_fname)


def exports_cblas(path: str) -> bool:
    """Whether ``path`` loads and exports the plain ``cblas_sgemm`` (loaded privately)."""
    try:
        return hasattr(ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL), SYMBOL)
    except OSError:
        return False


def is_fast(path: str) -> bool:
    """An optimized BLAS by name (symlinks such as Debian's alternatives followed)."""
    real = os.path.realpath(path).lower()
    return any(name in os.path.basename(real) or f"/{name}" in real for name in FAST_NAMES)


def candidates() -> List[str]:
    """Fast CBLAS files to try, in order, existing ones only, each real file once."""
    arch = platform.machine()
    multiarch = f"/usr/lib/{arch}-linux-gnu"
    prefixes = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    paths = [
        f"{multiarch}/libopenblas.so.0",  # Debian / Ubuntu (an alternatives link)
        f"{multiarch}/openblas-pthread/libopenblas.so.0",
        f"{multiarch}/openblas-openmp/libopenblas.so.0",
        f"{multiarch}/libblas.so.3",  # taken only when it resolves to a fast BLAS
        f"{multiarch}/libblis.so.4",
        f"{multiarch}/blis-pthread/libblis.so.4",
        f"{multiarch}/blis-openmp/libblis.so.4",
        "/usr/lib64/libopenblasp.so.0",  # Fedora / RHEL (pthreads, plain, OpenMP)
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib64/libopenblaso.so.0",
        "/usr/lib64/libblis.so.4",
        "/usr/lib64/libflexiblas.so.3",
        "/usr/lib/libopenblas.so.0",  # Arch, Alpine
        "/usr/lib/libopenblas.so.3",
        "/usr/lib/libblis.so.4",
    ]
    for prefix in prefixes:  # pip's mkl wheel (the `blas` extra), conda's openblas / mkl
        paths += [str(prefix / name) for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libopenblas.so.0")]
    for name in ("openblas", "blis", "mkl_rt", "flexiblas"):
        found = ctypes.util.find_library(name)  # a bare file name from the linker cache
        if found and not any(os.path.basename(p) == found for p in paths if os.path.exists(p)):
            paths.append(found)
    seen, out = set(), []
    for p in paths:
        if "/" in p and not os.path.exists(p):
            continue
        key = os.path.realpath(p)
        if key not in seen and is_fast(p):
            seen.add(key)
            out.append(p)
    return out


def load_global(path: str) -> None:
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def shim_cache_dir(environ) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cheems_mlx"


def build_gemv_shim(environ) -> Optional[str]:
    """``gemv_shim.c`` built with the system C compiler (``$CC`` or cc / gcc / clang) into
    the user's cache folder, once per source text (a temporary file renamed into place, so
    concurrent builds never see half a library; a folder that cannot be written falls back to
    the temporary one); the path, or None when no built copy exists and none can be built."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    src = Path(__file__).with_name("gemv_shim.c")
    if not src.exists():
        return None
    digest = hashlib.sha256(src.read_bytes() + platform.machine().encode()).hexdigest()[:16]
    compiler = next((c for c in (environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    for folder in (shim_cache_dir(environ), Path(tempfile.gettempdir()) / f"cheems_mlx-{os.getuid()}"):
        target = folder / f"libcheems_gemv-{digest}.so"
        if target.exists():
            return str(target)
        if compiler is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(src), "-ldl"],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return str(target)
            os.unlink(tmp)
            return None
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def gemv_shim(blas_path: str, environ) -> Optional[str]:
    """Load ``gemv_shim.c``'s ``cblas_sgemm`` globally in front of ``blas_path`` (which it
    loads globally itself), so MLX's one-row matmuls run as ``cblas_sgemv``: a decode
    step's weight products at the BLAS's matrix-vector speed (OpenBLAS < 0.3.27 runs them
    through its GEMM at about half). ``CHEEMS_MLX_GEMV=0`` turns it off. The shim's path,
    or None when it cannot be built or loaded (then nothing was loaded)."""
    if environ.get("CHEEMS_MLX_GEMV", "1").strip() == "0":
        return None
    path = build_gemv_shim(environ)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cheems_gemv_init.argtypes = [ctypes.c_char_p]
        lib.cheems_gemv_routed.restype = ctypes.c_long
        if lib.cheems_gemv_init(os.fsencode(blas_path)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    _choice["shim_lib"] = lib
    return path


def gemv_routed() -> Optional[int]:
    """How many products the shim has sent to sgemv so far (None without the shim)."""
    lib = _choice.get("shim_lib")
    if lib is None:
        return None
    return int(lib.cheems_gemv_routed())


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select(environ=None) -> dict:
    """Put a fast CBLAS in front of MLX's reference BLAS (see the module docstring); once
    per process. Returns ``{"path": the file or None, "how": how it was chosen}``."""
    if _choice["how"] != "not selected yet":
        return dict(_choice)
    environ = os.environ if environ is None else environ
    override = environ.get(ENV, "").strip()
    if sys.platform != "linux":
        _choice.update(path=None, how="not Linux: MLX uses its platform's BLAS")
        return dict(_choice)
    already = global_cblas()
    if override.lower() == "none":
        _choice.update(path=already, how=f"{ENV}=none")
        return dict(_choice)
    if already is not None:  # LD_PRELOAD, or a library loaded globally before us
        _choice.update(path=already, how="already loaded (LD_PRELOAD)")
        return dict(_choice)
    if override and not exports_cblas(override):
        warn_once("override", f"{ENV}={override!r} is not a loadable library exporting {SYMBOL}; "
                              f"looking for a fast BLAS as without it ({ENV}=none loads nothing)")
        override = ""
    found = override or next((p for p in candidates() if exports_cblas(p)), None)
    if "mlx.core" in sys.modules:  # its cblas_sgemm is bound already: loading now changes nothing
        _choice.update(path=None, how="mlx.core was imported first")
        if found:
            warn_once("too late", (
                "mlx.core was imported before cheems_mlx, so MLX keeps its bundled reference BLAS "
                "(float32 matmuls ~30x slower); import cheems_mlx before mlx, or start Python with "
                f"LD_PRELOAD={found}"))
            return dict(_choice)
    elif found:
        shim = gemv_shim(found, environ)
        if shim is None:
            load_global(found)
        _choice.update(path=found, how=ENV if override else "found", gemv=shim)
        return dict(_choice)
    else:
        _choice.update(path=None, how="none found")
    warn_once("reference", (
        "no fast BLAS found: MLX's float32 matrix products run on its bundled reference BLAS "
        f"(~30x slower); {INSTALL_HINT}, or point {ENV} at a CBLAS library"))
    return dict(_choice)


def in_use() -> str:
    """One line: the BLAS behind MLX's float32 matmuls on this machine, and how it was chosen."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    path = global_cblas()
    if path is None:
        return f"MLX's bundled reference BLAS (slow; {INSTALL_HINT})"
    shim = _choice.get("gemv")
    if shim is not None and os.path.realpath(path) == os.path.realpath(shim):
        path = _choice["path"]
    name = next((n for n in ("OpenBLAS", "BLIS", "MKL", "FlexiBLAS") if n.lower() in
                 os.path.realpath(path).lower()), os.path.basename(path))
    gemv = "; one-row products through its sgemv" if shim is not None else ""
    return f"{name} ({path}; {_choice['how']}{gemv})"
