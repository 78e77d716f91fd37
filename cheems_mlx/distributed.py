"""Running over several machines with ``mx.distributed`` (launched by ``mlx.launch``).

Two kinds of parallelism, both on MLX's own distributed layer:

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

**Data parallel (LoRA, pretraining)** -- every rank holds the whole model, takes 1/N of
each batch, and the gradients are averaged (``mlx.nn.average_gradients``); only rank 0
writes files. See ``cheems_mlx/lora.py`` and ``cheems_mlx/train.py``.

**Failure handling** -- a rank that exits closes its sockets and the ring backend makes
the others' next collective raise ("connection to a peer was lost"); the CLIs turn that
into a one-line error and exit 1. A rank that never connects, hangs or becomes
unreachable would block the others forever (the ring backend waits in connect/recv, and
``mx.distributed.init`` holds the GIL while it waits, so no Python thread can help):
a small watchdog *process* per rank (``Watchdog``) is told of every step and terminates
its rank with a clear message when no progress is made for ``--dist-timeout`` seconds
(environment ``CHEEMS_DIST_TIMEOUT``; default 120; 0 disables).
"""

import os
import pickle
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
    shard_inplace,
    shard_linear,
    sum_gradients,
)
from mlx.utils import tree_flatten, tree_unflatten

from .cdmoe import CDMoE, MLP

DEFAULT_TIMEOUT = 120.0
TIMEOUT_ENV = "CHEEMS_DIST_TIMEOUT"
# environment variables set by mlx.launch / mpirun for the backends MLX supports
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_IBV_DEVICES",
              "MLX_JACCL_COORDINATOR", "NCCL_HOST_IP")


class DistributedError(RuntimeError):
    """A distributed setup that cannot work; the message says why (one line)."""


# --------------------------------------------------------------------------- group + watchdog


def timeout_seconds(value: Optional[float] = None) -> float:
    """The watchdog limit: ``value`` (a CLI flag), else $CHEEMS_DIST_TIMEOUT, else 120 s."""
    if value is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw == "":
            return DEFAULT_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise DistributedError(f"the distributed timeout must be >= 0 seconds (0 disables it), got {value:g}")
    return float(value)


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch, mpirun)."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


_MONITOR = r"""
import os, select, signal, sys, time
parent, label = int(sys.argv[1]), sys.argv[2]
fd = sys.stdin.fileno()
deadline, limit, what, buf = None, 0.0, "", b""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], wait)
    if ready:
        chunk = os.read(fd, 65536)
        if not chunk:  # the rank exited (or closed the watchdog)
            sys.exit(0)
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            cmd, _, rest = line.decode(errors="replace").partition(" ")
            if cmd == "label":
                label = rest
            elif cmd == "arm":
                secs, _, what = rest.partition(" ")
                limit = float(secs)
                deadline = time.monotonic() + limit
            elif cmd == "beat" and deadline is not None:
                deadline = time.monotonic() + limit
            elif cmd == "disarm":
                deadline = None
        continue
    if deadline is not None and time.monotonic() >= deadline:
        sys.stderr.write(
            f"error: {label}: no progress for {limit:g} s while {what}: another rank is not "
            "running, hung or unreachable; stopping this rank (raise the limit with "
            "--dist-timeout or CHEEMS_DIST_TIMEOUT)\n")
        sys.stderr.flush()
        try:
            os.kill(parent, signal.SIGTERM)
            for _ in range(30):
                time.sleep(0.1)
                os.kill(parent, 0)
            os.kill(parent, signal.SIGKILL)
        except OSError:
            pass
        sys.exit(0)
"""


class Watchdog:
    """Terminates this rank with a clear message when it makes no progress for
    ``timeout`` seconds while armed. A separate process (a few MB, no MLX): a rank blocked
    in ``mx.distributed.init`` holds the GIL, so a thread could not fire.

    ``arm(what)`` starts the clock, ``beat()`` restarts it (call it at every step: a token,
    a training step, a server loop), ``disarm()`` stops it. With ``timeout == 0`` or a
    single process it does nothing."""

    def __init__(self, timeout: float, label: str):
        self.timeout = timeout
        self.label = label
        self._what = None
        self._proc = None
        if timeout > 0:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _MONITOR, str(os.getpid()), label],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
            )

    def _send(self, msg: str):
        if self._proc is not None:
            try:
                self._proc.stdin.write(msg.encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                self._proc = None

    def set_label(self, label: str):
        self.label = label
        self._send(f"label {label}")

    def arm(self, what: str):
        self._what = what
        self._send(f"arm {self.timeout} {what}")

    def beat(self, *_):
        self._send("beat")

    def disarm(self):
        self._what = None
        self._send("disarm")

    @contextmanager
    def watch(self, what: str):
        """Armed for the block; then back to what was watched before (if anything)."""
        outer = self._what
        self.arm(what)
        try:
            yield self
        finally:
            if outer is None:
                self.disarm()
            else:
                self.arm(outer)

    def close(self):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            except Exception:
                pass
            self._proc = None


_watchdog = Watchdog(0, "")


def watchdog() -> Watchdog:
    """This process's watchdog (a no-op one until ``init`` starts a distributed run)."""
    return _watchdog


def label(group=None) -> str:
    group = group or mx.distributed.init()
    return f"rank {group.rank()} of {group.size()}"


def init(timeout: Optional[float] = None):
    """Join the distributed group when this process was launched as one of several ranks
    (``mlx.launch``, ``mpirun``), else the single-process group. Connecting and the first
    barrier are watched: a rank that cannot reach the others stops with a clear error
    after ``timeout`` seconds instead of waiting forever."""
    global _watchdog
    if not launched():
        return mx.distributed.init()
    limit = timeout_seconds(timeout)
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    if not isinstance(_watchdog, Watchdog) or _watchdog._proc is None:
        _watchdog = Watchdog(limit, f"rank {rank}")
    hostfile = os.environ.get("MLX_HOSTFILE")
    where = f" (MLX_HOSTFILE={hostfile})" if hostfile else ""
    with _watchdog.watch(f"connecting to the other ranks{where}"):
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise DistributedError(f"rank {rank}: cannot join the distributed group{where}: {e}") from None
        _watchdog.set_label(label(group))
        barrier(group, f"connecting to the other ranks{where}")
    if group.size() == 1:
        _watchdog.close()
    return group


def barrier(group=None, what: str = "waiting for the other ranks"):
    group = group or mx.distributed.init()
    if group.size() > 1:
        with _watchdog.watch(what):
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def finish(group=None):
    """Wait for the other ranks before exiting, so no rank leaves while a collective it
    takes part in is still running on another."""
    group = group or mx.distributed.init()
    if group.size() > 1:
        mx.synchronize()
        barrier(group, "waiting for the other ranks to finish")
    _watchdog.close()


def comm_error_message(e: BaseException, group=None) -> str:
    """One line for an exception raised by a collective in a distributed run."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        who = label(group)
    except Exception:
        who = "this rank"
    if "peer was lost" in msg or "closed" in msg or "send/recv" in msg:
        return (f"{who} lost the connection to another rank ({msg}): that rank stopped or "
                "crashed; see its output")
    return f"{who}: {msg}"



def run_cli(body, expected: tuple) -> int:
    """Run a CLI's ``body()``: its ``expected`` errors and a DistributedError become one
    ``error:`` line and exit 1, and so does a collective that failed because another rank
    stopped (only when launched; otherwise a RuntimeError is a bug and propagates)."""
    try:
        code = body()
        return 0 if code is None else code
    except expected + (DistributedError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not launched():
            raise
        print(f"error: {comm_error_message(e)}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- sharing data


def share_object(obj: Any, group=None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled, sent with all_sum as mlx-lm's server does)."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return obj
    with _watchdog.watch("exchanging data with the other ranks"):
        return _share_object(obj, group)


def _share_object(obj, group):
    if group.rank() == 0:
        data = mx.array(np.frombuffer(pickle.dumps(obj), dtype=np.uint8))
        size = mx.distributed.all_sum(mx.array(data.size, dtype=mx.int32), group=group, stream=mx.cpu)
        mx.eval(size)
        mx.eval(mx.distributed.all_sum(data, group=group, stream=mx.cpu))
        return obj
    size = mx.distributed.all_sum(mx.array(0, dtype=mx.int32), group=group, stream=mx.cpu).item()
    data = mx.distributed.all_sum(mx.zeros((size,), dtype=mx.uint8), group=group, stream=mx.cpu)
    mx.eval(data)
    return pickle.loads(np.array(data).tobytes())


def broadcast_arrays(items: Optional[List[Tuple[str, mx.array]]], group=None) -> List[Tuple[str, mx.array]]:
    """Rank 0's named arrays on every rank (the other ranks pass ``None`` or anything)."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return list(items)
    root = group.rank() == 0
    meta = share_object([(k, tuple(v.shape), str(v.dtype)) for k, v in items] if root else None, group)
    given = dict(items) if root else {}
    out = []
    for k, shape, dtype in meta:
        x = given[k] if root else mx.zeros(shape, dtype=getattr(mx, dtype.rsplit(".", 1)[-1]))
        out.append((k, mx.distributed.all_sum(x, group=group, stream=mx.cpu)))
    with _watchdog.watch("receiving rank 0's arrays"):
        mx.eval([v for _, v in out])
    return out


def broadcast_parameters(module: nn.Module, group=None, trainable_only: bool = False):
    """Make every rank's parameters (or trainable parameters) equal to rank 0's."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return
    params = module.trainable_parameters() if trainable_only else module.parameters()
    module.load_weights(broadcast_arrays(tree_flatten(params), group), strict=False)


# --------------------------------------------------------------------------- sharded modules


def _ranges(total: int, n: int, r: int) -> Tuple[int, int]:
    """Contiguous split of ``total`` rows: rank r owns [start, stop)."""
    return (r * total) // n, ((r + 1) * total) // n


def _slice_rows(module: nn.Module, start: int, stop: int, pad_to: Optional[int] = None):
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
    _slice_rows(module, start, min(start + rows, vocab_size), pad_to=rows)
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


def _splits_inputs(m, N) -> bool:
    if _is_quantized(m):
        return (_linear_in_dims(m) // m.group_size) % N == 0
    return m.weight.shape[-1] % N == 0


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


def _is_quantized(m) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def _linear_in_dims(m) -> int:
    return m.weight.shape[-1] * 32 // m.bits if _is_quantized(m) else m.weight.shape[-1]


def shard_problems(model, N: int) -> List[str]:
    """What prevents splitting ``model`` over N ranks (empty when it can be split)."""
    args = model.args
    problems = []

    def need(cond, msg):
        if not cond and msg not in problems:
            problems.append(msg)

    def split_in(path, m):  # a sharded-to-all linear: input columns split (a float one is
        if _is_quantized(m):  # covered by the head / width checks; a quantized one by groups)
            groups = _linear_in_dims(m) // m.group_size
            need(groups % N == 0, f"{path} has {groups} quantization groups per row (group size "
                 f"{m.group_size}), not divisible by {N}: quantize with a smaller group size")

    for layer in model.layers:
        for path, m in layer.named_modules():
            if type(m).__name__.startswith(("LoRA", "DoRA")):
                need(False, "the model has LoRA adapters: fuse them first (python -m cheems_mlx.fuse)")
        if layer.layer_type == "ssd":
            need(args.num_attention_heads % N == 0,
                 f"num_attention_heads {args.num_attention_heads} (SSD heads) is not divisible by {N}")
            split_in("ssd.out_proj", layer.ssd.out_proj)
        else:
            attn = layer.attn
            need(attn.num_heads % N == 0, f"num_attention_heads {attn.num_heads} is not divisible by {N}")
            need(attn.num_kv_heads % N == 0, f"num_key_value_heads {attn.num_kv_heads} is not divisible by {N}")
            split_in("attn.o_proj", attn.o_proj)
        ff = layer.feed_forward
        need(ff.gate_proj.weight.shape[0] % N == 0, f"intermediate_size {args.intermediate_size} is not divisible by {N}")
        split_in("feed_forward.down_proj", ff.down_proj)
        if isinstance(ff, CDMoE):
            need(ff.num_experts >= N, f"num_experts {ff.num_experts} is smaller than {N}")
    return problems


def shard_model(model, group=None):
    """Split ``model`` (a ``cheems_mlx.Model``) over the ranks of ``group`` in place; see
    the module docstring for what goes where. Raises ``DistributedError`` (one line) when
    the model cannot be split over this many ranks."""
    group = group or mx.distributed.init()
    N, r = group.size(), group.rank()
    if N == 1:
        return model
    problems = shard_problems(model, N)
    if problems:
        raise DistributedError(f"cannot split this model over {N} ranks: " + "; ".join(problems))

    for layer in model.layers:
        if layer.layer_type == "ssd":
            ssd = layer.ssd
            for name in ("c_proj", "b_proj", "x_proj", "dt_proj"):
                setattr(ssd, name, shard_linear(getattr(ssd, name), "all-to-sharded", group=group))
            ssd.out_proj = shard_linear(ssd.out_proj, "sharded-to-all", group=group)
            ssd.num_heads //= N
            h0 = r * ssd.num_heads
            ssd.A = mx.contiguous(ssd.A[h0 : h0 + ssd.num_heads])
        else:
            attn = layer.attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            quantized = _is_quantized(attn.dt_proj)
            if _splits_inputs(attn.dt_proj, N):  # partial products of the local values, summed
                dt = shard_linear(attn.dt_proj, "sharded-to-all", group=group)
                dt.__class__ = QuantizedShardedToLocalLinear if quantized else ShardedToLocalLinear
            else:  # quantization groups straddle ranks: gather the values (Hkv*P per token)
                dt = attn.dt_proj
                dt.__class__ = GatheredInputsQuantizedLinear if quantized else GatheredInputsLinear
                dt.group = group
            attn.num_heads //= N
            attn.num_kv_heads //= N
            attn.num_mask_heads //= N
            dt.out_start = r * attn.num_mask_heads
            dt.out_stop = dt.out_start + attn.num_mask_heads
            attn.dt_proj = dt
            attn.A = mx.contiguous(attn.A[dt.out_start : dt.out_stop])

        ff = layer.feed_forward
        if isinstance(ff, CDMoE):
            # one all_sum for the shared MLP and the experts: split the MLP in place
            shard_inplace(ff.gate_proj, "all-to-sharded", group=group)
            shard_inplace(ff.up_proj, "all-to-sharded", group=group)
            shard_inplace(ff.down_proj, "sharded-to-all", group=group)
            if "bias" in ff.down_proj and r != 0:  # added once, by rank 0's partial
                ff.down_proj.bias = mx.zeros_like(ff.down_proj.bias)
            start, stop = _ranges(ff.num_experts, N, r)
            _slice_rows(ff.down_embed, start, stop)
            _slice_rows(ff.up_embed, start, stop)
            for table in (ff.down_embed, ff.up_embed):
                if hasattr(table, "num_embeddings"):
                    table.num_embeddings = stop - start
            ff.__class__ = ShardedCDMoE
            ff.group, ff.expert_start, ff.expert_rows = group, start, stop - start
        elif isinstance(ff, MLP):
            ff.gate_proj = shard_linear(ff.gate_proj, "all-to-sharded", group=group)
            ff.up_proj = shard_linear(ff.up_proj, "all-to-sharded", group=group)
            ff.down_proj = shard_linear(ff.down_proj, "sharded-to-all", group=group)

    V = model.args.vocab_size
    shard_vocab(model.model.word_embed, V, group)
    if not model.args.tie_word_embeddings:
        shard_vocab(model.lm_head, V, group)
    model.shard_group = group
    return model


# --------------------------------------------------------------------------- loading


def parameter_bytes(model) -> int:
    """Bytes of the arrays this rank holds (from the shapes: no evaluation)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def sharded_load(
    path_or_repo=None,
    group=None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    return_config: bool = False,
    revision: Optional[str] = None,
):
    """``cheems_mlx.load`` for a tensor-parallel run: the weights are loaded lazily, the
    model is split with ``Model.shard``, then only this rank's slices are materialised,
    one layer at a time (the peak is this rank's share plus one layer's full weights)."""
    from .loading import LoadError, is_native, load_folder_tokenizer, load_model_only, read_config, resolve_model_path

    group = group or mx.distributed.init()
    path = resolve_model_path(path_or_repo, revision)
    if not is_native(read_config(path)):
        raise LoadError(
            f"{path} is not a converted model folder; sharded loading reads converted weights "
            "lazily (convert it first: python -m cheems_mlx.convert)"
        )
    model, config = load_model_only(path, lazy=True)
    model.shard(group)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    barrier(group, "waiting for the other ranks to load their shards")
    tokenizer = load_folder_tokenizer(path, tokenizer_config, config.get("eos_token_id"))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


# --------------------------------------------------------------------------- planning CLI


class PlanGroup:
    """A stand-in group (size and rank only) to compute every rank's shapes in one process."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def plan(build, world: int) -> Dict[str, Any]:
    """Per-rank parameter bytes when the model ``build()`` returns (lazily: nothing is read
    or computed) is split over ``world`` ranks."""
    whole = parameter_bytes(build())
    ranks = []
    for r in range(world):
        model = build()
        shard_model(model, PlanGroup(world, r))
        ranks.append(parameter_bytes(model))
    return {"world": world, "whole_model_bytes": whole, "rank_bytes": ranks}


def _config_builder(config: Dict[str, Any], dtype: str):
    from .model import Model, ModelArgs

    def build():
        model = Model(ModelArgs.from_dict(dict(config)))
        keep = model.cast_predicate  # as cheems_mlx.io.cast_model, without evaluating anything
        target = getattr(mx, dtype)
        model.update(tree_unflatten([
            (k, v.astype(target if keep(k) else mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
            for k, v in tree_flatten(model.parameters())
        ]))
        q = config.get("quantization")
        if q:  # per-layer entries as mlx-lm's loader reads them, else what cheems_mlx.quantize does
            def predicate(path, m):
                if path in q:
                    return q[path]
                if not hasattr(m, "to_quantized") or m.weight.shape[-1] % q["group_size"]:
                    return False
                return model.quant_predicate(path, m)

            nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                        class_predicate=predicate)
        return model

    return build


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python -m cheems_mlx.distributed",
        description="Parameter memory per rank when a model is split over N ranks (from shapes only).",
    )
    p.add_argument("--model", type=str, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--config", type=str, default=None,
                   help="a config.json (ModelArgs fields, optional 'quantization') instead of --model")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16",
                   help="weight dtype with --config (default float16)")
    p.add_argument("--world", type=int, nargs="+", default=[2], help="rank counts to plan for")
    a = p.parse_args(argv)
    from .loading import LoadError, load_model_only, resolve_model_path

    try:
        if a.config:
            build = _config_builder(json.loads(Path(a.config).read_text()), a.dtype)
        else:
            path = resolve_model_path(a.model)
            build = lambda: load_model_only(path, lazy=True)[0]  # noqa: E731
        for n in a.world:
            if n < 1:
                raise DistributedError(f"--world must be >= 1 (got {n})")
            res = plan(build, n)
            ranks = ", ".join(f"{b / 2**20:.2f}" for b in res["rank_bytes"])
            print(f"{n} rank(s): whole model {res['whole_model_bytes'] / 2**20:.2f} MiB; "
                  f"per rank [{ranks}] MiB ({max(res['rank_bytes']) / res['whole_model_bytes']:.1%} max)")
    except (DistributedError, LoadError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
