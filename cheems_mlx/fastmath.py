"""Elementwise functions in the form MLX's CPU backend runs fastest.

MLX's CPU elementwise kernels run on one thread, and its ``exp`` / ``sigmoid`` cost 14-18 ns
per float32 against 6 ns for ``power`` (measured on the 2-core x86 machine of
docs/benchmarks.md): at long prompts the softmax of the attention scores and the SiLU of the
MLPs are most of the non-matmul time. So exp(x) is written 2^(x log2 e) and
silu(x) = x / (1 + 2^(-x log2 e)) -- the same functions to float32 rounding (the exponent's
product rounds at ~|x| * 6e-8 relative), on the Metal backend too, where either form is
memory-bound. ``swiglu`` is compiled shapeless, as mlx-lm's, so its three elementwise steps
run as one kernel. ``compile_mode`` reads ``CHEEMS_MLX_COMPILE``, which decides what else is
compiled (``model.compiled_decode_enabled``, ``dma.masked_attention``). This module is a
leaf: it imports only MLX.
"""

import os
from functools import partial

import mlx.core as mx

LOG2E = 1.4426950408889634


def exp(x: mx.array) -> mx.array:
    return mx.power(2.0, x * LOG2E)


def silu(x: mx.array) -> mx.array:
    return x / (1 + mx.power(2.0, x * -LOG2E))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    return silu(gate) * up


def compile_mode() -> str:
    """``CHEEMS_MLX_COMPILE``: "1" (the default: the whole model's decode step as one compiled
    function, and the compiled helpers), "layers" (each layer's compiled decode functions
    only) or "0" (every operation eager)."""
    return os.environ.get("CHEEMS_MLX_COMPILE", "1").strip()
