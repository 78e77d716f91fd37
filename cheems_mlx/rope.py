"""Rotary position embedding shared by the SSD (on B and C) and DMA (on Q and K) mixers.

Rotate-half layout (``traditional=False``), positions given by a cache offset that may be
an int or an ``(batch,)`` array (mlx-lm's batched caches keep one offset per row).
``rope_cos_sin`` reads the rotation off at given positions (the Metal kernels' input, and
the probe path's cos / sin, applied by ``rotate_half``); ``rotate_step`` rotates the arrays of
a decode step or a short call (up to ``SHORT_CALL`` positions), for plain RoPE in one fused
elementwise kernel each.
"""

import contextlib
import math
import threading
from typing import Optional, Sequence, Union

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


# calls of up to this many positions (a decode step, the verification of drafted tokens) rotate
# with ``rotate_step``: a few operations, cos / sin formed per element (cheap at this length)
SHORT_CALL = 16
_SIGNS = {}  # dtype -> [[-1], [1]]: the signs of the swapped halves' sine terms
_SHARED = threading.local()  # .memo: rotate_step's angles inside shared_rotations()


@contextlib.contextmanager
def shared_rotations():
    """Inside this block ``rotate_step`` forms the cos / sin of one offset array (the same
    object), rope and layout once and reuses them: a traced decode step whose attention
    layers share one offset computes them once, not once a layer."""
    previous = getattr(_SHARED, "memo", None)
    _SHARED.memo = {}
    try:
        yield
    finally:
        _SHARED.memo = previous


def rope_inv_freq(rope: RotaryEmbedding) -> Optional[mx.array]:
    """The inverse frequencies of a plain RoPE (mlx's ``nn.RoPE``, rotate-half, over the whole
    head) as ``mx.fast.rope`` forms them -- exp(-i * log(base) / (dims / 2)), i = 0 .. dims/2 - 1,
    in float32 -- computed once; None for the scaled variants (llama3, yarn, dynamic NTK)."""
    r = rope._rope
    if type(r) is not nn.RoPE or r.traditional:
        return None
    inv = rope.__dict__.get("_inv_freq")
    if inv is None:
        half = r.dims // 2
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(r.base) / half))
        mx.eval(inv)
        object.__setattr__(rope, "_inv_freq", inv)  # not a parameter: outside the module tree
    return inv


def rotate_step(rope: RotaryEmbedding, xs: Sequence[mx.array], offset, seq_axis: int) -> list:
    """RoPE of a decode step's or a short call's arrays (each (b, ..., P) with the l positions
    on ``seq_axis``, offset an int or a () / (b,) array), as ``rope(x, offset)`` rotates them.
    For a plain RoPE each array is one fused elementwise kernel under ``mx.compile`` -- the
    angles (positions times ``rope_inv_freq``), their cos / sin and the rotate-half products,
    in ``mx.fast.rope``'s order (x1 cos - x2 sin, x2 cos + x1 sin) -- instead of reading the
    rotation off a probe and slicing and joining halves (a dozen MLX operations a layer on a
    CPU where each costs microseconds); other kinds go through ``rope_cos_sin``."""
    x0 = xs[0]
    b, l, P = x0.shape[0], x0.shape[seq_axis], x0.shape[-1]
    inv = rope_inv_freq(rope) if P == rope.dims else None
    if inv is None:
        cos_sin = rope_cos_sin(rope, b, l, P, offset)  # (b, l, P)
        cos_sin = cos_sin.reshape(b, *[l if a == seq_axis else 1 for a in range(1, x0.ndim - 1)], P)
        return [rotate_half(x, cos_sin) for x in xs]
    memo = getattr(_SHARED, "memo", None) if isinstance(offset, mx.array) else None
    key = (id(offset), rope.dims, rope._rope.base, rope._rope.scale, l, seq_axis, x0.ndim)
    if memo is not None and key in memo:
        theta = memo[key][1]
    else:
        pos = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)
        rows = 1 if pos.ndim == 0 else pos.shape[0]
        pos = pos.reshape(rows, 1)
        if l > 1:
            pos = pos + mx.arange(l, dtype=pos.dtype)
        # (rows, .., l, .., 1, 1): broadcast against (b, .., 2, P/2)
        pos = pos.reshape(rows, *[l if a == seq_axis else 1 for a in range(1, x0.ndim - 1)], 1, 1)
        theta = (pos.astype(mx.float32) * rope._rope.scale) * inv
        if memo is not None:
            memo[key] = (offset, theta)  # holds the offset: its id stays unique while in use
    out = []
    for x in xs:
        if x.dtype not in _SIGNS:
            _SIGNS[x.dtype] = mx.array([[-1.0], [1.0]], dtype=x.dtype)
        halves = x.reshape(*x.shape[:-1], 2, P // 2)
        cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
        out.append((halves * cos + halves[..., ::-1, :] * (_SIGNS[x.dtype] * sin)).reshape(x.shape))
    return out
