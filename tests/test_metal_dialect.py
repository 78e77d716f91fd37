"""Every kernel's generated source stays in Metal's dialect (C++14 with restrictions), which the
emulator's C++20 build cannot tell (tests/metal_emulator/dialect.py): it compiles as C++14
with exceptions and RTTI off against a C++14 declaration of the Metal names, and a token-level
check finds no lambda, recursion, goto, new / delete, exception, virtual function, derived
class, thread_local, double, C++ standard library or pointer parameter without an address
space. The sources are the ones MLX generates for each kernel's self-check launches (every
kernel, float32 / float16 / bfloat16, quantized tables), captured without running them; the
planted edits show that a kernel leaving the dialect fails here.
"""

import mlx.core as mx
import pytest

import cheems_mlx.cdmoe  # noqa: F401 -- the modules register their self-checks
import cheems_mlx.dma  # noqa: F401
import cheems_mlx.ssd  # noqa: F401
from cheems_mlx import kernels

from conftest import KERNEL_DTYPES, planted_kernel
from metal_emulator import generated_source
from metal_emulator.dialect import compile_errors, dialect_violations

# (kernel, extra template keywords of its self-check): cdmoe_mix_q needs quantized tables
LAUNCHES = {name: {} for name in kernels.CHECKS}
LAUNCHES["cdmoe_mix_q"] = {"D": 64, "BITS": 4, "GS": 32}


class Capture:
    """A factory that records the source MLX generates for each launch and returns zeros."""

    def __init__(self):
        self.sources = {}

    def __call__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, **_):
        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None, **__):
            self.sources[name] = generated_source(
                name, input_names, output_names, source, header, inputs, output_shapes, output_dtypes, grid,
                threadgroup, template, init_value, ensure_row_contiguous, atomic_outputs)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return launch


def generated(name, dtype):
    """{kernel: generated source} of the launches of ``name``'s self-check in ``dtype``."""
    capture = Capture()
    check = kernels.CHECKS[name](T=KERNEL_DTYPES[dtype], **LAUNCHES[name])
    with kernels.backend(capture):
        check.kernel_fn(*check.inputs)
    assert name in capture.sources, f"the self-check of {name} does not launch it"
    return capture.sources


@pytest.mark.parametrize("dtype", list(KERNEL_DTYPES))
@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_generated_kernel_is_metal_dialect(name, dtype):
    text = generated(name, dtype)[name]
    assert dialect_violations(text) == []
    errors = compile_errors(text, name)
    assert errors is None, errors


# A real kernel (cdmoe_mix) with one edit that leaves Metal's dialect: a helper added to its
# header, or a statement added at the top of its body. (edit, what the report must say; None:
# a C++17 construct that only the C++14 compile rejects)
PLANTED = {
    "lambda": ("body", "auto twice = [](int v) { return 2 * v; };", "lambda"),
    "recursion": ("header", "inline int depth(int n) { return n <= 0 ? 0 : 1 + depth(n - 1); }", "recursion"),
    "goto": ("body", "goto done;\ndone:", "goto"),
    "new": ("body", "float* extra = new float[4];", "new"),
    "exceptions": ("body", "if (D < 0) { throw 1; }", "exceptions"),
    "virtual": ("header", "struct Act { virtual float f(float) const; };", "virtual"),
    "derived class": ("header", "struct A {};\nstruct B : A {};", "derived class"),
    "thread_local": ("header", "thread_local int calls;", "thread_local"),
    "double": ("body", "const double unit = 1.0;", "double"),
    "std": ("body", "const float big = std::numeric_limits<float>::max();", "standard library"),
    "include": ("header", "#include <cmath>", "standard library"),
    "pointer without address space": ("header", "inline float first(const float* p) { return p[0]; }",
                                      "without an address space"),
    "if constexpr (C++17)": ("body", "if constexpr (D > 0) {}", None),
    "structured binding (C++17)": ("body", "int pair[2] = {1, 2};\nauto [p0, p1] = pair;", None),
}
BODY_ANCHOR = "  const uint tok = thread_position_in_grid.y;"


@pytest.mark.parametrize("edit", PLANTED)
def test_a_kernel_edited_out_of_the_dialect_fails(edit, monkeypatch):
    part, snippet, reported = PLANTED[edit]
    header, body = kernels.source("cdmoe_mix")
    if part == "header":
        header = header + snippet + "\n"
    else:
        assert body.count(BODY_ANCHOR) == 1, "the planted edit no longer matches the kernel source"
        body = body.replace(BODY_ANCHOR, snippet + "\n" + BODY_ANCHOR)
    capture = Capture()
    check = kernels.CHECKS["cdmoe_mix"](T=mx.float32)
    with kernels.backend(capture):
        planted_kernel(monkeypatch, "cdmoe_mix", body, header, capture)
        check.kernel_fn(*check.inputs)
    source = capture.sources["cdmoe_mix_planted"]
    violations = dialect_violations(source)
    if reported is None:
        assert violations == []
        assert compile_errors(source, "cdmoe_mix_planted") is not None
    else:
        assert any(reported in v for v in violations), violations


def test_the_checks_pass_the_allowed_neighbours():
    """What looks like a forbidden construct but is Metal: subscripts, attributes, `enum class
    X : int`, `::` qualifiers, address-space pointers, a function calling another."""
    ok = """
    enum class Mode : int { a, b };
    inline float g(float v) { return v; }
    inline float f(const device float* p, threadgroup float& t, thread int* k) { return g(p[0]) + t; }
    [[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
      out[i] = metal::exp(out[(i + 1) % 4]);  // lambda [] in a comment: std::vector
    }
    """
    assert dialect_violations(ok) == []
