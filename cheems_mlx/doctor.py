"""``python -m cheems_mlx.doctor``: what the Metal kernels do on this machine, as a report to
paste into a bug report.

The machine (platform, chip, macOS and MLX versions, memory, the BLAS in use where it can be
told), then for every kernel over a grid of shapes (ragged lengths, GQA ratios, batch > 1,
padding; the self-check inputs each module declares, ``kernels.CHECKS``) in float32 /
float16 / bfloat16: whether it builds (with the compiler's message), its largest error
against the ops path and the tolerance, and its time against the ops path. A markdown table
on the terminal, a JSON file with ``--out``.

Where Metal is absent (Linux) it says so: ``--emulator`` runs the same grid through the CPU
emulator of a source checkout (tests/metal_emulator: the kernels compiled as C++ and run
with threadgroup semantics; errors are meaningful, times are not), otherwise only the ops
side of each check runs and no kernel is checked.

Exit status 0 once the report is out (failing kernels are rows of it), 1 on bad input.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from . import __version__, bench, kernels
from .cli import run_cli
from . import cdmoe, dma, ssd  # noqa: F401 -- they declare the kernels' self-checks

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# per kernel: (self-check keywords, "small" | "large"); large cases time real sizes and are
# left out under the emulator (minutes each on a CPU)
GRID = {
    "ssd_step": [({"P": 16, "N": 16, "b": 1, "h": 1}, "small"), ({"P": 64, "N": 64, "b": 3, "h": 3}, "small"),
                 ({"P": 64, "N": 64, "ROPE": False}, "small"), ({"P": 64, "N": 64, "b": 8, "h": 16}, "large")],
    "ssd_scan": [({"P": 16, "N": 16, "l": 13}, "small"), ({"P": 64, "N": 64, "l": 45, "b": 3}, "small"),
                 ({"P": 64, "N": 64, "b": 1, "h": 16, "l": 2048}, "large")],
    "dma_prefill": [({"P": 16, "REP": 1, "L": 37}, "small"), ({"P": 64, "REP": 2, "L": 50, "B": 3}, "small"),
                    ({"P": 64, "REP": 4, "MASK_PER_HEAD": True, "L": 21}, "small"),
                    ({"P": 64, "REP": 4, "Hkv": 4, "B": 1, "L": 2048}, "large")],
    "dma_decode": [({"P": 16, "REP": 1, "keys": 37}, "small"), ({"P": 64, "REP": 2, "B": 3}, "small"),
                   ({"P": 64, "REP": 4, "MASK_PER_HEAD": True, "keys": 300}, "small"),
                   ({"P": 64, "REP": 4, "Hkv": 4, "B": 1, "keys": 4096}, "large")],
    "dma_decode_combine": [({"P": 64}, "small")],
    "cdmoe_route": [({"K": 8, "TOPK": 4}, "small"), ({"K": 13, "TOPK": 6, "NORM": True, "rows": 17}, "small"),
                    ({"K": 40, "TOPK": 33}, "small"), ({"K": 128, "TOPK": 16, "rows": 8192}, "large")],
    "cdmoe_mix": [({"D": 32, "M": 4}, "small"), ({"D": 256, "M": 16, "tokens": 5}, "small"),
                  ({"D": 1024, "M": 64, "tokens": 2048, "experts": 16384}, "large")],
    "cdmoe_mix_q": [({"D": 64, "M": 4, "BITS": 4, "GS": 32}, "small"), ({"D": 256, "M": 8, "BITS": 3, "GS": 64}, "small"),
                    ({"D": 128, "M": 8, "BITS": 8, "GS": 128}, "small"),
                    ({"D": 1024, "M": 64, "BITS": 4, "GS": 64, "tokens": 2048, "experts": 16384}, "large")],
}
TIMING_REPS = 10
CHECKOUT_TESTS = Path(__file__).resolve().parents[1] / "tests"


class DoctorError(ValueError):
    pass


# ----------------------------------------------------------------------------- the machine


def blas() -> str:
    """The BLAS behind MLX's float32 matmuls, how it was chosen and whether one-row products go
    through its sgemv (``cheems_mlx.blas.in_use``)."""
    from . import blas as blas_choice

    return blas_choice.in_use()


def total_memory_gb() -> Optional[float]:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if "memory_size" in info:
        return info["memory_size"] / 2**30
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def chip() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return str(info.get("device_name") or platform.processor() or platform.machine())


def machine() -> Dict:
    """bench's description of the machine, with the chip, macOS, memory and the BLAS
    libraries actually loaded."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    memory = total_memory_gb()
    return dict(
        bench.machine(),
        chip=chip(),
        gpu_architecture=info.get("architecture"),
        macos=platform.mac_ver()[0] or None,
        cheems_mlx=__version__,
        python=platform.python_version(),
        memory_gb=None if memory is None else round(memory, 1),
        blas_loaded=blas(),
        metal=kernels.metal_available(),
    )


# ----------------------------------------------------------------------------- the kernels


def emulator_factory():
    """The emulator's factory from a source checkout's tests/, or None."""
    if not (CHECKOUT_TESTS / "metal_emulator" / "__init__.py").exists():
        return None
    sys.path.insert(0, str(CHECKOUT_TESTS))
    try:
        from metal_emulator import make_factory
    except ImportError:
        return None
    finally:
        sys.path.remove(str(CHECKOUT_TESTS))
    return make_factory()


def check_case(name: str, case: Dict, dtype: str, run_kernel: bool, reps: int) -> Dict:
    """One kernel at one shape and dtype: builds?, max error / tolerance, kernel and ops ms."""
    row = {"kernel": name, "dtype": dtype, "case": case}
    check = kernels.CHECKS[name](T=DTYPES[dtype], **case)
    if not run_kernel:
        row.update(checked=False, ops_ms=1e3 * bench.timeit(lambda: check.ops_fn(*check.inputs), reps))
        return row
    result = kernels.run_check(check)
    row.update(checked=True, builds=result["error"] is None, error=result["error"],
               max_error=result["max_error"], tolerance=result["tolerance"], ok=result["ok"])
    if row["builds"]:
        row["kernel_ms"] = 1e3 * bench.timeit(lambda: check.kernel_fn(*check.inputs), reps)
        row["ops_ms"] = 1e3 * bench.timeit(lambda: check.ops_fn(*check.inputs), reps)
    return row


def check_kernels(names, dtypes, backend: str, large: bool, quick: bool, progress) -> List[Dict]:
    """Every grid case of ``names`` (quick: the first) in ``dtypes``; backend 'metal',
    'emulator' or 'ops'."""
    rows = []
    factory = emulator_factory() if backend == "emulator" else None
    reps = TIMING_REPS if backend == "metal" else 1
    for name in names:
        for case, size in GRID[name][:1] if quick else GRID[name]:
            if size == "large" and not large:
                continue
            for dtype in dtypes:
                try:
                    if factory is not None:
                        with kernels.backend(factory):
                            row = check_case(name, case, dtype, True, reps)
                    else:
                        row = check_case(name, case, dtype, backend == "metal", reps)
                except Exception as e:  # noqa: BLE001 -- a report row, not a crash of the report
                    row = {"kernel": name, "dtype": dtype, "case": case, "checked": True, "builds": False,
                           "ok": False, "error": f"{type(e).__name__}: {e}"}
                rows.append(row)
                progress(row)
    return rows


# ----------------------------------------------------------------------------- the report


def case_text(case: Dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def markdown(report: Dict) -> str:
    m = report["machine"]
    lines = [
        "## cheems_mlx doctor", "",
        f"- platform: {m['platform']}; chip: {m['chip']}" + (f" ({m['gpu_architecture']})" if m["gpu_architecture"] else "")
        + f"; {m['cpus']} CPUs",
        f"- macOS: {m['macos'] or 'not macOS'}; MLX {m['mlx']}; cheems_mlx {m['cheems_mlx']}; Python {m['python']}",
        f"- memory: {m['memory_gb']} GB; BLAS: {m['blas_loaded']}; default device: {m['device']}",
        f"- checked with: {report['checked_with']}", "",
    ]
    lines += [f"> {note}" for note in report["notes"]] + [""]
    if report["checked_with"] == "ops path only":
        lines += ["| kernel | dtype | case | ops ms |", "|---|---|---|---:|"]
        lines += [f"| {r['kernel']} | {r['dtype']} | {case_text(r['case'])} | "
                  + (f"{r['ops_ms']:.3f} |" if "ops_ms" in r else f"error: {kernels.one_line(r['error'])} |")
                  for r in report["rows"]]
        return "\n".join(lines) + "\n"
    lines += ["| kernel | dtype | case | builds | max error | tolerance | ok | kernel ms | ops ms | x |",
              "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        if not r["builds"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {case_text(r['case'])} | no: "
                         f"{kernels.one_line(r['error'])} | | | NO | | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {case_text(r['case'])} | yes | {r['max_error']:.2e} | "
            f"{r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} | {r['kernel_ms']:.3f} | {r['ops_ms']:.3f} | "
            f"{r['ops_ms'] / max(r['kernel_ms'], 1e-9):.2f} |")
    failed = [r for r in report["rows"] if not r.get("ok")]
    lines += ["", f"{len(report['rows']) - len(failed)} of {len(report['rows'])} cases pass" +
              ("." if not failed else f"; failing: {', '.join(sorted({r['kernel'] for r in failed}))}.")]
    return "\n".join(lines) + "\n"


def write_json(path: Path, report: Dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DoctorError(f"cannot write {path}: {e.strerror or e}") from None


def notes(backend: str, requested_emulator: bool, large: bool) -> List[str]:
    if backend == "metal":
        return ["Metal kernels built by MLX's Metal compiler and run on this GPU; times are the median of "
                f"{TIMING_REPS} runs after a warm-up (the first run includes the build)."]
    out = [f"Metal is not available on this machine ({platform.system()} {platform.machine()}, "
           f"{mx.default_device()}): no kernel was built by Apple's Metal compiler or run on an Apple GPU, "
           "and no kernel time here says anything about Apple GPUs."]
    if backend == "emulator":
        out.append("Checked instead: the same grid through the CPU emulator of this source checkout "
                   "(tests/metal_emulator): each kernel's generated source compiled as C++20 against a Metal "
                   "shim and run with threadgroup semantics; 'builds' is that C++ build, the errors are "
                   "meaningful, the kernel times are the emulator's (a subprocess per launch)." +
                   ("" if large else " Large (timing) cases are left out."))
    else:
        out.append("Checked instead: only the ops path of each case (the kernels' references) ran; no kernel "
                   "was checked." + (" --emulator needs a source checkout with tests/metal_emulator, which "
                                     "this installation does not have." if requested_emulator else
                                     " From a source checkout, --emulator runs the kernels on the CPU emulator."))
    return out


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise DoctorError(message)


def parse(argv) -> argparse.Namespace:
    p = Parser(prog="python -m cheems_mlx.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--emulator", action="store_true",
                   help="where Metal is absent: run the kernels on the CPU emulator of a source checkout")
    p.add_argument("--kernels", nargs="+", metavar="NAME", help=f"only these kernels (of: {', '.join(GRID)})")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE", help=f"only these dtypes (of: {', '.join(DTYPES)})")
    p.add_argument("--quick", action="store_true", help="the first case of each kernel only")
    p.add_argument("--large", action="store_true", help="include the large timing cases under the emulator")
    a = p.parse_args(argv)
    for option, given, known in (("--kernels", a.kernels, GRID), ("--dtypes", a.dtypes, DTYPES)):
        unknown = [x for x in given or () if x not in known]
        if unknown:
            raise DoctorError(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if a.out is not None:
        if a.out.is_dir():
            raise DoctorError(f"--out {a.out} is a directory; give a file name, e.g. {a.out / 'doctor.json'}")
        if not a.out.parent.is_dir():
            raise DoctorError(f"--out {a.out}: the folder {a.out.parent} does not exist")
    return a


def run(a: argparse.Namespace) -> int:
    backend = "metal" if kernels.metal_available() else ("emulator" if a.emulator and emulator_factory() else "ops")
    names = a.kernels or list(GRID)
    dtypes = a.dtypes or list(DTYPES)
    large = backend == "metal" or a.large
    checked_with = {"metal": "Metal (this GPU)", "emulator": "the CPU emulator (no Metal here)",
                    "ops": "ops path only"}[backend]
    print(f"cheems_mlx doctor: {len(names)} kernels, {', '.join(dtypes)}, checked with {checked_with}", file=sys.stderr)

    def progress(row):
        status = ("ok" if row.get("ok") else "FAIL") if row.get("checked") else "ops only"
        print(f"  {row['kernel']:<18} {row['dtype']:<8} {case_text(row['case'])}: {status}", file=sys.stderr, flush=True)

    rows = check_kernels(names, dtypes, backend, large, a.quick, progress)
    report = {"machine": machine(), "checked_with": checked_with, "notes": notes(backend, a.emulator, large),
              "kernel_sources": {n: kernels.source_hash(n) for n in names}, "rows": rows}
    print(markdown(report))
    if a.out is not None:
        write_json(a.out, report)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse(argv)), (DoctorError,))


if __name__ == "__main__":
    sys.exit(main())
