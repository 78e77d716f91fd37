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
  keys are masked for every query (k = 0 masks nothing; a ratio outside (0, 1] is an
  error, as in the reference). The reference fills those keys with the dtype's minimum
  and then ADDS the causal / padding mask (also the minimum), so a key masked by both
  becomes -inf while a key masked by one stays at the minimum (m + min rounds to min).
  A query row whose allowed keys are all dynamically masked is therefore uniform over
  the entries masked exactly once -- its causal keys and the future keys the dynamic
  mask kept -- and zero on the future keys both masks hit; this happens in the first
  rows of a prompt longer than W. Reproduced as such: the three levels m / min / -inf
  (a row always has a finite entry: the dynamic rule keeps T - k + 1 >= 1 keys).
- ``cheems_ratio`` (official Cheems HEAD): additive m; when 0 < r < 1, tau = k-th
  smallest m with k = int(T * r) over all T keys, keys with m < tau masked.
- ``hard`` (Cheems at paper time): a boolean test; keys with m < 1 are masked and this
  REPLACES the causal mask for them (m itself is never added), so a head whose m are
  all < 1 attends uniformly to every key, future ones included.

Ops path (the reference; ``DynamicMaskAttention.ops_attention``): ``dynamic_mask`` + SDPA
for blocks of ``QUERY_BLOCK`` query rows, so the (batch, H, L, T) mask is never built whole.

Kernel path (``kernels.enabled``: Metal GPU, not training; never with a quantized K/V
cache or the ``hard`` rule): ``key_selection`` turns the rule into a threshold per row,
then metal_kernels/dma_decode*.metal (one query: flash-decoding split over the keys) or
dma_prefill.metal (tiles of keys, skipped where the mask keeps none) attend without
building the (batch, H, L, T) mask. A row with no kept key is uniform over all keys, as
the ops path's finite ``mask_min`` makes it. ``dma_prefill_self_check`` /
``dma_decode_self_check`` compare the kernels with the ops path's ``attention_mask`` + SDPA
before their first use (kernels.py).

Tensor parallel: ``DynamicMaskAttention.shard(group)`` splits the heads (and ``dt_proj``
over its input, then by mask heads); ``shard_problems(N)`` says what prevents it.
"""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import create_causal_mask

from . import fastmath, kernels, projections
from .rope import SHORT_CALL, RotaryEmbedding, rotate_step
from .sharding import (
    GatheredInputsLinear,
    GatheredInputsQuantizedLinear,
    QuantizedShardedToLocalLinear,
    ShardedToLocalLinear,
    is_quantized,
    split_inputs_problems,
    splits_inputs,
)

MASK_RULES = ("keep_window", "legacy_ratio", "cheems_ratio", "hard")


def mask_min(dtype) -> float:
    """The additive 'masked' value: finite so a fully masked row is uniform (as in the
    references) instead of NaN; for float16 half the range so score + min stays finite;
    for bfloat16 its own minimum (float32's minimum rounds to -inf in bfloat16)."""
    if dtype == mx.float16:
        return -3.0e4
    if dtype == mx.bfloat16:
        return float(mx.finfo(mx.bfloat16).min)
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


def ratio_rank(rule: str, T: int, keep_window_size: int, ratio: float) -> Optional[int]:
    """k of the ratio rules (keys whose m is below the k-th smallest m are masked), or
    None when the rule masks nothing at key length T."""
    if rule == "cheems_ratio":
        k = int(T * ratio) if 0.0 < ratio < 1.0 else 0
        return k if k > 0 else None
    if T <= keep_window_size:  # legacy_ratio
        return None
    if not 0.0 < ratio <= 1.0:
        raise ValueError(
            f"legacy Doge dynamic mask: key length {T} exceeds keep_window_size "
            f"{keep_window_size} and dynamic_mask_ratio={ratio} is outside (0, 1] "
            "(the reference code fails here too); set 0 < dynamic_mask_ratio <= 1 in "
            "config.json or raise keep_window_size"
        )
    k = int((T - keep_window_size) * ratio)
    return k if k > 0 else None  # the reference masks nothing while k is 0


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
    # m = exp(A * softplus(.)) can exceed the activation dtype's range (trained models
    # learn large A; float16 overflows at 65504): keep it finite, which keeps its meaning
    # (such a key takes all the weight) instead of turning the row into NaN
    raw = bias[:, :, None, :]  # (b, Hm, 1, T): the rules select on it
    m = mx.minimum(raw, -min_value)  # the value added to the scores
    allowed = mx.ones((1, 1, q_len, T), dtype=mx.bool_) if valid is None else valid
    allowed = mx.broadcast_to(allowed, (b, hm, q_len, T))
    if rule == "keep_window":
        if T > keep_window_size:
            allowed = allowed & top_w(mx.where(allowed, raw, -mx.inf), keep_window_size)
        return mx.where(allowed, m, min_value)
    if rule == "cheems_ratio":
        k = ratio_rank(rule, T, keep_window_size, ratio)
        if k is not None:
            allowed = allowed & (raw >= kth_smallest(bias, k)[:, :, None, :])
        return mx.where(allowed, m, min_value)
    if rule == "legacy_ratio":  # the reference's sum of two masks (module docstring)
        k = ratio_rank(rule, T, keep_window_size, ratio)
        if k is None:
            return mx.where(allowed, m, min_value)
        kept = raw >= kth_smallest(bias, k)[:, :, None, :]
        return mx.where(allowed, mx.where(kept, m, min_value), mx.where(kept, min_value, -mx.inf))
    if rule == "hard":
        causal = mx.where(allowed, 0.0, min_value)
        return mx.where(raw < 1.0, min_value, causal)
    raise ValueError(f"unknown dynamic_mask_rule {rule!r}; expected one of {MASK_RULES}")


def attention_mask(bias, valid, q_len, num_heads, rule, keep_window_size, ratio, min_value) -> mx.array:
    """The ops path's additive mask (batch, H, q_len, T) float32: ``dynamic_mask`` repeated
    from the mask heads to the H query heads (query head h reads kv head h // (H / Hkv))."""
    mask = dynamic_mask(bias, valid, q_len, rule, keep_window_size, ratio, min_value)
    if mask.shape[1] != num_heads:
        mask = mx.repeat(mask, num_heads // mask.shape[1], axis=1)
    return mask


def kept_keys(bias, valid, q_len, rule, keep_window_size, ratio) -> Optional[mx.array]:
    """The keys each query row attends to under the ``keep_window`` and ``cheems_ratio`` rules:
    bool broadcastable to (batch, Hm, q_len, T), or None for every key -- the selection of
    ``dynamic_mask``, whose additive mask is m on these keys and the mask minimum elsewhere."""
    b, hm, T = bias.shape
    if rule == "keep_window":
        if T <= keep_window_size:
            return valid
        allowed = mx.broadcast_to(mx.array(True) if valid is None else valid, (b, hm, q_len, T))
        return allowed & top_w(mx.where(allowed, bias[:, :, None, :], -mx.inf), keep_window_size)
    if rule == "cheems_ratio":
        k = ratio_rank(rule, T, keep_window_size, ratio)
        if k is None:
            return valid
        kept = bias[:, :, None, :] >= kth_smallest(bias, k)[:, :, None, :]
        return kept if valid is None else valid & kept
    raise ValueError(f"kept_keys covers keep_window and cheems_ratio, not {rule!r}")


def _grouped(a: mx.array, kv_heads: int, rep: int) -> mx.array:
    """(B, 1 | Hkv | H, rows, T) -> (B, 1 | Hkv, 1 | rep, rows, T): query head h = g * rep + r
    reads kv head g (a per-query-head axis is split, a per-kv-head one gains the rep axis)."""
    if a.shape[1] == kv_heads * rep and rep > 1:
        return a.reshape(a.shape[0], kv_heads, rep, *a.shape[2:])
    return a[:, :, None]


def _exp_scores(s, m, keep, min_value):
    """exp(t - max t) per row and its row sum, t = s + m where kept and the mask minimum
    elsewhere (a row with no kept key is uniform, as the additive mask makes it). exp is
    ``fastmath.exp``: a softmax over (heads, L, T) scores is most of a long prefill's
    attention on MLX's CPU backend."""
    t = s.astype(mx.float32) + m
    if keep is not None:
        t = mx.where(keep, t, min_value)
    e = fastmath.exp(t - t.max(axis=-1, keepdims=True))
    return e, e.sum(axis=-1, keepdims=True)


_exp_scores_compiled = mx.compile(_exp_scores)


def masked_attention(q, k, v, m, keep, scale) -> mx.array:
    """softmax(q k^T * scale + m) v over the kept keys: ``dynamic_mask`` + SDPA for the
    keep_window / cheems_ratio rules without building the (batch, H, L, T) float mask.
    q: (b, H, L, P); k, v: (b, Hkv, T, P); m: (b, Hm, T) float32, the per-key bias (capped
    finite); keep: None or bool broadcastable to (b, Hm, L, T) (``kept_keys``). The query
    heads of one kv head share its keys in one product (no repeated K / V); scores, exp and
    sums are float32, the output in q's dtype. Returns (b, H, L, P)."""
    b, H, L, P = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    R = H // Hkv
    s = (q * scale).reshape(b, Hkv, R * L, P) @ k.swapaxes(-1, -2)  # (b, Hkv, R*L, T)
    s = s.reshape(b, Hkv, R, L, T)
    m = _grouped(m[:, :, None, :], Hkv, R)
    keep = None if keep is None else _grouped(keep, Hkv, R)
    exp_scores = _exp_scores if fastmath.compile_mode() == "0" else _exp_scores_compiled
    e, denom = exp_scores(s, m, keep, mask_min(mx.float32))
    out = (e.astype(v.dtype).reshape(b, Hkv, R * L, T) @ v) / denom.reshape(b, Hkv, R * L, 1).astype(v.dtype)
    return out.reshape(b, H, L, P)


def evaluate_now(x: mx.array) -> None:
    """Evaluate ``x`` at once where that is allowed: MLX schedules independent branches of a
    lazy graph side by side, so the query blocks of ``ops_attention`` would otherwise hold
    every block's mask at the same time (measured: 2,048 queries in blocks of 256, 325 MiB
    lazily against 83 MiB evaluated block by block). Inside ``mx.compile`` / ``vmap`` arrays
    cannot be evaluated: there the graph stays lazy (same numbers, more memory)."""
    try:
        mx.eval(x)
    except ValueError:
        pass


def key_end(valid: Optional[mx.array]) -> Optional[int]:
    """One past the last key any row of ``valid`` (bool (Bv, 1, rows, T)) allows, when every
    row allows at least one key; None otherwise, or inside ``mx.compile`` (a host read)."""
    if valid is None:
        return None
    T = valid.shape[-1]
    try:
        any_row = valid.any(axis=(0, 1, 2))  # (T,)
        if not valid.any(axis=-1).all().item():
            return None
        return T - int(mx.argmax(any_row[::-1]).item())
    except ValueError:  # under a function transformation: nothing can be read
        return None


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


# ----------------------------------------------------------------------------- kernel path
# metal_kernels/dma_decode.metal + dma_decode_combine.metal (one query row, flash-decoding
# split over the keys) and dma_prefill.metal (tiled, skipping key tiles the mask empties).

DECODE_BLOCK = 256  # keys per threadgroup in the decode's first pass
DECODE_SIMDGROUPS = 4  # simdgroups per decode threadgroup (each takes every 4th key)
PREFILL_ROWS = 8  # (query head, query) rows per prefill threadgroup: REP heads x 8 // REP queries
THREADGROUP_MEMORY = 32768  # bytes a Metal threadgroup may allocate
QUERY_BLOCK = 256  # query rows per dynamic_mask + SDPA call on the ops path (DynamicMaskAttention.ops_attention)


def key_selection(bias, valid, rule, keep_window_size, ratio, window=None):
    """The rules of ``dynamic_mask`` in the form the kernels read: key j is kept for a query
    row iff ``valid and (m_j > thr or (m_j == thr and j < jlim))``.

    bias: (b, Hm, T) float32; valid: bool (Bv, 1, Lv, T) or None.
    Returns (thr float32, jlim int32, all_kept): shape (b, Hm, 1) when one selection holds
    for every row (keep_window with T <= W or a sliding window <= W: every allowed key, thr
    = -inf; the ratio rules: m >= the k-th smallest m); (b, Hm, Lv) for keep_window when
    T > W, where the top-W depends on the row: its W-th largest allowed m and how many keys
    tied at it fit, lowest index first, as ``top_w`` does (computed here with MLX ops, O(Lv T)
    per mask head, but no (H, L, T) float mask and no L^2 attention). all_kept: every valid
    key is kept. None for the ``hard`` rule, which stays on the ops path.
    """
    b, hm, T = bias.shape
    every_key = mx.full((b, hm, 1), -mx.inf, mx.float32), mx.zeros((b, hm, 1), mx.int32), True
    if rule == "keep_window":
        W = keep_window_size
        if T <= W or (window is not None and window <= W):  # no row has more than W allowed keys
            return every_key
        lv = 1 if valid is None else valid.shape[-2]
        allowed = mx.ones((1, 1, lv, T), mx.bool_) if valid is None else valid
        scored = mx.where(mx.broadcast_to(allowed, (b, hm, lv, T)), bias[:, :, None, :], -mx.inf)
        thr = mx.partition(scored, T - W, axis=-1)[..., T - W : T - W + 1]  # W-th largest per row
        room = W - (scored > thr).sum(axis=-1)
        tied = (scored == thr).astype(mx.int32)
        jlim = (mx.cumsum(tied, axis=-1) <= room[..., None]).sum(axis=-1)
        return thr[..., 0], jlim.astype(mx.int32), False
    if rule in ("cheems_ratio", "legacy_ratio"):
        k = ratio_rank(rule, T, keep_window_size, ratio)
        if k is None:
            return every_key
        return kth_smallest(bias, k), mx.full((b, hm, 1), T, mx.int32), False
    if rule == "hard":
        return None
    raise ValueError(f"unknown dynamic_mask_rule {rule!r}; expected one of {MASK_RULES}")


def kernel_attention(
    q, k, v, bias, valid, rule, keep_window_size, ratio, window, scale, min_value,
    block=DECODE_BLOCK, simdgroups=DECODE_SIMDGROUPS, rows=PREFILL_ROWS,
):
    """Dynamic mask attention through the Metal kernels; the same result as ``dynamic_mask``
    + ``scaled_dot_product_attention`` (float32 accumulation).

    q: (B, H, L, P); k, v: (B, Hkv, T, P) (the cache's views, not copied); bias: (B, Hm, T)
    float32; valid: the mlx-lm bool mask or None. Returns (B, L, H, P), or None where the
    kernels do not apply (the ``hard`` rule, masks of another form, too large a head): the
    caller then takes the ops path. L == 1 runs the flash-decoding pair: the selection per
    (batch, mask head) comes from ``key_selection`` and rows with no kept key are found here
    (O(T) per head) and marked jlim = -1 (the kernel then gives them the ops path's uniform
    row). L > 1 runs the tiled prefill kernel, which finds such rows itself.
    """
    B, H, L, P = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    Hm = bias.shape[1]
    valid = _normalize_valid(valid)
    if valid is not None and (
        isinstance(valid, str)
        or valid.dtype != mx.bool_
        or valid.ndim != 4
        or valid.shape[1] != 1
        or valid.shape[0] not in (1, B)
        or valid.shape[2] not in (1, L)
        or valid.shape[3] != T
    ):
        return None
    if H % Hkv or Hm not in (Hkv, H):
        return None
    rep = H // Hkv
    if L == 1:  # simdgroups per decode threadgroup: their merge buffers must fit
        nsg = simdgroups
        while nsg > 1 and nsg * rep * (P + 2) * 4 > THREADGROUP_MEMORY:
            nsg //= 2
        if nsg * rep * (P + 2) * 4 > THREADGROUP_MEMORY:
            return None
    else:  # prefill rows per threadgroup: REP heads x bq queries, tiles in threadgroup memory
        bq = max(1, rows // rep)
        nsg = rep * bq
        if nsg > 32 or (32 * (P + 1) + nsg * (P + 32) + 2 * nsg) * 4 > THREADGROUP_MEMORY:
            return None
    selection = key_selection(bias, valid, rule, keep_window_size, ratio, window)
    if selection is None:
        return None
    thr, jlim, all_kept = selection
    if rule == "legacy_ratio" and not all_kept and (L > 1 or valid is not None):
        return None  # a row may have no kept allowed key: the reference's additive rule, ops path
    bias = bias.astype(mx.float32)
    vmask = mx.ones((1, 1, T), mx.bool_) if valid is None else mx.contiguous(valid[:, 0])  # (Bv, Lv, T)
    params = mx.array([scale, -min_value], mx.float32)
    template = [("T", q.dtype), ("P", P), ("REP", rep), ("MASK_PER_HEAD", Hm == H)]
    names = ["q", "k", "v", "bias", "valid", "sel_thr", "sel_jlim", "params"]
    if L == 1:
        if not (all_kept and valid is None):  # a row may keep no key: mark it
            j = mx.arange(T)
            kept = vmask & ((bias > thr) | ((bias == thr) & (j < jlim)))  # (B, Hm, T)
            jlim = mx.where(kept.any(axis=-1, keepdims=True), jlim, -1)
        S = -(-T // block)
        decode = kernels.kernel("dma_decode", names, ["part_o", "part_ml"], ensure_row_contiguous=False)
        part_o, part_ml = decode(
            inputs=[q, k, v, bias, vmask, mx.contiguous(thr), mx.contiguous(jlim), params],
            template=template + [("NSG", nsg), ("BLOCK", block)],
            grid=(32 * nsg * S, Hkv, B),
            threadgroup=(32 * nsg, 1, 1),
            output_shapes=[(B, H, S, P), (B, H, S, 2)],
            output_dtypes=[mx.float32, mx.float32],
        )
        (out,) = kernels.kernel("dma_decode_combine", ["part_o", "part_ml"], ["out"])(
            inputs=[part_o, part_ml],
            template=[("T", q.dtype), ("P", P)],
            grid=(32, H, B),
            threadgroup=(32, 1, 1),
            output_shapes=[(B, 1, H, P)],
            output_dtypes=[q.dtype],
        )
        return out
    (out,) = kernels.kernel("dma_prefill", names, ["out"], ensure_row_contiguous=False)(
        inputs=[q, k, v, bias, vmask, mx.contiguous(thr), mx.contiguous(jlim), params],
        template=template + [("BQ", bq)],
        grid=(32 * nsg, -(-L // bq), B * Hkv),
        threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(B, L, H, P)],
        output_dtypes=[q.dtype],
    )
    return out


# Self-checks (kernels.attempt runs them before a kernel family's first use; the doctor over a
# grid): the kernels against the ops path's mask + SDPA in float32 on the same T inputs, with
# per-row top-W selection (W = half the keys), GQA, batch > 1 and left padding (fully padded
# query rows are uniform on both paths). The biases are multiples of 1/8, exact in every T,
# so the only differences are the summation order and the output's rounding to T.


def _dma_self_check(T, P, REP, per_head, B, Hkv, L, keys, **launch):
    H = REP * Hkv
    Hm = H if per_head else Hkv
    probe = kernels.probe
    q, k, v = probe((B, H, L, P), 11, T), probe((B, Hkv, keys, P), 12, T), probe((B, Hkv, keys, P), 13, T)
    bias = (1 + mx.random.randint(0, 13, (B, Hm, keys), key=mx.random.key(14))).astype(mx.float32) / 8
    valid = create_causal_mask(L, keys - L, left_padding=mx.array([3 * i for i in range(B)]))
    W, scale = keys // 2, P**-0.5

    def kernel_fn(q, k, v, bias, valid):
        out = kernel_attention(q, k, v, bias, valid, "keep_window", W, 0.0, None, scale, mask_min(T), **launch)
        if out is None:
            raise ValueError("kernel_attention declined the self-check's inputs")
        return out

    def ops_fn(q, k, v, bias, valid):
        f32 = mx.float32
        mask = attention_mask(bias, valid, L, H, "keep_window", W, 0.0, mask_min(f32))
        out = mx.fast.scaled_dot_product_attention(q.astype(f32), k.astype(f32), v.astype(f32), scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3)

    return kernels.SelfCheck(kernel_fn, ops_fn, (q, k, v, bias, valid), kernels.TOLERANCE[T])


@kernels.self_check("dma_prefill")
def dma_prefill_self_check(T=mx.float32, P=16, REP=2, MASK_PER_HEAD=False, BQ=None, B=2, Hkv=2, L=37, **_):
    bq = BQ or max(1, PREFILL_ROWS // REP)
    return _dma_self_check(T, P, REP, MASK_PER_HEAD, B, Hkv, L, L, rows=REP * bq)


@kernels.self_check("dma_decode", "dma_decode_combine")
def dma_decode_self_check(T=mx.float32, P=16, REP=1, MASK_PER_HEAD=False, NSG=DECODE_SIMDGROUPS,
                          BLOCK=DECODE_BLOCK, B=2, Hkv=2, keys=None, **_):
    keys = keys or BLOCK + 37  # two key blocks, the second ragged: the combine merges them
    return _dma_self_check(T, P, REP, MASK_PER_HEAD, B, Hkv, 1, keys, block=BLOCK, simdgroups=NSG)


class DynamicMaskAttention(nn.Module):
    # q / k / v, one product inside the whole-model step (projections.py)
    JOINED = ("_joined_qkv", ("q_proj", "k_proj", "v_proj"))

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

    def ops_attention(self, q, k, v, bias, valid, kv_cache, min_value) -> mx.array:
        """The reference path: ``dynamic_mask`` + SDPA, one block of ``QUERY_BLOCK`` query
        rows at a time so the (batch, H, rows, T) mask never exists for all L rows at once.
        Exact per block: the ratio rules select over all T keys whatever the rows, and
        keep_window's top-W is per row. For keep_window a block also leaves out the keys
        after the last one any of its rows may see (``key_end``: the causal triangle's empty
        half): they are masked in every row and no row is empty, so they carry exactly zero
        weight. q: (b, H, L, P); k, v: (b, Hkv, T, P) (or the quantized cache's triples);
        bias: (b, Hm, T); valid: None or bool (Bv, 1, Lv, T). Returns (b, H, L, P)."""
        H, L = self.num_heads, q.shape[2]
        if L > QUERY_BLOCK:
            blocks = []
            for i in range(0, L, QUERY_BLOCK):
                rows = valid if valid is None or valid.shape[-2] == 1 else valid[..., i : i + QUERY_BLOCK, :]
                blocks.append(self.ops_attention(q[:, :, i : i + QUERY_BLOCK], k, v, bias, rows, kv_cache, min_value))
                evaluate_now(blocks[-1])
            return mx.concatenate(blocks, axis=2)
        quantized = hasattr(kv_cache, "bits")
        end = None if quantized or self.rule != "keep_window" or self.training else key_end(valid)
        if end is not None and end < bias.shape[-1]:  # keys no row may see: leave them out
            k, v, bias, valid = k[..., :end, :], v[..., :end, :], bias[..., :end], valid[..., :end]
        if not quantized and self.rule in ("keep_window", "cheems_ratio"):
            keep = kept_keys(bias, valid, L, self.rule, self.keep_window_size, self.ratio)
            m = mx.minimum(bias.astype(mx.float32), -mask_min(mx.float32))
            return masked_attention(q, k, v, m, keep, self.scale)
        mask = attention_mask(bias, valid, L, H, self.rule, self.keep_window_size, self.ratio, min_value)
        if quantized:
            return quantized_attention(q, k, v, mask, self.scale, kv_cache.group_size, kv_cache.bits)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask.astype(q.dtype))

    def project(self, x: mx.array, offset=0):
        """The pure part: q, k (normed, rotated from position ``offset``), v and the per-key
        bias m. x: (b, l, d) -> q (b, H, l, P), k / v (b, Hkv, l, P), bias (b, Hm, l)."""
        b, l, _ = x.shape
        H, Hkv, P = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = projections.project(self, *self.JOINED, x)
        q, k = q.reshape(b, l, H, P), k.reshape(b, l, Hkv, P)
        bias = self.key_bias(v)  # (b, Hm, l)
        v = v.reshape(b, l, Hkv, P)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if l <= SHORT_CALL:  # a decode step / a verification of drafted tokens: few operations
            return (*rotate_step(self.rope, (q, k), offset, 2), v, bias)
        return self.rope(q, offset), self.rope(k, offset), v, bias

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        kv_cache = cache[0] if cache is not None else None
        q, k, v, bias = self.project(x, kv_cache.offset if cache is not None else 0)
        return self.o_proj(self.attend(q, k, v, bias, cache))

    def attend(self, q, k, v, bias, cache=None) -> mx.array:
        """The stateful part: append k, v, bias to the cache (if any), build the mask and
        attend. q: (b, H, l, P) ... as ``project`` returns. Returns (b, l, H * P)."""
        b, H, l, P = q.shape
        kv_cache = cache[0] if cache is not None else None
        if cache is not None:
            bias_cache = cache[1]
            valid = kv_cache.make_mask(l, return_array=True, window_size=self.sliding_window)
            k, v = kv_cache.update_and_fetch(k, v)
            bias, _ = bias_cache.update_and_fetch(
                bias[..., None], mx.zeros((b, self.num_mask_heads, l, 0), dtype=bias.dtype)
            )
            bias = bias[..., 0]
        else:
            valid = create_causal_mask(l, 0, window_size=self.sliding_window) if l > 1 else None

        min_value = mask_min(q.dtype)
        out = None
        if kernels.enabled(training=self.training) and not hasattr(kv_cache, "bits"):
            out = kernels.attempt(
                kernel_attention, q, k, v, bias, valid, self.rule, self.keep_window_size, self.ratio,
                self.sliding_window, self.scale, min_value,
            )
            if out is not None:  # (b, l, H, P)
                return out.reshape(b, l, H * P)
        out = self.ops_attention(q, k, v, bias, _normalize_valid(valid), kv_cache, min_value)
        return out.transpose(0, 2, 1, 3).reshape(b, l, H * P)

    def shard_problems(self, N: int) -> List[str]:
        """What prevents splitting this layer over N ranks (empty when it can be split)."""
        problems = []
        if self.num_heads % N:
            problems.append(f"num_attention_heads {self.num_heads} is not divisible by {N}")
        if self.num_kv_heads % N:
            problems.append(f"num_key_value_heads {self.num_kv_heads} is not divisible by {N}")
        return problems + split_inputs_problems("attn.o_proj", self.o_proj, N)

    def shard(self, group: mx.distributed.Group):
        """Tensor-parallel split by heads (cheems_mlx.sharding): q_proj by heads, k/v_proj by
        kv heads -> H/N, Hkv/N heads and K/V cache; dt_proj sharded-to-all over its input
        (the values of ALL kv heads: each rank multiplies its own kv heads' values by its
        columns of Wdt and the all_sum adds the partial products), then each rank keeps its
        own mask heads, A by mask heads; o_proj sharded-to-all (one all_sum)."""
        N, r = group.size(), group.rank()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, shard_linear(getattr(self, name), "all-to-sharded", group=group))
        self.o_proj = shard_linear(self.o_proj, "sharded-to-all", group=group)
        quantized = is_quantized(self.dt_proj)
        if splits_inputs(self.dt_proj, N):  # partial products of the local values, summed
            dt = shard_linear(self.dt_proj, "sharded-to-all", group=group)
            dt.__class__ = QuantizedShardedToLocalLinear if quantized else ShardedToLocalLinear
        else:  # quantization groups straddle ranks: gather the values (Hkv*P per token)
            dt = self.dt_proj
            dt.__class__ = GatheredInputsQuantizedLinear if quantized else GatheredInputsLinear
            dt.group = group
        self.num_heads //= N
        self.num_kv_heads //= N
        self.num_mask_heads //= N
        dt.out_start = r * self.num_mask_heads
        dt.out_stop = dt.out_start + self.num_mask_heads
        self.dt_proj = dt
        self.A = mx.contiguous(self.A[dt.out_start : dt.out_stop])
