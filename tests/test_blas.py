"""cheems_mlx.blas: the fast CBLAS is found and put in front of MLX's reference BLAS at import.

Each case runs in a fresh interpreter (the choice is made once, before mlx.core loads) with
no LD_PRELOAD, and checks which BLAS is reported and that a 512^3 float32 matmul through MLX
equals numpy's float64 product (the reference, computed independently of any CBLAS).
"""

import json
import os
import subprocess
import sys

import pytest

from cheems_mlx import blas

PROBE = r"""
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    if "--mlx-first" in sys.argv:
        import mlx.core
    import cheems_mlx
from cheems_mlx import blas
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a, b = rng.standard_normal((512, 512)), rng.standard_normal((512, 512))
got = np.array(mx.array(a.astype(np.float32)) @ mx.array(b.astype(np.float32)))
want = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
print(json.dumps({"in_use": blas.in_use(), "global": blas.global_cblas(),
                  "err": float(np.abs(got - want).max() / np.abs(want).max()),
                  "warnings": [str(w.message) for w in caught]}))
"""


def probe(env_blas=None, mlx_first=False):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV)}
    if env_blas is not None:
        env[blas.ENV] = env_blas
    out = subprocess.run([sys.executable, "-c", PROBE] + (["--mlx-first"] if mlx_first else []),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5  # float32 accumulation over 512 terms, relative to the largest entry
    return result


def fast_blas():
    return next((p for p in blas.candidates() if blas.exports_cblas(p)), None)


def test_none_keeps_the_reference_blas_silently():
    r = probe("none")
    assert r["in_use"].startswith("MLX's bundled reference BLAS") and r["global"] is None
    assert r["warnings"] == []


@pytest.mark.skipif(fast_blas() is None, reason="no system CBLAS (OpenBLAS / BLIS / MKL) on this machine")
def test_finds_a_fast_blas_without_ld_preload():
    r = probe()
    assert os.path.realpath(r["global"]) == os.path.realpath(fast_blas())
    assert r["in_use"].split(" (")[0] in ("OpenBLAS", "BLIS", "MKL", "FlexiBLAS") and "found" in r["in_use"]
    assert r["warnings"] == []


@pytest.mark.skipif(fast_blas() is None, reason="no system CBLAS (OpenBLAS / BLIS / MKL) on this machine")
def test_override_path_is_loaded():
    r = probe(fast_blas())
    assert os.path.realpath(r["global"]) == os.path.realpath(fast_blas())
    assert blas.ENV in r["in_use"]


def test_bogus_override_warns_and_falls_back():
    r = probe("/nonexistent/libnothing.so")
    assert any("/nonexistent/libnothing.so" in w and "not a loadable library" in w for w in r["warnings"])
    if fast_blas() is None:
        assert r["in_use"].startswith("MLX's bundled reference BLAS")
        assert any("no fast BLAS found" in w for w in r["warnings"])
    else:
        assert os.path.realpath(r["global"]) == os.path.realpath(fast_blas())


def test_a_library_without_plain_cblas_symbols_is_refused():
    # libc exports no cblas_sgemm: it must not count as a BLAS (as scipy-openblas's renamed
    # scipy_cblas_sgemm would not)
    import ctypes.util

    libc = ctypes.util.find_library("c")
    assert not blas.exports_cblas(libc)
    r = probe(libc)
    assert any("not a loadable library" in w for w in r["warnings"])


@pytest.mark.skipif(fast_blas() is None, reason="no system CBLAS (OpenBLAS / BLIS / MKL) on this machine")
def test_mlx_imported_first_says_how_to_fix_it():
    r = probe(mlx_first=True)
    assert r["in_use"].startswith("MLX's bundled reference BLAS")
    (msg,) = [w for w in r["warnings"] if "imported before cheems_mlx" in w]
    assert f"LD_PRELOAD={fast_blas()}" in msg


def test_reference_blas_is_never_a_candidate(tmp_path):
    # a plain libblas.so.3 counts only when it resolves to an optimized BLAS
    ref = tmp_path / "libblas.so.3"
    ref.write_bytes(b"")
    assert not blas.is_fast(str(ref))
    assert blas.is_fast("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    assert blas.is_fast("/opt/env/lib/libmkl_rt.so.3")
