"""Dynamic mask attention (DMA): attention with a per-key, per-head bias computed from
the value states (Wonderful Matrices, section 3.2):

    m_t   = exp(A * softplus(concat_kv_heads(V_t) @ Wdt.T))       # (Hm,)  Hm = Hkv or H
    score = q . k / sqrt(P) + m_key   (+ causal / padding masks, + the variant's rule)

The bias depends only on the key, so it is cached beside K and V (a second mlx-lm
``KVCache`` holding it as ``(batch, Hm, T, 1)`` "keys"); everything batching needs
(merge, right-pad roll, filter, trim, rotation) then comes from mlx-lm unchanged.

Mask rules (``dynamic_mask_rule``), reproduced as the reference implementations do them:
- ``keep_window`` (transformers Doge): additive m; when the key length T exceeds
  ``keep_window_size`` W, only the top-W biases of each query row (after causal and
  padding masking) stay, the rest are masked.
- ``legacy_ratio`` (remote-code Doge): additive m; when T > W, k = int((T - W) * r) and
  per (batch, head) the keys whose m is strictly below the k-th smallest m over all T
  keys are masked for every query.
- ``cheems_ratio`` (official Cheems HEAD): additive m; when 0 < r < 1, tau = k-th
  smallest m with k = int(T * r) over all T keys, keys with m < tau masked.
- ``hard`` (Cheems at paper time): a boolean test; keys with m < 1 are masked and this
  REPLACES the causal mask for them (m itself is never added), so a head whose m are
  all < 1 attends uniformly to every key, future ones included.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask

from .rope import RotaryEmbedding

MASK_RULES = ("keep_window", "legacy_ratio", "cheems_ratio", "hard")


def mask_min(dtype) -> float:
    """The additive 'masked' value: finite so a fully masked row is uniform (as in the
    references) instead of NaN; for float16 half the range so score + min stays finite."""
    if dtype == mx.float16:
        return -3.0e4
    return float(mx.finfo(mx.float32).min)


def kth_smallest(x: mx.array, k: int) -> mx.array:
    """k-th smallest (1-based) along the last axis, keepdims (torch.kthvalue)."""
    return mx.partition(x, k - 1, axis=-1)[..., k - 1 : k]


def top_w(scored: mx.array, w: int) -> mx.array:
    """Boolean mask of exactly ``w`` largest entries per row (last axis). Ties are common
    (equal tokens give equal values, hence equal m, in the first layer); keys tied at the
    w-th value go to the lowest key index. torch.topk's choice among tied values is
    implementation-defined, so parity with the reference is exact only when no tie
    straddles the w-th place -- the count (exactly w kept) always matches."""
    T = scored.shape[-1]
    threshold = mx.partition(scored, T - w, axis=-1)[..., T - w : T - w + 1]  # w-th largest
    above = scored > threshold
    tied = scored == threshold
    room = w - above.sum(axis=-1, keepdims=True)
    return above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))


def dynamic_mask(
    bias: mx.array,
    valid: Optional[mx.array],
    q_len: int,
    rule: str,
    keep_window_size: int,
    ratio: float,
    min_value: float,
) -> mx.array:
    """Additive attention mask of shape (batch, Hm, q_len, T), float32.

    bias: (batch, Hm, T) float32, the cached m of every key.
    valid: bool, broadcastable to (batch, 1, q_len, T) -- causal / padding / window; None = all.
    """
    b, hm, T = bias.shape
    m = bias[:, :, None, :]  # (b, Hm, 1, T)
    allowed = mx.ones((1, 1, q_len, T), dtype=mx.bool_) if valid is None else valid
    allowed = mx.broadcast_to(allowed, (b, hm, q_len, T))
    if rule == "keep_window":
        if T > keep_window_size:
            allowed = allowed & top_w(mx.where(allowed, m, -mx.inf), keep_window_size)
        return mx.where(allowed, m, min_value)
    if rule == "cheems_ratio":
        if 0.0 < ratio < 1.0:
            k = int(T * ratio)
            if k > 0:
                allowed = allowed & (m >= kth_smallest(bias, k)[:, :, None, :])
        return mx.where(allowed, m, min_value)
    if rule == "legacy_ratio":
        if T > keep_window_size:
            k = int((T - keep_window_size) * ratio)
            if k < 1:
                raise ValueError(
                    f"legacy Doge dynamic mask: key length {T} exceeds keep_window_size "
                    f"{keep_window_size} but dynamic_mask_ratio={ratio} selects no key "
                    "(the reference code fails here too); set dynamic_mask_ratio > 0 or "
                    "raise keep_window_size"
                )
            allowed = allowed & (m >= kth_smallest(bias, k)[:, :, None, :])
        return mx.where(allowed, m, min_value)
    if rule == "hard":
        causal = mx.where(allowed, 0.0, min_value)
        return mx.where(m < 1.0, min_value, causal)
    raise ValueError(f"unknown dynamic_mask_rule {rule!r}; expected one of {MASK_RULES}")


def quantized_attention(q, k, v, mask, scale, group_size, bits):
    """Attention over a QuantizedKVCache with a per-head additive mask (mlx-lm's
    quantized SDPA shares one mask across heads). q: (B, H, L, P); k, v: quantized
    (B, Hkv, T, .) triples; mask: (B, H, L, T)."""
    B, H, L, P = q.shape
    Hkv = k[0].shape[1]
    rep = H // Hkv
    q = (q * scale).reshape(B, Hkv, rep, L, P)
    k = [mx.expand_dims(x, 2) for x in k]
    v = [mx.expand_dims(x, 2) for x in v]
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    scores = scores + mask.reshape(mask.shape[0], Hkv, rep, L, -1).astype(scores.dtype)
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, L, P)


def _normalize_valid(mask: Optional[mx.array]) -> Optional[mx.array]:
    """mlx-lm cache masks come as (T,), (L, T) or (B, 1, L, T) booleans, or None."""
    if mask is None or isinstance(mask, str):
        return mask
    if mask.ndim == 1:
        return mask[None, None, None, :]
    if mask.ndim == 2:
        return mask[None, None]
    return mask


class DynamicMaskAttention(nn.Module):
    def __init__(self, args):
        super().__init__()
        d = args.hidden_size
        H, Hkv, P = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, P
        self.num_mask_heads = Hkv if args.dynamic_mask_heads == "kv" else H
        self.scale = P**-0.5
        self.rule = args.dynamic_mask_rule
        self.keep_window_size = args.keep_window_size
        self.ratio = args.dynamic_mask_ratio
        self.sliding_window = args.sliding_window
        bias = args.attention_bias
        self.q_proj = nn.Linear(d, H * P, bias=bias)
        self.k_proj = nn.Linear(d, Hkv * P, bias=bias)
        self.v_proj = nn.Linear(d, Hkv * P, bias=bias)
        self.A = mx.zeros((self.num_mask_heads,), dtype=mx.float32)
        self.dt_proj = nn.Linear(Hkv * P, self.num_mask_heads, bias=bias)
        self.o_proj = nn.Linear(H * P, d, bias=bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(P, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(P, eps=args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rope = RotaryEmbedding(P, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def key_bias(self, v: mx.array) -> mx.array:
        """m = exp(A * softplus(v @ Wdt.T)) for v: (b, l, Hkv*P) -> (b, Hm, l) float32."""
        dt = nn.softplus(self.dt_proj(v).astype(mx.float32))
        return mx.exp(self.A.astype(mx.float32) * dt).transpose(0, 2, 1)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        b, l, _ = x.shape
        H, Hkv, P = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, l, H, P)
        k = self.k_proj(x).reshape(b, l, Hkv, P)
        v = self.v_proj(x)
        bias = self.key_bias(v)  # (b, Hm, l)
        v = v.reshape(b, l, Hkv, P)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        kv_cache = cache[0] if cache is not None else None
        if cache is not None:
            bias_cache = cache[1]
            valid = kv_cache.make_mask(l, return_array=True, window_size=self.sliding_window)
            q = self.rope(q, kv_cache.offset)
            k = self.rope(k, kv_cache.offset)
            k, v = kv_cache.update_and_fetch(k, v)
            bias, _ = bias_cache.update_and_fetch(
                bias[..., None], mx.zeros((b, self.num_mask_heads, l, 0), dtype=bias.dtype)
            )
            bias = bias[..., 0]
        else:
            valid = create_causal_mask(l, 0, window_size=self.sliding_window) if l > 1 else None
            q, k = self.rope(q), self.rope(k)

        min_value = mask_min(q.dtype)
        mask = dynamic_mask(
            bias, _normalize_valid(valid), l, self.rule, self.keep_window_size, self.ratio, min_value
        )
        # m = exp(A * softplus(.)) can exceed the activation dtype's range (trained models
        # learn large A; float16 overflows at 65504): keep it finite, which keeps its meaning
        # (such a key takes all the weight) instead of turning the row into NaN
        mask = mx.clip(mask, min_value, -min_value)
        if self.num_mask_heads != H:  # query head h reads kv head h // (H / Hkv)
            mask = mx.repeat(mask, H // self.num_mask_heads, axis=1)
        if hasattr(kv_cache, "bits"):
            out = quantized_attention(q, k, v, mask, self.scale, kv_cache.group_size, kv_cache.bits)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask.astype(q.dtype))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, l, H * P))
