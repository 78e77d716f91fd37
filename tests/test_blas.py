"""cheems_mlx.blas: the fast CBLAS is found and put in front of MLX's reference BLAS at import.

Each case runs in a fresh interpreter (the choice is made once, before mlx.core loads) with
no LD_PRELOAD, and checks which BLAS is reported and that a 512^3 float32 matmul through MLX
equals numpy's float64 product (the reference, computed independently of any CBLAS).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

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
# one-row / one-column products in every layout MLX hands cblas_sgemm (the gemv shim's cases)
f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
W, x, xc, C = f32(300, 173), f32(1, 173), f32(300, 1), f32(1, 300)
cases = [(lambda m: m["x"] @ m["W"].T, lambda n: n["x"] @ n["W"].T),  # a decode step's x @ W.T
         (lambda m: m["C"] @ m["W"], lambda n: n["C"] @ n["W"]),
         (lambda m: m["W"] @ m["x"].T, lambda n: n["W"] @ n["x"].T),  # N == 1
         (lambda m: m["W"].T @ m["xc"], lambda n: n["W"].T @ n["xc"]),
         (lambda m: m["W"][::2, 5:105].T[None, 3:4] @ m["W"][::2, 10:60],  # strided views
          lambda n: n["W"][::2, 5:105].T[None, 3:4] @ n["W"][::2, 10:60]),
         (lambda m: m["W"][None, :4, None, :] @ m["W"][:50].T, lambda n: n["W"][None, :4, None, :] @ n["W"][:50].T),
         (lambda m: m["x"] @ m["x"].T, lambda n: n["x"] @ n["x"].T),  # M == N == 1
         (lambda m: mx.addmm(m["C"][:, :173], m["x"], m["W"][:173].T, alpha=2.0, beta=0.5),  # beta != 0
          lambda n: 0.5 * n["C"][:, :173] + 2.0 * n["x"] @ n["W"][:173].T),
         # 2-4 rows against a small B: one sgemv a row (verification steps, attention over a cache)
         (lambda m: m["W"][:3] @ m["W"].T, lambda n: n["W"][:3] @ n["W"].T),
         (lambda m: m["W"][:, :4].T @ m["W"], lambda n: n["W"][:, :4].T @ n["W"]),  # transposed rows
         (lambda m: m["W"][:20].reshape(1, 2, 2, -1)[..., :40] @ m["W"][:80, :40].reshape(1, 2, 40, 40).swapaxes(-1, -2),
          lambda n: n["W"][:20].reshape(1, 2, 2, -1)[..., :40] @ n["W"][:80, :40].reshape(1, 2, 40, 40).swapaxes(-1, -2)),
         (lambda m: mx.addmm(m["W"][:2, :50], m["W"][4:6], m["W"][:50].T, alpha=-1.5, beta=2.0),
          lambda n: 2.0 * n["W"][:2, :50] - 1.5 * n["W"][4:6] @ n["W"][:50].T),
         (lambda m: m["W"][:5] @ m["W"].T, lambda n: n["W"][:5] @ n["W"].T)]  # 5 rows: the BLAS's GEMM
mats = {k: mx.array(v) for k, v in dict(W=W, x=x, xc=xc, C=C).items()}
refs = {k: v.astype(np.float64) for k, v in dict(W=W, x=x, xc=xc, C=C).items()}
gemv_err = 0.0
for ours, ref in cases:
    g, w_ = np.array(ours(mats)), ref(refs)
    assert g.shape == w_.shape, (g.shape, w_.shape)
    gemv_err = max(gemv_err, float(np.abs(g - w_).max() / np.abs(w_).max()))
print(json.dumps({"in_use": blas.in_use(), "global": blas.global_cblas(), "path": blas.select()["path"],
                  "gemv": blas.select().get("gemv"), "routed": blas.gemv_routed(), "cases": len(cases),
                  "err": max(gemv_err, float(np.abs(got - want).max() / np.abs(want).max())),
                  "warnings": [str(w.message) for w in caught]}))
"""


def probe(env_blas=None, mlx_first=False, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV, "CHEEMS_MLX_GEMV")}
    if env_blas is not None:
        env[blas.ENV] = env_blas
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", PROBE] + (["--mlx-first"] if mlx_first else []),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5  # float32 accumulation over <= 512 terms, relative to the largest entry
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
    assert os.path.realpath(r["path"]) == os.path.realpath(fast_blas())
    assert r["in_use"].split(" (")[0] in ("OpenBLAS", "BLIS", "MKL", "FlexiBLAS") and "found" in r["in_use"]
    assert r["warnings"] == []
    if r["gemv"] is None:  # no C compiler here: the BLAS alone
        assert os.path.realpath(r["global"]) == os.path.realpath(fast_blas())
    else:  # the shim's cblas_sgemm is what MLX binds to, and it took every one-row product
        assert os.path.realpath(r["global"]) == os.path.realpath(r["gemv"])
        assert "sgemv" in r["in_use"] and r["routed"] >= 8  # at least the four plain layouts and the rows


@pytest.mark.skipif(fast_blas() is None, reason="no system CBLAS (OpenBLAS / BLIS / MKL) on this machine")
def test_gemv_shim_is_built_and_can_be_turned_off(tmp_path):
    """With a C compiler the shim is built into the cache folder (here a fresh one) and used;
    CHEEMS_MLX_GEMV=0 loads the BLAS alone. The products equal numpy's either way (probe)."""
    import shutil

    fresh = probe(XDG_CACHE_HOME=str(tmp_path))
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert fresh["gemv"] and fresh["gemv"].startswith(str(tmp_path / "cheems_mlx"))
        assert list((tmp_path / "cheems_mlx").glob("*.so")) == [Path(fresh["gemv"])]  # no temporary left
    off = probe(CHEEMS_MLX_GEMV="0")
    assert off["gemv"] is None and off["routed"] is None and "sgemv" not in off["in_use"]
    assert os.path.realpath(off["global"]) == os.path.realpath(fast_blas())


@pytest.mark.skipif(fast_blas() is None, reason="no system CBLAS (OpenBLAS / BLIS / MKL) on this machine")
def test_override_path_is_loaded():
    r = probe(fast_blas())
    assert os.path.realpath(r["path"]) == os.path.realpath(fast_blas())
    assert blas.ENV in r["in_use"]


def test_bogus_override_warns_and_falls_back():
    r = probe("/nonexistent/libnothing.so")
    assert any("/nonexistent/libnothing.so" in w and "not a loadable library" in w for w in r["warnings"])
    if fast_blas() is None:
        assert r["in_use"].startswith("MLX's bundled reference BLAS")
        assert any("no fast BLAS found" in w for w in r["warnings"])
    else:
        assert os.path.realpath(r["path"]) == os.path.realpath(fast_blas())


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
