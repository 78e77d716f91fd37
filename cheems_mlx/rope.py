"""Rotary position embedding shared by the SSD (on B and C) and DMA (on Q and K) mixers.

Rotate-half layout (``traditional=False``), positions given by a cache offset that may be
an int or an ``(batch,)`` array (mlx-lm's batched caches keep one offset per row).
``rope_cos_sin`` reads the rotation off at given positions (the Metal kernels' input, and
a decode step's one cos / sin for two arrays, applied by ``rotate_half``).
"""

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope


def rope_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


class RotaryEmbedding(nn.Module):
    """RoPE over the last axis of ``x: (batch, heads, seq, dims)``.

    ``dynamic`` scaling follows transformers' dynamic-NTK rule (the same formula as
    mlx-lm's ``DynamicNTKScalingRoPE``): once the largest position of the call reaches
    ``max_position_embeddings`` the base becomes
    ``base * (factor * seq_len / max_pos - (factor - 1)) ** (dims / (dims - 2))``.
    """

    def __init__(self, dims: int, base: float, scaling: Optional[dict], max_position_embeddings: int):
        super().__init__()
        self.dims = dims
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.kind = rope_type(scaling)
        if self.kind == "dynamic":
            self.factor = float(scaling["factor"])
            self._rope = None
        else:
            self._rope = initialize_rope(dims, base, False, scaling, max_position_embeddings)

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        if self._rope is not None:
            return self._rope(x, offset=offset)
        # dynamic NTK: the base depends on the largest position of this call
        last = offset if isinstance(offset, int) else int(mx.max(offset).item())
        seq_len = last + x.shape[-2]
        base = self.base
        if seq_len > self.max_position_embeddings:
            base = self.base * (
                self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            ) ** (self.dims / (self.dims - 2))
        return mx.fast.rope(x, self.dims, traditional=False, base=base, scale=1.0, offset=offset)


_PROBES = {}  # n -> e = (1, .., 1, 0, .., 0), built once


def rope_cos_sin(rope: RotaryEmbedding, b: int, l: int, n: int, offset) -> mx.array:
    """(b, l, n) float32 ``[cos | sin]`` of the rotations ``rope`` applies at each row's
    positions offset .. offset + l - 1 (rotate-half: element i pairs with i + n/2). Read off
    by rotating e = (1, .., 1, 0, .., 0), so every rope variant (dynamic NTK, llama3, yarn's
    scale) is whatever the ops path applies; the kernels then rotate B and C themselves."""
    if n not in _PROBES:
        _PROBES[n] = mx.concatenate([mx.ones((n // 2,), mx.float32), mx.zeros((n - n // 2,), mx.float32)])
    probe = _PROBES[n]
    rows = 1 if isinstance(offset, int) or offset.ndim == 0 else offset.shape[0]
    cs = rope(mx.broadcast_to(probe, (rows, 1, l, n)), offset).reshape(rows, l, n)
    return mx.broadcast_to(cs, (b, l, n))


def rotate_half(x: mx.array, cos_sin: mx.array) -> mx.array:
    """RoPE from a precomputed ``[cos | sin]`` (``rope_cos_sin``, broadcast against ``x``'s
    leading axes) over the whole last axis: the products ``mx.fast.rope`` forms on the CPU,
    in its order (x1 cos - x2 sin, x1 sin + x2 cos), so one cos / sin serves two arrays."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin.astype(x.dtype)  # as mx.fast.rope: the result keeps x's dtype
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
