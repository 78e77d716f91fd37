"""Metal kernels: loading the sources in ``metal_kernels/`` and deciding when to use them.

Each kernel lives in ``metal_kernels/<name>.metal`` and reads as Metal: helper functions
first, then a line ``// ---- kernel body ----``, then the body that
``mx.fast.metal_kernel`` wraps in the signature it generates (everything above the marker
is passed as ``header=``). Helpers several kernels share live once, in
``metal_kernels/*_common.metal``: a line ``// #include "dma_common.metal"`` (a comment to
Metal, since each kernel is compiled alone) is replaced by that file's text, its own
includes resolved the same way, each file at most once per kernel. The modules (ssd.py, dma.py, cdmoe.py) keep their pure-MLX ops
path as the reference and dispatch with::

    if kernels.enabled(training=self.training): ...kernel path...
    else: ...ops path...

The kernel path is taken only when Metal is available, the default device is the GPU,
the module is not training (a CustomKernel has no VJP; the ops path trains), and the
environment does not say ``CHEEMS_MLX_KERNELS=0``.

Tests run the kernels on Linux through an emulator (tests/metal_emulator) with
``kernels.backend(factory)``: kernels are then built by ``factory`` (same signature as
``mx.fast.metal_kernel``) and used on any device.
"""

import os
import re
from contextlib import contextmanager
from importlib import resources
from typing import Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx

BODY_MARKER = "// ---- kernel body ----"
INCLUDE = re.compile(r'^[ \t]*//[ \t]*#include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)

_factory: Optional[Callable] = None  # None: mx.fast.metal_kernel
_built: Dict[Tuple, Callable] = {}


def metal_available() -> bool:
    return mx.metal.is_available()


def enabled(training: bool = False) -> bool:
    """Whether the modules should take their kernel path now."""
    if training or os.environ.get("CHEEMS_MLX_KERNELS", "1") == "0":
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


def kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    atomic_outputs: bool = False,
    ensure_row_contiguous: bool = True,
) -> Callable:
    """The compiled kernel ``name`` (built once per backend), called like the object
    ``mx.fast.metal_kernel`` returns."""
    factory = _factory or mx.fast.metal_kernel
    # the factory itself (not its id) is in the key: a collected factory's id can be reused
    key = (factory, name, tuple(input_names), tuple(output_names), atomic_outputs, ensure_row_contiguous)
    if key not in _built:
        header, body = source(name)
        _built[key] = factory(
            name=name,
            input_names=list(input_names),
            output_names=list(output_names),
            source=body,
            header=header,
            ensure_row_contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
        )
    return _built[key]


@contextmanager
def backend(factory: Callable):
    """Test-only: build kernels with ``factory`` and take the kernel path on any device."""
    global _factory
    previous = _factory
    _factory = factory
    try:
        yield
    finally:
        _factory = previous
