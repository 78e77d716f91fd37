"""Cross domain mixture of experts (CDMoE, Wonderful Matrices section 3.3) and the dense
gated MLP.

A shared gated MLP (the cross-domain expert) plus E rank-1 experts; expert i is row i
of ``down_embed`` and row i of ``up_embed``. Experts are retrieved with product keys:
two sets of K = floor(sqrt(E)) sub-keys, scores s_x and s_y, candidate i*K + j scored
s_x[i] + s_y[j]; the top-k candidates of the top-k x top-k grid are exactly the top-k
of all K^2 sums.

    w   = softmax(top-k scores)                      (per retrieval head)
    out = shared_mlp(x) + sum_{h,k} silu(x . down_embed[idx]) * w * up_embed[idx]

Two routers:
- ``queries`` (Cheems): He retrieval heads, q = x @ Wq.T viewed (2, He, dr/2),
  sub-keys ``keys`` (He, K, 2, dr/2); k = ``num_experts_per_tok`` experts per head.
- ``router_gate`` (Doge): one head, logits = x @ Wr.T of size 2K.

``moe_routing`` chooses how Doge router logits are split into the x and y halves:
- ``per_token``: logits[..., :K] and logits[..., K:] of the same token (causal);
- ``transformers_reshape``: the reference code's ``view(2, batch*seq, K)``, a raw memory
  reshape that gives token n the x-logits of token n//2 and the y-logits of token
  N/2 + n//2 (non-causal across a full forward, kept by transformers so checkpoints
  reproduce). Imported Doge checkpoints default to it for exact parity.

Metal kernels (used when ``kernels.enabled``; ``route`` / the expert term above stay the
reference): ``product_key_route_kernel`` (metal_kernels/cdmoe_route.metal: both sub-key
top-k, the candidate grid, the final top-k and the softmax in one launch) and
``expert_mix_kernel`` (cdmoe_mix.metal, or cdmoe_mix_q.metal straight from affine-quantized
``nn.QuantizedEmbedding`` tables: gather, dot, silu, weight and sum in one launch), each
compared with its ops function (``product_key_route``, ``expert_mix``) by a first-use
self-check before it is trusted (kernels.py).

Tensor parallel: ``MLP.shard(group)`` splits the width as mlx-lm's MLPs do;
``CDMoE.shard(group)`` splits the shared MLP the same way and the expert tables by rows
(``ShardedCDMoE``: routing replicated, one all_sum); ``shard_problems(N)`` says what
prevents it.
"""

import math
from typing import List

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear, sum_gradients

from . import fastmath, kernels, projections
from .sharding import ranges, slice_rows, split_inputs_problems

ROUTERS = ("queries", "router_gate")
ROUTINGS = ("per_token", "transformers_reshape")


class MLP(nn.Module):
    # gate / up, one product inside the whole-model step (projections.py)
    JOINED = ("_joined_gate_up", ("gate_proj", "up_proj"))

    def __init__(self, args):
        super().__init__()
        d, F, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(d, F, bias=bias)
        self.up_proj = nn.Linear(d, F, bias=bias)
        self.down_proj = nn.Linear(F, d, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fastmath.swiglu(*projections.project(self, *self.JOINED, x)))

    def shard_problems(self, N: int) -> List[str]:
        """What prevents splitting this layer over N ranks (empty when it can be split)."""
        problems = []
        if self.gate_proj.weight.shape[0] % N:
            problems.append(f"intermediate_size {self.gate_proj.weight.shape[0]} is not divisible by {N}")
        return problems + split_inputs_problems("feed_forward.down_proj", self.down_proj, N)

    def shard(self, group: mx.distributed.Group):
        """Tensor-parallel split of the width, as mlx-lm's MLPs: gate/up all-to-sharded, down
        sharded-to-all (one all_sum)."""
        self.gate_proj = shard_linear(self.gate_proj, "all-to-sharded", group=group)
        self.up_proj = shard_linear(self.up_proj, "all-to-sharded", group=group)
        self.down_proj = shard_linear(self.down_proj, "sharded-to-all", group=group)


def topk_with_indices(scores: mx.array, k: int):
    """Unordered top-k along the last axis: (values, indices) -- the last k places of a
    partition at n - k (no negated copy of the scores: one MLX operation less)."""
    n = scores.shape[-1]
    idx = mx.stop_gradient(mx.argpartition(scores, n - k, axis=-1)[..., n - k :])
    return mx.take_along_axis(scores, idx, axis=-1), idx


def product_key_topk(sx: mx.array, sy: mx.array, num_keys: int, k: int):
    """Top-k of {sx[i] + sy[j]} with expert index i * num_keys + j.
    sx, sy: (..., K). Returns scores (..., k) and indices (..., k)."""
    kk = min(k, num_keys)
    vx, ix = topk_with_indices(sx, kk)
    vy, iy = topk_with_indices(sy, kk)
    grid = (vx[..., :, None] + vy[..., None, :]).reshape(*vx.shape[:-1], kk * kk)
    grid_idx = (ix[..., :, None] * num_keys + iy[..., None, :]).reshape(*ix.shape[:-1], kk * kk)
    scores, pos = topk_with_indices(grid, k)
    indices = mx.take_along_axis(grid_idx, pos, axis=-1)
    return scores, mx.stop_gradient(indices)


def product_key_route(sx: mx.array, sy: mx.array, num_keys: int, k: int, norm_topk_prob: bool):
    """The ops path's routing from the sub-key scores (..., K): weights (..., k) float32 (softmax
    of the top-k scores, renormalised if asked) and expert indices (..., k)."""
    scores, indices = product_key_topk(sx.astype(mx.float32), sy.astype(mx.float32), num_keys, k)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, indices


def expert_mix(x: mx.array, weights: mx.array, indices: mx.array, down_embed, up_embed) -> mx.array:
    """The ops path's routed-expert term for x (b, l, d), weights / indices (b, l, He, k)."""
    b, l, d = x.shape
    down = down_embed(indices)  # (b, l, He, k, d)
    up = up_embed(indices)  # (b, l, He, k, d)
    expert_in = (down @ x[:, :, None, :, None]).squeeze(-1)  # (b, l, He, k)
    expert_w = fastmath.swiglu(expert_in, weights.astype(x.dtype))
    flat_w = expert_w.reshape(b, l, 1, -1)  # (b, l, 1, He*k)
    return (flat_w @ up.reshape(b, l, -1, d)).squeeze(-2)  # (b, l, d)


def candidate_pairs(kk: int, k: int) -> list:
    """Codes i * kk + j of the grid cells (i, j) that can be in the top-k of s_x[i] + s_y[j]
    when both lists are sorted in descending order: (i + 1) * (j + 1) <= k (a cell is
    beaten by the (i+1)(j+1) - 1 others of its rectangle). At least k of them."""
    return [i * kk + j for i in range(kk) for j in range(kk) if (i + 1) * (j + 1) <= k]


def product_key_route_kernel(sx: mx.array, sy: mx.array, num_keys: int, k: int, norm_topk_prob: bool):
    """``product_key_topk`` + softmax (+ renormalisation) as one Metal kernel
    (metal_kernels/cdmoe_route.metal). sx, sy: (..., K). Returns weights (..., k) float32 and
    indices (..., k) uint32 in descending score order (the ops path's order is unspecified)."""
    lead = sx.shape[:-1]
    K = num_keys
    kk = min(k, K)
    pairs = candidate_pairs(kk, k)
    rows = math.prod(lead)
    R = 4  # rows (simdgroups) per threadgroup
    kern = kernels.kernel("cdmoe_route", ["sx", "sy", "pairs"], ["weights", "indices"])
    weights, indices = kern(
        inputs=[sx.reshape(rows, K), sy.reshape(rows, K), mx.array(pairs, dtype=mx.int32)],
        template=[
            ("T", sx.dtype), ("K", K), ("KK", kk), ("TOPK", k), ("NPAIR", len(pairs)), ("R", R),
            ("NORM", bool(norm_topk_prob)),
        ],
        grid=(32, rows, 1),
        threadgroup=(32, min(R, rows), 1),
        output_shapes=[(rows, k), (rows, k)],
        output_dtypes=[mx.float32, mx.uint32],
    )
    return weights.reshape(*lead, k), indices.reshape(*lead, k)


def expert_mix_kernel(x: mx.array, weights: mx.array, indices: mx.array, down_embed, up_embed):
    """The routed-expert term sum_m silu(x . down[idx_m]) * w_m * up[idx_m] as one Metal
    kernel: x (b, l, d), weights / indices (b, l, He, k). Float tables (nn.Embedding) use
    metal_kernels/cdmoe_mix.metal; affine-quantized ones (nn.QuantizedEmbedding, both tables
    with the same bits / group size) cdmoe_mix_q.metal. Returns (b, l, d) in x's dtype, or
    None for tables it does not read (other quantization modes): use the ops path then."""
    b, l, d = x.shape
    tokens = b * l
    M = math.prod(indices.shape[2:])
    nsg = 4 if d <= 256 else 8
    common = dict(
        grid=(32 * nsg, tokens, 1),
        threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(tokens, d)],
        output_dtypes=[x.dtype],
    )
    inputs = [x.reshape(tokens, d), weights.reshape(tokens, M).astype(mx.float32),
              indices.reshape(tokens, M).astype(mx.uint32)]
    if isinstance(down_embed, nn.Embedding) and isinstance(up_embed, nn.Embedding):  # float tables
        kern = kernels.kernel("cdmoe_mix", ["x", "weights", "indices", "down", "up"], ["out"])
        (out,) = kern(
            inputs=inputs + [down_embed.weight, up_embed.weight],
            template=[("T", x.dtype), ("D", d), ("M", M), ("NSG", nsg)],
            **common,
        )
        return out.reshape(b, l, d)
    tables = (down_embed, up_embed)
    if not all(isinstance(t, nn.QuantizedEmbedding) for t in tables):
        return None
    bits, group_size = down_embed.bits, down_embed.group_size
    if any(
        t.mode != "affine" or t.get("biases") is None or t.bits != bits or t.group_size != group_size
        for t in tables
    ) or bits not in (2, 3, 4, 5, 6, 8) or d % group_size:
        return None
    kern = kernels.kernel(
        "cdmoe_mix_q",
        ["x", "weights", "indices", "down_q", "down_s", "down_b", "up_q", "up_s", "up_b"],
        ["out"],
    )
    (out,) = kern(
        inputs=inputs + [down_embed["weight"], down_embed["scales"], down_embed["biases"],
                         up_embed["weight"], up_embed["scales"], up_embed["biases"]],
        template=[("T", x.dtype), ("D", d), ("M", M), ("NSG", nsg), ("BITS", bits), ("GS", group_size)],
        **common,
    )
    return out.reshape(b, l, d)


# Self-checks (kernels.attempt runs them before a kernel family's first use; the doctor over a
# grid): each kernel against its ops function in the module's dtype.


@kernels.self_check("cdmoe_route")
def cdmoe_route_self_check(T=mx.float32, K=8, TOPK=4, NORM=False, rows=5, **_):
    """Sub-key scores without ties: s_x a permutation of 0..K-1 per row, s_y one of 0..K-1
    scaled below 1 by a power of two (exact in T for K <= 256), so every s_x[i] + s_y[j]
    differs and both paths must pick the same experts; the ops path's order is unspecified,
    so its result is sorted by weight (the kernel's order)."""

    def permutation(seed):
        return mx.argsort(mx.random.uniform(shape=(rows, K), key=mx.random.key(seed)), axis=-1)

    sx = permutation(21).astype(T)
    sy = (permutation(22).astype(mx.float32) / 2 ** math.ceil(math.log2(2 * K))).astype(T)

    def ops_fn(sx, sy):
        weights, indices = product_key_route(sx, sy, K, TOPK, NORM)
        order = mx.argsort(-weights, axis=-1)
        return mx.take_along_axis(weights, order, -1), mx.take_along_axis(indices, order, -1)

    return kernels.SelfCheck(lambda sx, sy: product_key_route_kernel(sx, sy, K, TOPK, NORM), ops_fn, (sx, sy),
                             kernels.TOLERANCE[T])


@kernels.self_check("cdmoe_mix", "cdmoe_mix_q")
def cdmoe_mix_self_check(T=mx.float32, D=32, M=4, BITS=None, GS=None, tokens=3, experts=64, **_):
    """Float tables (cdmoe_mix) or affine-quantized ones (cdmoe_mix_q: BITS, GS), in T."""
    probe = kernels.probe
    x = probe((1, tokens, D), 31, T)
    weights = mx.softmax(probe((1, tokens, 1, M), 32), axis=-1)
    indices = mx.random.randint(0, experts, (1, tokens, 1, M), key=mx.random.key(33)).astype(mx.uint32)
    tables = []
    for seed in (34, 35):
        table = nn.Embedding(experts, D)
        table.weight = probe((experts, D), seed, T, 0.4)
        tables.append(nn.QuantizedEmbedding.from_embedding(table, GS, BITS) if BITS else table)
    return kernels.SelfCheck(expert_mix_kernel, expert_mix, (x, weights, indices, *tables), kernels.TOLERANCE[T])


class CDMoE(MLP):
    def __init__(self, args):
        super().__init__(args)
        d = args.hidden_size
        self.num_experts = args.num_experts
        self.num_keys = math.isqrt(args.num_experts)
        self.top_k = args.num_experts_per_tok
        self.router = args.moe_router
        self.routing = args.moe_routing
        self.norm_topk_prob = args.norm_topk_prob
        if self.router == "queries":
            self.num_heads = args.num_expert_heads
            self.retrieval_size = args.expert_retrieval_size
            self.queries = nn.Linear(d, self.num_heads * self.retrieval_size, bias=False)
            scale = self.retrieval_size**-0.5
            # stored as a dict item: ``keys`` would shadow nn.Module's dict.keys()
            self["keys"] = mx.random.uniform(
                -scale, scale, (self.num_heads, self.num_keys, 2, self.retrieval_size // 2)
            )
        elif self.router == "router_gate":
            self.num_heads = 1
            self.router_gate = nn.Linear(d, 2 * self.num_keys, bias=False)
        else:
            raise ValueError(f"unknown moe_router {self.router!r}; expected one of {ROUTERS}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown moe_routing {self.routing!r}; expected one of {ROUTINGS}")
        self.down_embed = nn.Embedding(self.num_experts, d)
        self.up_embed = nn.Embedding(self.num_experts, d)

    def sub_key_scores(self, x: mx.array):
        """s_x, s_y of shape (b, l, He, K)."""
        b, l, _ = x.shape
        K = self.num_keys
        if self.router == "queries":  # both halves of every head in one batched product
            He, half = self.num_heads, self.retrieval_size // 2
            q = self.queries(x).reshape(b * l, 2, He, half).transpose(1, 2, 0, 3)  # (2, He, b*l, dr/2)
            keys = self["keys"].astype(q.dtype).transpose(2, 0, 3, 1)  # (2, He, dr/2, K)
            s = (q @ keys).transpose(2, 0, 1, 3).reshape(b, l, 2, He, K)
            return s[:, :, 0], s[:, :, 1]
        logits = self.router_gate(x)  # (b, l, 2K)
        if self.routing == "transformers_reshape":
            halves = logits.reshape(2, b * l, K)
            return halves[0].reshape(b, l, 1, K), halves[1].reshape(b, l, 1, K)
        return logits[..., None, :K], logits[..., None, K:]

    def route(self, x: mx.array):
        """Routing weights (b, l, He, k) float32 and expert indices (b, l, He, k)."""
        sx, sy = self.sub_key_scores(x)
        args = (sx, sy, self.num_keys, self.top_k, self.norm_topk_prob)
        out = kernels.attempt(product_key_route_kernel, *args) if kernels.enabled(training=self.training) else None
        return product_key_route(*args) if out is None else out

    def experts(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """The routed term sum_{h,k} silu(x . down_embed[idx]) * w * up_embed[idx]: (b, l, d)."""
        args = (x, weights, indices, self.down_embed, self.up_embed)
        out = kernels.attempt(expert_mix_kernel, *args) if kernels.enabled(training=self.training) else None
        return expert_mix(*args) if out is None else out

    def __call__(self, x: mx.array) -> mx.array:
        weights, indices = self.route(x)
        return super().__call__(x) + self.experts(x, weights, indices)

    def shard_problems(self, N: int) -> List[str]:
        problems = super().shard_problems(N)
        if self.num_experts < N:
            problems.append(f"num_experts {self.num_experts} is smaller than {N}")
        return problems

    def shard(self, group: mx.distributed.Group):
        """Tensor-parallel split (cheems_mlx.sharding): the shared MLP split as the MLP but in
        place (no all_sum of its own), the expert tables down_embed / up_embed by rows
        (contiguous expert ranges); the router is replicated. Becomes a ``ShardedCDMoE``,
        whose ONE all_sum adds the shared-MLP and the expert partials."""
        N, r = group.size(), group.rank()
        # one all_sum for the shared MLP and the experts: split the MLP in place
        shard_inplace(self.gate_proj, "all-to-sharded", group=group)
        shard_inplace(self.up_proj, "all-to-sharded", group=group)
        shard_inplace(self.down_proj, "sharded-to-all", group=group)
        if "bias" in self.down_proj and r != 0:  # added once, by rank 0's partial
            self.down_proj.bias = mx.zeros_like(self.down_proj.bias)
        start, stop = ranges(self.num_experts, N, r)
        slice_rows(self.down_embed, start, stop)
        slice_rows(self.up_embed, start, stop)
        for table in (self.down_embed, self.up_embed):
            if hasattr(table, "num_embeddings"):
                table.num_embeddings = stop - start
        self.__class__ = ShardedCDMoE
        self.group, self.expert_start, self.expert_rows = group, start, stop - start


class ShardedCDMoE(CDMoE):
    """CDMoE with the expert tables split by rows over the group. Routing is replicated
    (every rank finds the same global top-k); ``route`` maps the chosen experts to this
    rank's rows and zeroes the weight of the experts other ranks own, so ``CDMoE.__call__``
    (ops or kernel path) yields this rank's partial sum; one all_sum adds the ranks'
    partials of the shared MLP (split as in mlx-lm, without its own all_sum) and of the
    experts."""

    def route(self, x):
        weights, indices = super().route(x)  # (b, l, He, k), global expert ids
        local = indices.astype(mx.int32) - self.expert_start
        owned = (local >= 0) & (local < self.expert_rows)
        local = mx.clip(local, 0, self.expert_rows - 1).astype(indices.dtype)
        return mx.where(owned, weights, 0.0), mx.stop_gradient(local)

    def __call__(self, x):
        x = sum_gradients(self.group)(x)
        return mx.distributed.all_sum(super().__call__(x), group=self.group)
