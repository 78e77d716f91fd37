"""``python -m cheems_mlx.doctor`` run as a user would, here on Linux: it exits 0, says plainly
that Metal is absent and what it checked instead, prints the markdown table and writes the
JSON report; with ``--emulator`` every kernel is checked on the CPU emulator and passes;
bad input is one error line and exit 1.
"""

import json
import os
import subprocess
import sys

import pytest

from cheems_mlx import kernels


def doctor(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run([sys.executable, "-m", "cheems_mlx.doctor", *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=cwd)


def test_doctor_without_metal_says_what_it_checked(tmp_path):
    out = tmp_path / "doctor.json"
    r = doctor("--kernels", "ssd_step", "cdmoe_route", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Metal is not available on this machine" in r.stdout
    assert "only the ops path of each case" in r.stdout and "no kernel was checked" in r.stdout
    assert "| kernel | dtype | case | ops ms |" in r.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["metal"] is False and report["checked_with"] == "ops path only"
    assert {row["kernel"] for row in report["rows"]} == {"ssd_step", "cdmoe_route"}
    assert {row["dtype"] for row in report["rows"]} == {"float32", "float16", "bfloat16"}
    assert not any(row["checked"] for row in report["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["doctor.json"]  # written atomically, nothing left over


def test_doctor_on_the_emulator_checks_every_kernel(tmp_path):
    out = tmp_path / "doctor.json"
    r = doctor("--emulator", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Metal is not available on this machine" in r.stdout and "CPU emulator" in r.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == set(kernels.CHECKS)
    assert all(row["checked"] and row["builds"] and row["ok"] for row in rows), [r for r in rows if not r.get("ok")]
    assert all(0 <= row["max_error"] <= row["tolerance"] for row in rows)
    assert f"{len(rows)} of {len(rows)} cases pass." in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--kernels", "nope"], "--kernels: unknown nope"),
    (["--dtypes", "float64"], "--dtypes: unknown float64"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/missing/doctor.json"], "does not exist"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_doctor_bad_input_is_one_line_and_exit_1(args, message, tmp_path):
    r = doctor(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
