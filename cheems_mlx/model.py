"""The Cheems decoder stack (and the Doge models, which are Cheems without SSD layers).

    h = embed[ids]                                   # no sqrt(d) scale
    for i in range(n_layers):
        mixer = attention if layers_type[i] == "attn" else ssd
        h = res_seq[i]   * h + mixer(rms_norm(h))     # learned residual vectors
        h = res_state[i] * h + ffn(rms_norm(h))       # gated MLP or CDMoE
    logits = rms_norm(h) @ lm_head.T                  # lm_head tied to embed when configured

Native weight names are the official Cheems ones (``model.word_embed``,
``layers.{i}.pre_sequence_layernorm``, ``.ssd`` / ``.attn``, ``.post_sequence_residual``,
``.pre_state_layernorm``, ``.feed_forward``, ``.post_state_residual``,
``model.final_layernorm``, ``lm_head``); ``sanitize`` maps the Doge formats onto them.

This module is also an mlx-lm model module: ``ModelArgs``, ``Model`` with ``layers``,
``make_cache``, ``sanitize``, ``shard``, ``quant_predicate`` and ``cast_predicate``. It
owns the stack only: each layer's math, cache and tensor-parallel split live in its own
module (ssd.py, dma.py, cdmoe.py), and nothing here imports the runtime that runs ranks.
"""

import functools
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import (
    BatchKVCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from . import fastmath, kernels, projections
from .cdmoe import CDMoE, MLP
from .dma import MASK_RULES, DynamicMaskAttention
from .rope import shared_rotations
from .sharding import DistributedError, shard_vocab
from .ssd import SSDCache, StateSpaceDuality

LAYER_TYPES = ("ssd", "attn")
# layers Model.quant_predicate keeps at 8 bits whatever the requested quantization
HIGH_PRECISION_LAYERS = ("dt_proj", "router_gate", "queries")
NATIVE_KEY = re.compile(
    r"^(lm_head\.|model\.word_embed\.|model\.final_layernorm\.|model\.layers\.\d+\."
    r"(pre_sequence_layernorm|ssd|attn|post_sequence_residual|pre_state_layernorm|feed_forward|"
    r"post_state_residual)\.)"
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "cheems"
    vocab_size: int = 32768
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    ssd_bias: bool = False
    # hybrid pattern: explicit list, or attention where i % period == offset. (Named as in
    # the official Cheems config; ``layer_types`` would be validated by transformers when
    # mlx-lm loads the tokenizer next to config.json, and is accepted here as an alias.)
    layers_type: Optional[List[str]] = None
    layer_types: Optional[List[str]] = None
    attn_layer_period: int = 8
    attn_layer_offset: int = 7
    # SSD
    ssd_chunk_size: int = 256
    ssd_rope: bool = True
    # dynamic mask attention
    keep_window_size: int = 2048
    dynamic_mask_ratio: float = 0.0
    dynamic_mask_rule: str = "keep_window"
    dynamic_mask_heads: str = "kv"  # "kv": A/dt_proj sized Hkv (transformers Doge); "attention": H
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    # feed forward: dense gated MLP or CDMoE
    is_moe: bool = False
    moe_router: str = "queries"  # "queries" (Cheems) or "router_gate" (Doge)
    moe_routing: str = "per_token"  # or "transformers_reshape" (Doge reference behaviour)
    num_experts: int = 16384
    num_experts_per_tok: int = 8
    num_expert_heads: int = 4
    expert_retrieval_size: int = 64
    norm_topk_prob: bool = False
    # informational: special tokens (mlx-lm reads eos_token_id) and the weights' origin
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None
    pad_token_id: Optional[int] = None
    source_format: Optional[str] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layers_type is None and self.layer_types is not None:
            self.layers_type = list(self.layer_types)
        self.layer_types = None
        if self.layers_type is None:
            self.layers_type = [
                "attn" if i % self.attn_layer_period == self.attn_layer_offset else "ssd"
                for i in range(self.num_hidden_layers)
            ]
        self.validate()

    def validate(self):
        def fail(msg):
            raise ValueError(f"invalid cheems config: {msg}")

        if len(self.layers_type) != self.num_hidden_layers:
            fail(f"layers_type has {len(self.layers_type)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layers_type) - set(LAYER_TYPES))
        if bad:
            fail(f"unknown layer types {bad}; expected {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if "ssd" in self.layers_type and self.num_attention_heads * self.head_dim != self.hidden_size:
            fail("SSD layers need num_attention_heads * head_dim == hidden_size")
        if self.head_dim % 2:
            fail(f"head_dim {self.head_dim} must be even for RoPE")
        if self.dynamic_mask_rule not in MASK_RULES:
            fail(f"dynamic_mask_rule {self.dynamic_mask_rule!r} not in {MASK_RULES}")
        if self.dynamic_mask_heads not in ("kv", "attention"):
            fail(f"dynamic_mask_heads {self.dynamic_mask_heads!r} not in ('kv', 'attention')")
        if self.ssd_chunk_size < 1:
            fail("ssd_chunk_size must be positive")
        if self.is_moe:
            K = int(self.num_experts**0.5)
            if K < 1 or self.num_experts_per_tok < 1 or self.num_experts_per_tok > K * K:
                fail(
                    f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                    f"[1, floor(sqrt(num_experts))^2 = {K * K}]"
                )
            if self.moe_router == "queries" and self.expert_retrieval_size % 2:
                fail("expert_retrieval_size must be even")


class Residual(nn.Module):
    """Learned per-channel residual scale: ``weight * residual + update``."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = mx.ones((dims,))

    def __call__(self, residual: mx.array, update: mx.array) -> mx.array:
        return self.weight * residual + update


def compiled_decode_enabled(training: bool = False, whole_model: bool = False) -> bool:
    """Whether a decode step runs compiled: not training, not on the Metal kernel path (which
    fuses its own way), and as the environment says -- ``CHEEMS_MLX_COMPILE=1`` (the default)
    the whole model's step as one function (``Model.compiled_step``), ``=layers`` only each
    ``DecoderLayer``'s compiled functions (the previous form, kept for profiling), ``=0``
    every operation eagerly."""
    mode = fastmath.compile_mode()
    if training or mode == "0" or kernels.enabled():
        return False
    return mode != "layers" if whole_model else True


class DecoderLayer(nn.Module):
    """One block. A decode step on the CPU (one token with a cache) runs two ``mx.compile``d
    functions instead of several hundred small operations: everything before the mixer's
    cache (norm, projections, q/k norm, RoPE, the DMA key bias -- for SSD the whole
    recurrence step, whose state is an input and an output) and everything after it
    (output projection, residuals, norm, MLP / CDMoE routing and mixing). In between only
    the attention's K/V / bias cache update and the masked attention run eagerly. The
    compiled functions read the layer's current parameters at each call
    (``inputs=self.state``), trace once per shape, and compute what the eager path computes
    (same operations; fused elementwise kernels round alike to float32)."""

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        d, eps = args.hidden_size, args.rms_norm_eps
        self.pre_sequence_layernorm = nn.RMSNorm(d, eps=eps)
        if layer_type == "ssd":
            self.ssd = StateSpaceDuality(args)
        else:
            self.attn = DynamicMaskAttention(args)
        self.post_sequence_residual = Residual(d)
        self.pre_state_layernorm = nn.RMSNorm(d, eps=eps)
        self.feed_forward = CDMoE(args) if args.is_moe else MLP(args)
        self.post_state_residual = Residual(d)

    @property
    def mixer(self):
        return self.ssd if self.layer_type == "ssd" else self.attn

    def __call__(self, h: mx.array, cache=None) -> mx.array:
        if h.shape[1] == 1 and self.decode_compilable(cache):
            return self.compiled_decode(h, cache)
        return self.after_mixer(h, self.mixer(self.pre_sequence_layernorm(h), cache))

    def after_mixer(self, h: mx.array, update: mx.array) -> mx.array:
        h = self.post_sequence_residual(h, update)
        return self.post_state_residual(h, self.feed_forward(self.pre_state_layernorm(h)))

    def decode_compilable(self, cache, enabled: Optional[bool] = None) -> bool:
        """Whether this layer's decode step can run compiled with ``cache``; ``enabled``: the
        caller has read ``compiled_decode_enabled`` already (the environment, once a step)."""
        if enabled is None:
            enabled = compiled_decode_enabled(self.training)
        if cache is None or not enabled or self.is_shard():
            return False
        rope = self.mixer.rope
        if rope is not None and rope.kind == "dynamic":  # its base depends on offset.item()
            return False
        if self.layer_type == "ssd":  # a settled state and no padding mask to apply
            return cache[0] is not None and cache[1] is not None and cache.lengths is None \
                and cache.left_padding is None
        return True

    def is_shard(self) -> bool:
        """A tensor-parallel shard (``shard``): its collectives stay on the eager path."""
        if "_is_shard" not in self.__dict__:
            object.__setattr__(self, "_is_shard", any(hasattr(m, "group") for _, m in self.named_modules()))
        return self._is_shard

    def compiled_decode(self, h: mx.array, cache) -> mx.array:
        fns = self.__dict__.get("_decode_fns")
        if fns is None:
            fns = self._build_decode_fns()
            object.__setattr__(self, "_decode_fns", fns)
        if self.layer_type == "ssd":
            offset = cache[1]
            h, state = fns[0](h, cache[0], offset)
            self.ssd.store(cache, [state], offset, 1)
            return h
        offset = cache[0].offset
        q, k, v, bias = fns[0](h, offset if isinstance(offset, mx.array) else mx.array(offset))
        return fns[1](h, self.attn.attend(q, k, v, bias, cache))

    def _build_decode_fns(self):
        if self.layer_type == "ssd":
            def step(h, state, offset):  # StateSpaceDuality.__call__ without the cache bookkeeping
                out, states = self.ssd.mix(self.pre_sequence_layernorm(h), state, offset)
                return self.after_mixer(h, out), states[-1]

            return (mx.compile(step, inputs=self.state),)

        def before(h, offset):
            return self.attn.project(self.pre_sequence_layernorm(h), offset)

        def after(h, attended):
            return self.after_mixer(h, self.attn.o_proj(attended))

        return mx.compile(before, inputs=self.state), mx.compile(after, inputs=self.state)


class _StepBuffer:
    """One attention cache (K/V, or the key bias) inside ``Model.compiled_step``: the whole
    buffer, written at a traced ``offset`` (``mx.slice_update``: in place once evaluated,
    the buffer being donated), and the mask of the keys written so far (KVCache's
    ``make_mask`` semantics for queries at positions ``offset``, ``offset + 1``, ...)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, masks: Optional[dict] = None):
        self.keys, self.values, self.offset = keys, values, offset
        self.masks = {} if masks is None else masks  # shared by buffers of one offset

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None) -> mx.array:
        """(N, T) bool: query i (at position offset + i) sees the written keys up to its own."""
        key = (id(self.offset), N, self.keys.shape[2], window_size)
        if key in self.masks:
            return self.masks[key][1]
        pos = mx.arange(self.keys.shape[2])
        rows = self.offset + mx.arange(N)[:, None]
        valid = pos <= rows
        if window_size is not None:
            valid = valid & (pos > rows - window_size)
        self.masks[key] = (self.offset, valid)  # holds the offset: its id stays unique
        return valid

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        if values.shape[-1]:
            self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values


class CheemsModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, t) for t in args.layers_type]
        self.final_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.word_embed(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.final_layernorm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = CheemsModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # set by cheems_mlx.load when the tokenizer has fewer tokens than the embedding has rows
    # (a padded vocabulary): ids past it have no text, so they are never predicted
    vocab_limit: Optional[int] = None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        if input_embeddings is None and inputs.ndim == 2 and 1 <= inputs.shape[1] <= SSDCache.window \
                and self.step_compilable(cache):
            return self.compiled_step(inputs, cache)
        return self.head(self.model(inputs, cache, input_embeddings))

    def head(self, h: mx.array) -> mx.array:
        """Logits of the final normed hidden states (tied or own head, ``vocab_limit``)."""
        if self.args.tie_word_embeddings:
            logits = self.model.word_embed.as_linear(h)
        else:
            logits = self.lm_head(h)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = mx.where(mx.arange(logits.shape[-1]) < self.vocab_limit, logits, -mx.inf)
        return logits

    def step_compilable(self, cache) -> bool:
        """Whether a short call on a filled cache (a decode step, the verification of drafted
        tokens: up to ``SSDCache.window`` tokens) runs as ONE compiled function
        (``compiled_step``): every
        layer's decode step compiles (``DecoderLayer.decode_compilable``), the attention
        caches are plain ``KVCache`` pairs that already hold keys (no quantized, rotating or
        batched caches), and the mask rule is ``keep_window``: it attends over the whole
        buffer with the unwritten keys masked, which keep_window's rows (never empty: the
        newest key is always kept) do not notice; the ratio rules rank over exactly the
        cached keys and ``hard`` can mask a whole row (uniform over the keys there are).
        """
        if cache is None or len(cache) != len(self.layers) or not compiled_decode_enabled(self.training, True):
            return False
        for layer, c in zip(self.layers, cache):
            if not layer.decode_compilable(c, enabled=True):
                return False
            if layer.layer_type == "attn":
                if layer.attn.rule != "keep_window" or not isinstance(c, CacheList):
                    return False
                if any(type(kv) is not KVCache or kv.keys is None for kv in (c[0], c[1])):
                    return False
        return True

    def compiled_step(self, inputs: mx.array, cache) -> mx.array:
        """A decode step (or a short call of l <= ``SSDCache.window`` tokens: a verification of
        drafted tokens) of the whole model as one ``mx.compile``d function, traced once per l
        and buffer size: the embedding,
        every layer (SSD recurrence step, or for l > 1 the state after each token, which the
        SSDCache keeps for rollback; DMA projections, the write of k, v and the key bias
        into the cache buffers at the current offset, the mask over the buffer and the
        attention; the feed-forward) and the head. On the CPU backend each MLX operation costs
        microseconds of dispatch and a step has hundreds, so one traced graph -- with MLX's
        fusion of the elementwise runs and without Python building the graph again -- is what
        makes decoding fast there. The caches go in as arrays and come back updated; the
        attention buffers grow by ``KVCache.step`` keys (a new trace every 256 tokens), and
        their unwritten keys are masked. Equal to the layer-by-layer path to float32 rounding
        (tests/test_model_consistency.py)."""
        l = inputs.shape[1]
        # the attention layers at one offset (as ever but after a mismatched cache is put
        # together): one offset input, so their masks and RoPE angles are formed once
        offsets = {c[0].offset for layer, c in zip(self.layers, cache) if layer.layer_type == "attn"}
        key = (self.vocab_limit, len(offsets) <= 1)
        fns = self.__dict__.setdefault("_step_fns", {})
        groups = self.projection_groups()
        if projections.refresh(groups):
            fns.clear()  # the traces hold the joined weights they were made with
        if key not in fns:
            fns[key] = mx.compile(functools.partial(self._step, shared_offset=key[1]), inputs=self.state)
        states, buffers = [], []
        for layer, c in zip(self.layers, cache):
            if layer.layer_type == "ssd":
                states.append((c[0], c[1]))
                continue
            kv, bias = c[0], c[1]
            if kv.offset + l > kv.keys.shape[2]:  # room for l more keys, as KVCache.update_and_fetch grows
                for buf in (kv, bias):
                    b, h, T, p = buf.keys.shape
                    grow = mx.zeros((b, h, buf.step, p), buf.keys.dtype)
                    buf.keys = mx.concatenate([buf.keys[..., : buf.offset, :], grow], axis=2)
                    vals = buf.values[..., : buf.offset, :]
                    buf.values = mx.concatenate([vals, mx.zeros((b, h, buf.step, vals.shape[-1]), vals.dtype)], axis=2)
            buffers.append((kv.keys, kv.values, bias.keys, mx.array(kv.offset, dtype=mx.int32)))
        with projections.joined():
            logits, states, buffers = fns[key](inputs, states, buffers)
        projections.remember(groups)
        for layer, c in zip(self.layers, cache):
            if layer.layer_type == "ssd":
                StateSpaceDuality.write(c, *states.pop(0), l)
                continue
            kv, bias = c[0], c[1]
            kv.keys, kv.values, bias.keys = buffers.pop(0)
            kv.offset += l
            bias.offset += l
        return logits

    def projection_groups(self) -> list:
        """The Linear layers of one input that the whole-model step multiplies as one
        (``projections``): per layer the mixer's and the feed-forward's ``JOINED`` group."""
        return [(m, *m.JOINED) for layer in self.layers for m in (layer.mixer, layer.feed_forward)]

    def _step(self, inputs, states, buffers, shared_offset: bool = False):
        """``compiled_step``'s traced function: (tokens (b, l), [(S, offset)] per SSD layer,
        [(keys, values, bias keys, offset)] per attention layer) -> (logits, [(the states after
        each token (one for l = 1), their offsets)], [(keys, values, bias keys)] updated).
        ``shared_offset``: the attention offsets are equal, and the first one serves all (one
        array, so the compiled graph forms their masks and RoPE angles once)."""
        l = inputs.shape[1]
        h = self.model.word_embed(inputs)
        states, buffers = list(states), list(buffers)
        if shared_offset and buffers:
            buffers = [(*buf[:3], buffers[0][3]) for buf in buffers]
        with shared_rotations():
            return self._step_layers(h, l, states, buffers)

    def _step_layers(self, h, l, states, buffers):
        new_states, new_buffers, masks = [], [], {}
        for layer in self.layers:
            x = layer.pre_sequence_layernorm(h)
            if layer.layer_type == "ssd":
                state, offset = states.pop(0)
                out, kept = layer.ssd.mix(x, state, offset, keep=l > 1)
                new_states.append((kept, StateSpaceDuality.kept_offsets(kept, offset, l)))
            else:
                keys, values, bias, offset = buffers.pop(0)
                kv = _StepBuffer(keys, values, offset, masks)
                b, Hm = bias.shape[:2]
                bias_buf = _StepBuffer(bias, mx.zeros((b, Hm, bias.shape[2], 0), bias.dtype), offset, masks)
                out = layer.attn(x, (kv, bias_buf))
                new_buffers.append((kv.keys, kv.values, bias_buf.keys))
            h = layer.after_mixer(h, out)
        return self.head(self.model.final_layernorm(h)), new_states, new_buffers

    @property
    def layers(self):
        return self.model.layers

    def shard_problems(self, N: int) -> List[str]:
        """What prevents splitting the model over N ranks (empty when it can be split): each
        layer's own checks, and adapters that must be fused first."""
        problems = []
        for layer in self.layers:
            found = [layer.mixer.shard_problems(N), layer.feed_forward.shard_problems(N)]
            if any(type(m).__name__.startswith(("LoRA", "DoRA")) for _, m in layer.named_modules()):
                found.insert(0, ["the model has LoRA adapters: fuse them first (python -m cheems_mlx.fuse)"])
            problems += [p for ps in found for p in ps if p not in problems]
        return problems

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor-parallel split over the ranks of ``group`` in place (mlx-lm's ``shard``
        convention): each layer splits itself (``StateSpaceDuality.shard``,
        ``DynamicMaskAttention.shard``, ``MLP.shard``, ``CDMoE.shard``: heads, MLP width,
        expert rows), then the vocabulary rows of ``word_embed`` / ``lm_head``; see
        ``cheems_mlx.sharding``. Raises ``DistributedError`` (one line) when the model
        cannot be split over this many ranks."""
        group = group or mx.distributed.init()
        N = group.size()
        if N == 1:
            return self
        problems = self.shard_problems(N)
        if problems:
            raise DistributedError(f"cannot split this model over {N} ranks: " + "; ".join(problems))
        for layer in self.layers:
            layer.mixer.shard(group)
            layer.feed_forward.shard(group)
        V = self.args.vocab_size
        shard_vocab(self.model.word_embed, V, group)
        if not self.args.tie_word_embeddings:
            shard_vocab(self.lm_head, V, group)
        self.shard_group = group
        return self

    def make_cache(
        self,
        left_padding: Optional[List[int]] = None,
        max_kv_size: Optional[int] = None,
        kv_bits: Optional[int] = None,
        kv_group_size: int = 64,
    ):
        """One cache per layer: SSD -> SSDCache([state, offset], rollback over short calls); attention ->
        CacheList(K/V cache, per-key bias cache). ``left_padding`` builds batched caches
        for left-padded prompts; ``max_kv_size`` bounds the attention caches;
        ``kv_bits`` stores K/V quantized from the first token (the bias stays exact)."""
        if kv_bits is not None and (left_padding is not None or max_kv_size is not None):
            raise ValueError("kv_bits cannot be combined with left_padding or max_kv_size")
        if kv_bits is not None and kv_group_size not in (32, 64, 128):
            raise ValueError(f"kv_group_size must be 32, 64 or 128 (got {kv_group_size})")
        if kv_bits is not None and self.args.head_dim % kv_group_size:
            raise ValueError(
                f"kv_group_size {kv_group_size} does not divide the head dimension {self.args.head_dim}"
            )

        def kv(quantized=False):
            if quantized:
                return QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)
            if left_padding is not None:
                return BatchKVCache(left_padding)
            if max_kv_size is not None:
                return RotatingKVCache(max_size=max_kv_size, keep=4)
            return KVCache()

        caches = []
        for layer in self.layers:
            if layer.layer_type == "ssd":
                caches.append(SSDCache(left_padding=left_padding))
            else:
                caches.append(CacheList(kv(kv_bits is not None), kv()))
        return caches

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        if not all(NATIVE_KEY.match(k) for k in weights):  # a source format's names
            from .convert.formats import native_weights

            weights = native_weights(weights)
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def quant_predicate(self):
        """Which layers ``nn.quantize`` / mlx-lm's ``quantize_model`` may quantize, and how.

        The small, sensitive layers -- SSD and DMA ``dt_proj`` (the per-head step size that
        sets the decay of the state / the dynamic mask) and the CDMoE router (``queries`` or
        ``router_gate``, whose top-k choice is discontinuous) -- get 8-bit affine
        quantization whatever the requested width: measured on the default model, that keeps
        the perplexity and the expert choices of the floating-point routers while saving
        about half their bytes (docs/quantization.md). Where no group size of 64 or 32
        divides their input dimension they stay in floating point. Everything else (the
        projections, the MLPs, the word embedding and the CDMoE expert tables
        ``down_embed`` / ``up_embed``) is quantized as requested. ``A``, the CDMoE ``keys``,
        the norms and the residual scales are plain arrays, which nn.quantize never touches.
        """

        def predicate(path: str, module) -> Union[bool, dict]:
            if path.rsplit(".", 1)[-1] in HIGH_PRECISION_LAYERS:
                in_dims = module.weight.shape[-1]
                for group_size in (64, 32):
                    if in_dims % group_size == 0:
                        return {"group_size": group_size, "bits": 8, "mode": "affine"}
                return False
            return True

        return predicate

    @property
    def cast_predicate(self):
        """Parameters kept in float32 when converting to a lower dtype."""

        def predicate(path: str) -> bool:
            return not (path.endswith(".A") or path.endswith(".keys"))

        return predicate
