"""cheems_mlx.kernels.source: a kernel file split at its body marker, with its
``// #include "name.metal"`` lines resolved from metal_kernels/ (recursively, each file once),
so the helpers several kernels share are written once."""

import re
from importlib import resources

import pytest

from cheems_mlx import kernels

KERNEL_DIR = resources.files("cheems_mlx.metal_kernels")
KERNELS = sorted(p.name[: -len(".metal")] for p in KERNEL_DIR.iterdir()
                 if p.name.endswith(".metal") and kernels.BODY_MARKER in p.read_text())
SHARED = {"dma_addend": ["dma_decode", "dma_prefill"], "dma_kept": ["dma_decode", "dma_prefill"],
          "DMA_NONE": ["dma_decode", "dma_prefill"], "rope_rotate": ["ssd_step", "ssd_scan"]}
DEFINITION = r"(inline [\w ]+\b{0}\(|#define {0}\b)"


def test_every_kernel_file_is_loaded_with_its_includes_resolved():
    assert len(KERNELS) == 8
    for name in KERNELS:
        header, body = kernels.source(name)
        assert not kernels.INCLUDE.search(header + body), name
        assert body.strip()


def test_shared_helpers_are_written_once_and_reach_every_kernel_that_uses_them():
    files = {p.name: p.read_text() for p in KERNEL_DIR.iterdir() if p.name.endswith(".metal")}
    for helper, users in SHARED.items():
        defined_in = [f for f, text in files.items() if re.search(DEFINITION.format(helper), text)]
        assert len(defined_in) == 1 and defined_in[0].endswith("_common.metal"), (helper, defined_in)
        for name in users:
            header, body = kernels.source(name)
            assert len(re.findall(DEFINITION.format(helper), header)) == 1, (helper, name)
            assert helper in body, (helper, name)


def fake_reader(files):
    def read(name):
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]

    return read


def test_includes_are_recursive_and_each_file_comes_once():
    files = {
        "k.metal": '// #include "a.metal"\n// #include "b.metal"\n// ---- kernel body ----\nbody();\n',
        "a.metal": '//#include "c.metal"\nint a;\n',
        "b.metal": '  // #include  "c.metal"  \n// #include "a.metal"\nint b;\n',
        "c.metal": '// #include "a.metal"\n// #include "k.metal"\nint c;\n',  # cycles end
    }
    text = kernels.expand_includes(files["k.metal"], "k.metal", fake_reader(files))
    assert text.split() == ["int", "c;", "int", "a;", "int", "b;", "//", "----", "kernel", "body", "----", "body();"]


def test_a_missing_include_or_an_included_kernel_body_is_a_clear_error():
    files = {"k.metal": '// #include "gone.metal"\n// ---- kernel body ----\n',
             "j.metal": '// #include "k.metal"\n// ---- kernel body ----\n'}
    with pytest.raises(ValueError, match=r"metal_kernels/k\.metal includes 'gone\.metal', which is not in"):
        kernels.expand_includes(files["k.metal"], "k.metal", fake_reader(files))
    files["k.metal"] = "// ---- kernel body ----\n"
    with pytest.raises(ValueError, match=r"metal_kernels/k\.metal is included by j\.metal and must not hold"):
        kernels.expand_includes(files["j.metal"], "j.metal", fake_reader(files))
