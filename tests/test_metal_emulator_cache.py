"""The emulator's build cache (tests/metal_emulator/emulator.py) stays bounded: it keeps the
most recently USED builds and precompiled shims and prunes the rest, oldest first. The
compiler is replaced by a stub that writes an empty file, so these tests build nothing."""

import os

import pytest

from metal_emulator import emulator


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEEMS_MLX_EMULATOR_CACHE", str(tmp_path))
    built = []

    def fake_compile(d, args, output):
        built.append(output.name)
        output.write_bytes(b"")

    monkeypatch.setattr(emulator, "_compile", fake_compile)
    clock = iter(range(1_000_000, 2_000_000, 10))

    def build(cpp):  # each call one "second" later: mtimes order the builds deterministically
        exe = emulator.compile_kernel(cpp)
        t = next(clock)
        os.utime(exe, (t, t))
        return exe

    return tmp_path, build, built


def names(d, pattern):
    return sorted(p.name for p in d.glob(pattern))


def test_cache_keeps_the_most_recently_used_builds(cache, monkeypatch):
    d, build, built = cache
    monkeypatch.setattr(emulator, "MAX_BUILDS", 2)
    a, b = build("// a"), build("// b")
    assert names(d, "*.bin") == sorted([a.name, b.name])
    c = build("// c")  # a is the least recently used: pruned with its source
    assert names(d, "*.bin") == sorted([b.name, c.name])
    assert not (d / a.name.replace(".plain.bin", ".cpp")).exists()
    assert build("// b") == b and built.count(b.name) == 1  # a hit: no rebuild, marked used
    e = build("// e")  # now c is the oldest
    assert names(d, "*.bin") == sorted([b.name, e.name])
    assert names(d, "*.cpp") == sorted(p.replace(".plain.bin", ".cpp") for p in (b.name, e.name))
    assert build("// a") != b and built.count(a.name) == 2  # a pruned build is rebuilt


def test_prune_keeps_a_bounded_number_of_precompiled_shims(tmp_path):
    for i in range(5):
        pch = tmp_path / f"pch-{i:016x}-plain"
        pch.mkdir()
        (pch / "shim.h.gch").write_bytes(b"")
        os.utime(pch, (1000 + i, 1000 + i))
    removed = emulator.prune_cache(tmp_path, max_builds=10, max_shims=2)
    assert sorted(removed) == [f"pch-{i:016x}-plain" for i in range(3)]
    assert names(tmp_path, "pch-*") == [f"pch-{i:016x}-plain" for i in (3, 4)]


def test_prune_keeps_a_source_another_sanitizer_build_still_uses(tmp_path):
    for i, name in enumerate(["k.plain.bin", "k.address.bin", "n.plain.bin"]):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    for key in "kn":
        (tmp_path / f"{key}.cpp").write_text("")
    assert emulator.prune_cache(tmp_path, max_builds=2, max_shims=6) == ["k.plain.bin"]
    assert names(tmp_path, "*") == ["k.address.bin", "k.cpp", "n.cpp", "n.plain.bin"]
