"""Rotary position embedding shared by the SSD (on B and C) and DMA (on Q and K) mixers.

Rotate-half layout (``traditional=False``), positions given by a cache offset that may be
an int or an ``(batch,)`` array (mlx-lm's batched caches keep one offset per row).
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
