"""State space duality (Mamba2 SSD) with rotary position embedding on B and C.

The sequence transformation of the Cheems layers (Wonderful Matrices, section 3.1):

    C  = rope(x @ Wc.T)   B = rope(x @ Wb.T)   X = x @ Wx.T        # (batch, seq, H, P)
    dt = softplus(x @ Wdt.T)                                        # (batch, seq, H)
    S_t = exp(dt_t * A) * S_{t-1} + (dt_t * X_t) (outer) B_t        # S: (batch, H, P, N=P)
    y_t = S_t @ C_t                        out = concat_heads(y) @ Wout.T

No conv1d, no z gate, no D skip, no dt bias. ``A`` is used exactly as stored (the
official initialisation A = +1 makes states grow; new models here start with A < 0).

Three numerically equivalent paths:
- ``ssd_chunked_scan``: training / prefill, the four steps of the SSD algorithm
  (diagonal blocks, chunk states, inter-chunk recurrence, state -> output), any length;
- ``ssd_step``: the one-token recurrence used for decoding;
- ``ssd_states``: the recurrence unrolled over a short call, every position's state (what a
  rollback cache keeps while verifying drafted tokens).
All run in float32 whatever the activation dtype; the decode state is float32.
The first two have a Metal kernel with RoPE on B and C fused in (``ssd_step_kernel``,
``ssd_chunked_scan_kernel``; metal_kernels/ssd_step.metal, ssd_scan.metal), used by the
module when ``kernels.enabled`` -- the ops functions above stay the reference, and each
kernel's first-use self-check (``ssd_step_self_check``, ``ssd_scan_self_check``) compares
the two before the kernel is trusted (kernels.py). (A call of 2 to ``SSDCache.window``
tokens on a rollback cache runs ``ssd_states`` on the ops path: no kernel emits
per-position states yet -- the first call on an empty cache too, so a short prompt can be
rolled back into, as mlx-lm's draft decoding from a one-token prompt does.)

Decode cache per layer: ``SSDCache`` (an ``ArraysCache(2)``) holding ``[S (batch,H,P,N)
float32, offset (batch,) int32]`` -- the offset is each row's RoPE position, advanced by the
row's true token count when mlx-lm right-pads a batched prompt (a left-padded row's pads take
no positions either). It keeps the states after each token of short calls so speculative
decoding and the server's prompt cache can roll it back (``trim``), batched rows included.

Tensor parallel: ``StateSpaceDuality.shard(group)`` splits the heads (each rank keeps H/N
heads and their state); ``shard_problems(N)`` says what prevents it.
"""

import math
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models.cache as _mlx_lm_cache
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.cache import ArraysCache

from . import kernels, projections
from .rope import SHORT_CALL, RotaryEmbedding, rope_cos_sin, rotate_step
from .sharding import split_inputs_problems


def segsum(x: mx.array) -> mx.array:
    """``out[..., i, j] = sum_{j < k <= i} x[..., k]`` for ``j <= i`` and ``-inf`` above
    the diagonal, computed with a masked cumsum (no difference of large cumsums)."""
    T = x.shape[-1]
    idx = mx.arange(T)
    strictly_lower = idx[:, None] > idx[None, :]  # (T, T), [k, j]: k > j
    xr = mx.where(strictly_lower, x[..., :, None], 0.0)  # [..., k, j] = x[k] if k > j
    out = mx.cumsum(xr, axis=-2)  # [..., i, j] = sum_{j < k <= i} x[k]
    lower = idx[:, None] >= idx[None, :]
    return mx.where(lower, out, -mx.inf)


def ssd_chunked_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    chunk_size: int,
    initial_state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Chunked SSD scan.

    x: (b, l, h, p)  dt: (b, l, h) (already softplus-ed)  A: (h,)
    B, C: (b, l, h, n)  initial_state: (b, h, p, n) or None
    mask: (b, l) bool or None -- masked positions neither decay nor write the state.
    Returns y (b, l, h, p) float32 and the final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    f32 = mx.float32
    x, B, C, dt = x.astype(f32), B.astype(f32), C.astype(f32), dt.astype(f32)
    dtA = dt * A.astype(f32)  # (b, l, h)
    dtx = dt[..., None] * x  # (b, l, h, p)
    if mask is not None:
        dtA = mx.where(mask[..., None], dtA, 0.0)
        dtx = mx.where(mask[..., None, None], dtx, 0.0)

    pad = (-l) % Q
    if pad:
        dtA = mx.pad(dtA, [(0, 0), (0, pad), (0, 0)])
        dtx = mx.pad(dtx, [(0, 0), (0, pad), (0, 0), (0, 0)])
        B = mx.pad(B, [(0, 0), (0, pad), (0, 0), (0, 0)])
        C = mx.pad(C, [(0, 0), (0, pad), (0, 0), (0, 0)])
    c = (l + pad) // Q
    dtA = dtA.reshape(b, c, Q, h).transpose(0, 3, 1, 2)  # (b, h, c, Q)
    dtx = dtx.reshape(b, c, Q, h, p)
    B = B.reshape(b, c, Q, h, n)
    C = C.reshape(b, c, Q, h, n)
    A_cum = mx.cumsum(dtA, axis=-1)  # (b, h, c, Q) decay from chunk start, inclusive

    # 1. diagonal blocks: y_t += sum_{s<=t in chunk} (C_t . B_s) exp(sum_{s<k<=t} dtA_k) dtx_s
    decay = mx.exp(segsum(dtA))  # (b, h, c, Q, Q)
    CB = mx.einsum("bclhn,bcshn->bhcls", C, B)
    Y_diag = mx.einsum("bhcls,bcshp->bclhp", CB * decay, dtx)

    # 2. chunk states: each chunk's own contribution to the state at its end
    decay_to_end = mx.exp(mx.cumsum(dtA, axis=-1, reverse=True, inclusive=False))  # (b,h,c,Q)
    weighted = dtx * decay_to_end.transpose(0, 2, 3, 1)[..., None]  # (b, c, Q, h, p)
    states = mx.einsum("bclhn,bclhp->bchpn", B, weighted)  # (b, c, h, p, n)

    # 3. inter-chunk recurrence: S_in[z] = sum_{c<z} exp(sum of chunk decays c+1..z-1) states[c]
    if initial_state is None:
        initial_state = mx.zeros((b, h, p, n), dtype=f32)
    states = mx.concatenate([initial_state.astype(f32)[:, None], states], axis=1)  # (b,c+1,h,p,n)
    chunk_decay = mx.pad(A_cum[..., -1], [(0, 0), (0, 0), (1, 0)])  # (b, h, c+1)
    decay_chunk = mx.exp(segsum(chunk_decay))  # (b, h, c+1, c+1)
    new_states = mx.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states_in, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. state -> output: y_t += exp(A_cum_t) C_t . S_in
    Y_off = mx.einsum("bclhn,bchpn->bclhp", C, states_in)
    Y_off = Y_off * mx.exp(A_cum).transpose(0, 2, 3, 1)[..., None]

    y = (Y_diag + Y_off).reshape(b, c * Q, h, p)[:, :l]
    return y, final_state


def _recurrence_inputs(x, dt, A, B, C, mask):
    """float32 x, B, C and the recurrence's dt * A and dt * x, both 0 at masked positions
    (a masked position keeps the state: decay exp(0) = 1, no input). Shapes: x (..., h, p),
    dt (..., h), mask (...) -- one step (b,) or a short call (b, l)."""
    f32 = mx.float32
    x, B, C, dt = x.astype(f32), B.astype(f32), C.astype(f32), dt.astype(f32)
    dtA = dt * A.astype(f32)
    dtx = dt[..., None] * x
    if mask is not None:
        dtA = mx.where(mask[..., None], dtA, 0.0)
        dtx = mx.where(mask[..., None, None], dtx, 0.0)
    return x, B, C, dtA, dtx


def ssd_step(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    state: Optional[mx.array],
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """One-token recurrence. x: (b, h, p), dt: (b, h), B/C: (b, h, n), state: (b, h, p, n).
    mask: (b,) bool -- a masked row keeps its state. Returns y (b, h, p), new state."""
    f32 = mx.float32
    x, B, C, dtA, dtx = _recurrence_inputs(x, dt, A, B, C, mask)
    dA = mx.exp(dtA)  # (b, h); 1 where masked
    if state is None:
        state = mx.zeros(x.shape + (B.shape[-1],), dtype=f32)
    state = dA[..., None, None] * state + dtx[..., :, None] * B[..., None, :]
    y = (state @ C[..., :, None]).squeeze(-1)
    return y, state


def ssd_states(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    state: Optional[mx.array],
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The state after every position of a short call (a rollback cache keeps them):

        S_t = exp(sum_{s<=t} dtA_s) S_0 + sum_{s<=t} exp(sum_{s<k<=t} dtA_k) dtx_s (outer) B_s

    the one-step recurrence unrolled (one decay matrix, as in the scan's diagonal blocks).
    Shapes as ``ssd_chunked_scan``; O(l^2) decay and l states, meant for l up to SSDCache.window.
    Returns y (b, l, h, p) float32 and the states (b, l, h, p, n) float32."""
    f32 = mx.float32
    x, B, C, dtA, dtx = _recurrence_inputs(x, dt, A, B, C, mask)  # dtA (b, l, h), dtx (b, l, h, p)
    dtA = dtA.transpose(0, 2, 1)  # (b, h, l)
    decay = mx.exp(segsum(dtA))  # (b, h, t, s): exp(sum_{s<k<=t} dtA_k), 0 for s > t
    states = mx.einsum("bhts,bshp,bshn->bthpn", decay, dtx, B)  # (b, l, h, p, n)
    if state is not None:
        from_start = mx.exp(mx.cumsum(dtA, axis=-1)).transpose(0, 2, 1)  # (b, l, h)
        states = states + from_start[..., None, None] * state.astype(f32)[:, None]
    y = mx.einsum("bthpn,bthn->bthp", states, C)
    return y, states


def ssd_step_kernel(x, dt, A, B, C, state, mask=None, cos_sin=None):
    """``ssd_step`` on rope(B), rope(C) as one Metal kernel (metal_kernels/ssd_step.metal).
    B, C: (b, h, n) before RoPE; cos_sin: (b, n) from ``rope_cos_sin`` or None (no RoPE).
    Returns y (b, h, p) in x's dtype and the new state (b, h, p, n) float32."""
    b, h, p = x.shape
    n = B.shape[-1]
    f32 = mx.float32
    if state is None:
        state = mx.zeros((b, h, p, n), dtype=f32)
    if mask is None:
        mask = mx.ones((b,), dtype=mx.bool_)
    use_rope = cos_sin is not None
    ty = math.gcd(p, 8)  # state rows (simdgroups) per threadgroup
    k = kernels.kernel("ssd_step", ["X", "dt", "A", "B", "C", "cs", "mask", "state_in"], ["y", "state_out"])
    y, state = k(
        inputs=[
            x, dt.astype(f32), A.astype(f32), B, C,
            cos_sin.astype(f32) if use_rope else mx.zeros((1,), f32), mask.astype(mx.bool_),
            state.astype(f32),
        ],
        template=[("T", x.dtype), ("P", p), ("N", n), ("TY", ty), ("ROPE", use_rope)],
        grid=(32, p, b * h),
        threadgroup=(32, ty, 1),
        output_shapes=[(b, h, p), (b, h, p, n)],
        output_dtypes=[x.dtype, f32],
    )
    return y, state


SCAN_THREADGROUP_BYTES = 28 * 1024  # of Metal's 32 KiB


def scan_layout(p: int, n: int, chunk_size: Optional[int] = None) -> Tuple[int, int, int]:
    """(PB state rows per threadgroup, NSG simdgroups, Q kernel chunk) for ssd_scan.metal:
    PB the largest divisor of p up to 32, NSG the largest of 8/4/2/1 dividing PB, and Q the
    largest power of two up to 64 whose tiles fit in SCAN_THREADGROUP_BYTES (unless given)."""
    pb = max(d for d in range(1, min(p, 32) + 1) if p % d == 0)
    nsg = max(s for s in (8, 4, 2, 1) if pb % s == 0)
    if chunk_size is None:
        def tile_bytes(q):
            return 4 * (2 * q + 2 * q * (n + 1) + q * (pb + 1) + q * q)
        chunk_size = next(q for q in (64, 32, 16, 8, 4, 2, 1) if tile_bytes(q) <= SCAN_THREADGROUP_BYTES)
    return pb, nsg, chunk_size


def ssd_chunked_scan_kernel(x, dt, A, B, C, initial_state=None, mask=None, cos_sin=None, chunk_size=None):
    """``ssd_chunked_scan`` on rope(B), rope(C) as one Metal kernel (metal_kernels/ssd_scan.metal).
    x: (b, l, h, p), dt: (b, l, h), B, C: (b, l, h, n) before RoPE, cos_sin: (b, l, n) from
    ``rope_cos_sin`` or None, mask: (b, l) bool or None. chunk_size: the kernel's own chunk
    (a template parameter; the result does not depend on it), by default ``scan_layout``'s.
    Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) float32."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    f32 = mx.float32
    pb, nsg, q = scan_layout(p, n, chunk_size)
    if initial_state is None:
        initial_state = mx.zeros((b, h, p, n), dtype=f32)
    if mask is None:
        mask = mx.ones((b, l), dtype=mx.bool_)
    use_rope = cos_sin is not None
    k = kernels.kernel("ssd_scan", ["X", "dt", "A", "B", "C", "cs", "mask", "state_in"], ["y", "state_out"])
    y, state = k(
        inputs=[
            x, dt.astype(f32), A.astype(f32), B, C,
            cos_sin.astype(f32) if use_rope else mx.zeros((1,), f32), mask.astype(mx.bool_),
            initial_state.astype(f32),
        ],
        template=[
            ("T", x.dtype), ("P", p), ("N", n), ("Q", q), ("PB", pb), ("NSG", nsg), ("ROPE", use_rope),
        ],
        grid=(32 * nsg, p // pb, b * h),
        threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(b, l, h, p), (b, h, p, n)],
        output_dtypes=[x.dtype, f32],
    )
    return y, state


# Self-checks (kernels.attempt runs them before a kernel family's first use; the doctor over a
# grid): each kernel against the ops path on rope(B), rope(C), batch > 1 with a masked row.


def _ssd_inputs(b, l, h, P, N, T):
    """Deterministic x, dt, A, B, C (b, l, h, .), initial state, mask (row 1 padded at the
    end) and RoPE offsets for the self-checks."""
    probe = kernels.probe
    x, B, C = probe((b, l, h, P), 1, T), probe((b, l, h, N), 2, T, 0.5), probe((b, l, h, N), 3, T, 0.5)
    dt = nn.softplus(probe((b, l, h), 4) - 0.5)
    A = -mx.linspace(0.2, 1.5, h)
    state = probe((b, h, P, N), 5)
    mask = ~((mx.arange(b)[:, None] == 1) & (mx.arange(l)[None, :] >= l - 2))  # (b, l); l = 1: row 1 out
    offset = mx.array([5 + 12 * i for i in range(b)], dtype=mx.int32)
    return x, dt, A, B, C, state, mask, offset


def _rotated(rope, v, offset):
    return v if rope is None else rope(v.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)


@kernels.self_check("ssd_step")
def ssd_step_self_check(T=mx.float32, P=16, N=16, ROPE=True, b=2, h=2, **_):
    rope = RotaryEmbedding(N, 10000.0, None, 2048) if ROPE else None

    def kernel_fn(x, dt, A, B, C, state, mask, offset):
        cos_sin = None if rope is None else rope_cos_sin(rope, b, 1, N, offset)[:, 0]
        return ssd_step_kernel(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, mask[:, 0], cos_sin)

    def ops_fn(x, dt, A, B, C, state, mask, offset):
        B, C = _rotated(rope, B, offset), _rotated(rope, C, offset)
        return ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, mask[:, 0])

    return kernels.SelfCheck(kernel_fn, ops_fn, _ssd_inputs(b, 1, h, P, N, T), kernels.TOLERANCE[T])


@kernels.self_check("ssd_scan")
def ssd_scan_self_check(T=mx.float32, P=16, N=16, Q=None, ROPE=True, b=2, h=2, l=None, **_):
    q = scan_layout(P, N, Q)[2]
    l = l or q + 3  # a ragged second chunk
    rope = RotaryEmbedding(N, 10000.0, None, 2048) if ROPE else None

    def kernel_fn(x, dt, A, B, C, state, mask, offset):
        cos_sin = None if rope is None else rope_cos_sin(rope, b, l, N, offset)
        return ssd_chunked_scan_kernel(x, dt, A, B, C, state, mask, cos_sin, q)

    def ops_fn(x, dt, A, B, C, state, mask, offset):
        return ssd_chunked_scan(x, dt, A, _rotated(rope, B, offset), _rotated(rope, C, offset), 16, state, mask)

    return kernels.SelfCheck(kernel_fn, ops_fn, _ssd_inputs(b, l, h, P, N, T), kernels.TOLERANCE[T])


ROLLBACK_WINDOW = 16


class RollbackError(ValueError):
    """A trim reaching further back than the SSD states an ``SSDCache`` kept."""


class SSDCache(ArraysCache):
    """The SSD layer's decode cache, ``[S (batch,H,P,N) float32, offset (batch,) int32]`` as in
    an ``ArraysCache(2)``, that can also be rolled back over its latest tokens.

    A state cannot be un-decayed, so rollback keeps copies: while a call processes at most
    ``window`` tokens (a decode step, the verification of drafted tokens) the layer computes
    the state after each of them (``ssd_step`` / ``ssd_states``) and records ``(S, offset)``
    per token; ``history``
    holds the last ``window + 1`` such pairs (the oldest is the state before the kept tokens),
    across calls. ``trim(n)`` restores the pair from n tokens ago exactly (the same float32
    arrays), the Metal kernels on or off (a short call, the first one on an empty cache
    included, takes the ops path); a longer call (prefill) keeps only its final state, so
    trimming into it is refused
    (``RollbackError``, raised before anything is changed) -- ``trimmable_tokens()`` says how
    many tokens can be rolled back now; ``is_trimmable()`` says the cache type can.
    Memory: one kept state is batch * H * P * N * 4 bytes per SSD layer (64 KiB per row and
    layer for the default model: H=4, P=N=64), so at most ``window + 1`` times that.

    mlx-lm's batch operations carry each row's kept pairs: ``merge`` / ``extend`` join the
    rows' histories, ``filter`` slices them, and ``extract(idx)`` returns row idx as an SSDCache
    whose history is that row's own (one pair per token it saw, padded positions dropped), so a
    finished request of mlx-lm's BatchGenerator is stored in the server's prompt cache as a
    cache that rolls back like a single-sequence one. Anything else that replaces the arrays
    from outside (loading, ``state``) leaves the history out of step with them; it then
    restarts from the current state. The saved form (``state``) is ``ArraysCache``'s: the
    history is transient. The class is
    registered in ``mlx_lm.models.cache`` because ``load_prompt_cache`` and ``CacheList``
    rebuild caches by class name from that module.
    """

    window = ROLLBACK_WINDOW
    history = ()

    def __init__(self, size: int = 2, left_padding: Optional[List[int]] = None):
        if size != 2:
            raise ValueError(f"SSDCache holds [state, offset] (size 2, got {size})")
        super().__init__(2, left_padding=left_padding)
        self.history = [(None, None)]

    def snapshots(self) -> list:
        """The kept ``(S, offset)`` pairs, oldest first; the last is the current one."""
        h = self.history
        if h and h[-1][0] is self.cache[0] and h[-1][1] is self.cache[1]:
            return list(h)
        return [(self.cache[0], self.cache[1])]

    def record(self, states: List[mx.array], offsets: List[mx.array], num_tokens: int):
        """Set the state and offset after a call of ``num_tokens`` tokens; ``states`` /
        ``offsets`` are the pairs after each of its tokens, or only after the last one."""
        pairs = list(zip(states, offsets))
        kept = self.snapshots() + pairs if len(pairs) == num_tokens else pairs[-1:]
        self.history = kept[-(self.window + 1):]
        self.cache[0], self.cache[1] = pairs[-1]

    # Batching (mlx-lm's BatchGenerator merges the requests' caches, filters and extends the
    # batch as requests leave and join, and extracts a finished row): each row's kept pairs go
    # with it. A batch keeps one pair per position of its calls, aligned from the newest; a row
    # with fewer kept pairs than the others (it joined later, or its prefill was long) repeats
    # its oldest one, and a padded position repeats the row's pair too -- ``extract`` keeps one
    # pair per offset, so a row's history is its own. (``trim`` on a batch is for a batch whose
    # rows all saw every position; mlx-lm trims only single-sequence caches.)

    def _restart(self):
        self.history = [(self.cache[0], self.cache[1])]

    def _joined(self, parts: List[Tuple], sizes: List[int]) -> Tuple:
        """One batch pair from the rows' pairs, in order (an empty cache's (None, None): zeros)."""
        out = []
        for e, like in enumerate(self.cache[:2]):
            out.append(mx.concatenate([
                p[e] if p[e] is not None else mx.zeros((n,) + like.shape[1:], like.dtype)
                for p, n in zip(parts, sizes)
            ]))
        return tuple(out)

    def _join_histories(self, kept: List[list], sizes: List[int]):
        """Set the history of rows joined from caches with the kept pairs ``kept``; the current
        arrays are already joined (by ArraysCache's merge / extend)."""
        if self.cache[0] is None or self.cache[1] is None:
            return self._restart()
        n = max(len(k) for k in kept)
        kept = [[k[0]] * (n - len(k)) + k for k in kept]
        older = [self._joined([k[j] for k in kept], sizes) for j in range(n - 1)]
        self.history = older + [(self.cache[0], self.cache[1])]

    @staticmethod
    def _kept(c) -> list:
        return c.snapshots() if isinstance(c, SSDCache) else [(c[0], c[1])]

    def filter(self, batch_indices):
        kept = self.snapshots()
        super().filter(batch_indices)
        older = [tuple(None if a is None else a[batch_indices] for a in pair) for pair in kept[:-1]]
        self.history = older + [(self.cache[0], self.cache[1])]

    def extend(self, other):
        kept = [self._kept(self), self._kept(other)]
        sizes = [self.batch_size, other.batch_size]
        super().extend(other)
        self._join_histories(kept, sizes)

    @classmethod
    def merge(cls, caches):
        merged = super().merge(caches)
        merged._join_histories([cls._kept(c) for c in caches], [c.batch_size for c in caches])
        return merged

    def extract(self, idx: int) -> "SSDCache":
        """Row ``idx`` as a single-sequence SSDCache with that row's kept pairs. A padded call
        (right padding while prefilling a batch, left padding) records pairs at positions where
        a row has no token: its state and offset stay put there, so of the pairs with the same
        offset only the newest is kept -- one pair per token of the row, as a cache that saw
        only its tokens would hold."""
        kept = [tuple(None if a is None else a[idx : idx + 1] for a in pair) for pair in self.snapshots()]
        known = [p[1] for p in kept if p[1] is not None]
        offsets = iter(mx.concatenate(known).tolist() if known else [])
        offsets = [0 if p[1] is None else next(offsets) for p in kept]
        rows = [p for j, p in enumerate(kept) if j + 1 == len(kept) or offsets[j] != offsets[j + 1]]
        out = SSDCache()
        out.cache = list(rows[-1])
        out.history = rows
        return out

    @property
    def nbytes(self) -> int:
        """The current arrays and every kept state (the server's cache budget counts them)."""
        arrays = {id(a): a for pair in self.snapshots() for a in pair if a is not None}
        arrays.update({id(a): a for a in self.cache if a is not None})
        return sum(a.nbytes for a in arrays.values())

    def is_trimmable(self) -> bool:
        """True: this cache rolls back, within ``trimmable_tokens()`` (``trim`` refuses more).
        Not "some tokens now": mlx-lm's speculative decoding asks once, on the caches it is
        handed (fresh, or reused by the server), before the short calls whose states are kept."""
        return True

    def trimmable_tokens(self) -> int:
        return len(self.snapshots()) - 1

    def trim(self, n: int) -> int:
        kept = self.snapshots()
        if not 0 <= n < len(kept):
            raise RollbackError(
                f"cannot roll the SSD state back {n} tokens: it keeps the states of its last "
                f"{len(kept) - 1} tokens (calls of at most {self.window} tokens are kept)"
            )
        self.history = kept[: len(kept) - n]
        self.cache[0], self.cache[1] = self.history[-1]
        return n


# load_prompt_cache / CacheList rebuild caches with globals()[class name] of this module
_mlx_lm_cache.SSDCache = SSDCache


class StateSpaceDuality(nn.Module):
    # the projections of the input, one product inside the whole-model step (projections.py)
    JOINED = ("_joined_in", ("c_proj", "b_proj", "x_proj", "dt_proj"))

    def __init__(self, args):
        super().__init__()
        d, H, P = args.hidden_size, args.num_attention_heads, args.head_dim
        self.num_heads, self.head_dim = H, P
        self.chunk_size = args.ssd_chunk_size
        bias = args.ssd_bias
        self.c_proj = nn.Linear(d, H * P, bias=bias)
        self.b_proj = nn.Linear(d, H * P, bias=bias)
        self.x_proj = nn.Linear(d, H * P, bias=bias)
        self.dt_proj = nn.Linear(d, H, bias=bias)
        # decay rate, used as stored; new models start stable: A = -(1..H)
        self.A = -mx.arange(1, H + 1, dtype=mx.float32)
        self.out_proj = nn.Linear(H * P, d, bias=bias)
        self.rope = (
            RotaryEmbedding(P, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
            if args.ssd_rope
            else None
        )

    def kernel_path(self, X, dt, B, C, state, mask, offset):
        """y (b, l, H, P) and the new state through ssd_step.metal (one token) or
        ssd_scan.metal, RoPE on B and C fused in; X, B, C: (b, l, H, P) before RoPE."""
        b, l = X.shape[:2]
        cos_sin = None if self.rope is None else rope_cos_sin(self.rope, b, l, self.head_dim, offset)
        if l == 1:
            y, state = ssd_step_kernel(
                X[:, 0], dt[:, 0], self.A, B[:, 0], C[:, 0], state,
                None if mask is None else mask[:, 0], None if cos_sin is None else cos_sin[:, 0],
            )
            return y[:, None], state
        return ssd_chunked_scan_kernel(X, dt, self.A, B, C, state, mask, cos_sin)

    def mix(self, x: mx.array, state=None, offset=0, mask=None, keep: bool = False, use_kernels: bool = False):
        """The pure part: x (b, l, d) from state S (b, H, P, N) float32 or None, RoPE
        positions from ``offset`` (int or (b,)), mask (b, l) bool or None -> (out (b, l, d),
        the states to keep: the final one, or with ``keep`` the one after every token)."""
        b, l, _ = x.shape
        H, P = self.num_heads, self.head_dim
        if mask is not None:
            x = mx.where(mask[..., None], x, 0)

        C, B, X, dt = projections.project(self, *self.JOINED, x)
        C, B, X = C.reshape(b, l, H, P), B.reshape(b, l, H, P), X.reshape(b, l, H, P)
        dt = nn.softplus(dt.astype(mx.float32))  # (b, l, H)

        out = None
        if use_kernels and not keep:  # RoPE on B and C fused into the kernels
            out = kernels.attempt(self.kernel_path, X, dt, B, C, state, mask, offset)
        if out is not None:
            y, state = out
            states = [state]
        else:
            if self.rope is not None and l <= SHORT_CALL:  # a decode step / a verification: few operations
                C, B = rotate_step(self.rope, (C, B), offset, 1)
            elif self.rope is not None:
                C = self.rope(C.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)
                B = self.rope(B.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)
            if l == 1:
                y, state = ssd_step(
                    X[:, 0], dt[:, 0], self.A, B[:, 0], C[:, 0], state,
                    None if mask is None else mask[:, 0],
                )
                y = y[:, None]
                states = [state]
            elif keep:
                y, all_states = ssd_states(X, dt, self.A, B, C, state, mask)
                states = [all_states[:, i] for i in range(l)]  # (b, H, P, N) each
            else:
                y, state = ssd_chunked_scan(X, dt, self.A, B, C, self.chunk_size, state, mask)
                states = [state]
        return self.out_proj(y.reshape(b, l, H * P).astype(x.dtype)), states

    @staticmethod
    def pads(cache) -> Optional[mx.array]:
        """Each row's left pads still ahead in this call ((b,) int32), or None: mlx-lm's
        ``left_padding`` counts down by every call's length (``ArraysCache.advance``)."""
        left = getattr(cache, "left_padding", None)
        return None if left is None else mx.maximum(left, 0).astype(mx.int32)

    @staticmethod
    def kept_offsets(states, offset, l: int, pad=None, lengths=None) -> List[mx.array]:
        """The RoPE position after each kept state of an l-token call from ``offset``, advanced
        by each row's true token count -- right padding (``lengths``, mlx-lm's BatchGenerator)
        and left padding (``pad``, ``pads``) excluded, so a row's offset counts its own tokens
        as a single-sequence cache would."""
        b = states[-1].shape[0]
        offsets = []
        for k in range(l - len(states) + 1, l + 1):
            advance = mx.full((b,), k, dtype=mx.int32)
            if pad is not None:  # left-padded batch: pads ahead of the real tokens
                advance = mx.clip(advance - pad, 0, k)
            if lengths is not None:  # right-padded batch
                advance = mx.minimum(advance, mx.clip(lengths, 0, k))
            offsets.append((offset + advance).astype(mx.int32))
        return offsets

    @staticmethod
    def write(cache, states, offsets, l: int):
        """Set the cache to the last (state, offset) after an l-token call (an SSDCache records
        them all for rollback) and advance its padding bookkeeping."""
        if isinstance(cache, SSDCache):
            cache.record(states, offsets, l)
        else:
            cache[0], cache[1] = states[-1], offsets[-1]
        cache.advance(l)

    @staticmethod
    def store(cache, states, offset, l: int):
        """Write the kept states into the cache with the RoPE position after each
        (``kept_offsets`` for the cache's padding, then ``write``)."""
        offsets = StateSpaceDuality.kept_offsets(states, offset, l, StateSpaceDuality.pads(cache), cache.lengths)
        StateSpaceDuality.write(cache, states, offsets, l)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        l = x.shape[1]
        mask = cache.make_mask(l) if cache is not None else None  # (b, l) or None
        state = cache[0] if cache is not None else None
        offset = cache[1] if cache is not None and cache[1] is not None else 0
        # a short call on a rollback cache keeps the state after each of its tokens (SSDCache),
        # on the ops path -- a first call too (mlx-lm's draft decoding from a one-token prompt
        # trims into it)
        use_kernels = kernels.enabled(training=self.training)
        keep = 1 < l <= getattr(cache, "window", 0)
        pad = self.pads(cache)
        # a row's left pads take no RoPE positions: its first real token is at its offset
        out, states = self.mix(x, state, offset if pad is None else offset - pad, mask, keep, use_kernels)
        if cache is not None:
            self.store(cache, states, offset, l)
        return out

    def shard_problems(self, N: int) -> List[str]:
        """What prevents splitting this layer over N ranks (empty when it can be split)."""
        problems = []
        if self.num_heads % N:
            problems.append(f"num_attention_heads {self.num_heads} (SSD heads) is not divisible by {N}")
        return problems + split_inputs_problems("ssd.out_proj", self.out_proj, N)

    def shard(self, group: mx.distributed.Group):
        """Tensor-parallel split by heads (cheems_mlx.sharding): c/b/x/dt_proj all-to-sharded
        and A by heads -> H/N heads, state (b, H/N, P, N); out_proj sharded-to-all (one
        all_sum)."""
        N, r = group.size(), group.rank()
        for name in ("c_proj", "b_proj", "x_proj", "dt_proj"):
            setattr(self, name, shard_linear(getattr(self, name), "all-to-sharded", group=group))
        self.out_proj = shard_linear(self.out_proj, "sharded-to-all", group=group)
        self.num_heads //= N
        h0 = r * self.num_heads
        self.A = mx.contiguous(self.A[h0 : h0 + self.num_heads])
