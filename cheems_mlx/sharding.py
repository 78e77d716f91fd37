"""Tensor-parallel building blocks: what the layers' ``shard(group)`` methods use beyond
mlx's own ``shard_linear`` / ``shard_inplace`` (``mlx.nn.layers.distributed``), as mlx-lm's
model files use those. Nothing here runs a collective until a sharded module is called.

**Tensor parallel (sharded generation / serving)** -- ``Model.shard(group)`` splits every
layer over the N ranks the way mlx-lm shards its models (``shard_linear``: an
"all-to-sharded" projection gives each rank its slice of the outputs, a
"sharded-to-all" one sums the ranks' partial products with ``all_sum``)::

    SSD      c/b/x/dt_proj all-to-sharded by heads, A by heads  -> H/N heads, state (b,H/N,P,N)
             out_proj sharded-to-all                             (one all_sum)
    DMA      q_proj by heads, k/v_proj by kv heads               -> H/N, Hkv/N heads, K/V cache
             dt_proj sharded-to-all over its input (the concatenated values of ALL kv heads:
               each rank has only its own kv heads' values, so it multiplies them by its
               columns of Wdt and the all_sum adds the partial products -- Hm numbers per
               token), then each rank keeps its own mask heads; A by mask heads
             o_proj sharded-to-all                                (one all_sum)
    MLP      gate/up all-to-sharded, down sharded-to-all         (one all_sum)
    CDMoE    shared MLP split as the MLP; expert tables down_embed / up_embed split by rows
             (contiguous expert ranges); the router (queries + keys, or router_gate) is
             replicated, so every rank computes the same global top-k; each rank mixes the
             selected experts it owns (zero weight for the others) and ONE all_sum adds the
             shared-MLP partials and the expert partials
    vocab    word_embed / lm_head split by vocabulary rows: a lookup is owned by one rank
             (all_sum of the masked rows), the logits are all_gather-ed
    replicated: norms, residual scales, the CDMoE router, RoPE tables

Each rank then holds about 1/N of the parameters and of the K/V and SSD caches; the
logits are the same on every rank (so sampling agrees when the seed does). Quantized
models shard too (mlx's quantized sharded linears; quantized tables are sliced by rows).
Sharded modules are for inference: fine-tuning uses data parallelism instead.

Each layer module owns its split and its checks (``StateSpaceDuality.shard`` in ssd.py,
``DynamicMaskAttention.shard`` in dma.py, ``MLP.shard`` / ``CDMoE.shard`` in cdmoe.py, each
with ``shard_problems``); ``Model.shard`` (model.py) walks the layers and splits the
vocabulary. The runtime that runs the ranks is ``cheems_mlx.distributed``.
"""

from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear


class DistributedError(RuntimeError):
    """A distributed setup that cannot work; the message says why (one line)."""


def ranges(total: int, n: int, r: int) -> Tuple[int, int]:
    """Contiguous split of ``total`` rows: rank r owns [start, stop)."""
    return (r * total) // n, ((r + 1) * total) // n


def slice_rows(module: nn.Module, start: int, stop: int, pad_to: Optional[int] = None):
    """Keep rows [start, stop) of every array of ``module`` (weight, scales, biases, bias),
    zero-padded to ``pad_to`` rows; compact copies, so the full arrays can be freed."""
    def cut(x):
        part = x[start:stop]
        if pad_to is not None and part.shape[0] < pad_to:
            part = mx.pad(part, [(0, pad_to - part.shape[0])] + [(0, 0)] * (x.ndim - 1))
        return mx.contiguous(part)

    module.update({k: cut(v) for k, v in module.items() if isinstance(v, mx.array)})


class _VocabShard:
    """Mixin for vocabulary-sized tables split by rows: rank r holds rows
    [vocab_start, vocab_start + vocab_rows), zero-padded to the same count on every rank."""

    def _lookup(self, ids: mx.array) -> mx.array:
        local = ids.astype(mx.int32) - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_rows)
        rows = super().__call__(mx.clip(local, 0, max(self.vocab_rows - 1, 0)))
        return mx.distributed.all_sum(mx.where(owned[..., None], rows, 0), group=self.group)

    def _gather(self, logits: mx.array) -> mx.array:
        """(..., rows per rank) on each rank -> (..., vocab_size) on every rank."""
        full = mx.distributed.all_gather(mx.moveaxis(logits, -1, 0), group=self.group)
        return mx.moveaxis(full, 0, -1)[..., : self.vocab_size]


class VocabShardedEmbedding(_VocabShard, nn.Embedding):
    def __call__(self, ids):
        return self._lookup(ids)

    def as_linear(self, x):
        return self._gather(super().as_linear(x))


class VocabShardedQuantizedEmbedding(_VocabShard, nn.QuantizedEmbedding):
    def __call__(self, ids):
        return self._lookup(ids)

    def as_linear(self, x):
        return self._gather(super().as_linear(x))


class VocabShardedLinear(_VocabShard, nn.Linear):
    def __call__(self, x):
        return self._gather(super().__call__(x))


class VocabShardedQuantizedLinear(_VocabShard, nn.QuantizedLinear):
    def __call__(self, x):
        return self._gather(super().__call__(x))


_VOCAB_CLASSES = {
    nn.Embedding: VocabShardedEmbedding,
    nn.QuantizedEmbedding: VocabShardedQuantizedEmbedding,
    nn.Linear: VocabShardedLinear,
    nn.QuantizedLinear: VocabShardedQuantizedLinear,
}


def shard_vocab(module: nn.Module, vocab_size: int, group):
    N, r = group.size(), group.rank()
    rows = -(-vocab_size // N)
    start = r * rows
    slice_rows(module, start, min(start + rows, vocab_size), pad_to=rows)
    module.__class__ = _VOCAB_CLASSES[type(module)]
    module.group = group
    module.vocab_size, module.vocab_start = vocab_size, start
    module.vocab_rows = max(0, min(rows, vocab_size - start))
    if hasattr(module, "num_embeddings"):
        module.num_embeddings = rows


class _LocalOutputs:
    """Mixin for a sharded-to-all linear whose summed output is then cut to this rank's
    columns (the DMA ``dt_proj``: its input is split by kv heads, its output by mask heads)."""

    def __call__(self, x):
        return super().__call__(x)[..., self.out_start : self.out_stop]


class ShardedToLocalLinear(_LocalOutputs, ShardedToAllLinear):
    pass


class QuantizedShardedToLocalLinear(_LocalOutputs, QuantizedShardedToAllLinear):
    pass


class _GatheredInputs(_LocalOutputs):
    """Mixin for a replicated linear fed with the all_gather of every rank's input slice
    (the DMA ``dt_proj`` when its quantization groups do not split over the ranks)."""

    def __call__(self, x):
        full = mx.distributed.all_gather(mx.moveaxis(x, -1, 0), group=self.group)
        return super().__call__(mx.moveaxis(full, 0, -1))


class GatheredInputsLinear(_GatheredInputs, nn.Linear):
    pass


class GatheredInputsQuantizedLinear(_GatheredInputs, nn.QuantizedLinear):
    pass


def is_quantized(m) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def linear_in_dims(m) -> int:
    return m.weight.shape[-1] * 32 // m.bits if is_quantized(m) else m.weight.shape[-1]


def splits_inputs(m, N) -> bool:
    if is_quantized(m):
        return (linear_in_dims(m) // m.group_size) % N == 0
    return m.weight.shape[-1] % N == 0


def split_inputs_problems(path: str, m, N: int) -> List[str]:
    """The problem (if any) of a sharded-to-all linear ``m`` (at ``path`` in a decoder layer)
    whose input columns are split over N ranks: a float one is covered by the head / width
    checks; a quantized one needs its quantization groups to split evenly."""
    if is_quantized(m):
        groups = linear_in_dims(m) // m.group_size
        if groups % N:
            return [f"{path} has {groups} quantization groups per row (group size "
                    f"{m.group_size}), not divisible by {N}: quantize with a smaller group size"]
    return []
