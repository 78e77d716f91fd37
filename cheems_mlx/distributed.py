"""Running over several machines with ``mx.distributed`` (launched by ``mlx.launch``): the
runtime (``init``, ``barrier``, ``finish``, the ``Watchdog``, ``share_object`` /
``broadcast_arrays`` / ``broadcast_parameters``) and shard-by-shard loading
(``sharded_load``, the per-rank memory ``plan`` and its CLI ``python -m cheems_mlx.distributed``).

Two kinds of parallelism, both on MLX's own distributed layer:

**Tensor parallel (sharded generation / serving)** -- ``Model.shard(group)`` splits every
layer over the N ranks (each layer module owns its split; the scheme is in
``cheems_mlx.sharding``); ``sharded_load`` below loads a converted folder that way, shard by
shard, and ``plan`` / ``python -m cheems_mlx.distributed`` print each rank's share.

**Data parallel (LoRA, pretraining)** -- every rank holds the whole model, takes 1/N of
each batch, and the gradients are averaged (``mlx.nn.average_gradients``); only rank 0
writes files. See ``cheems_mlx/lora.py`` and ``cheems_mlx/train.py`` (their shared
checkpoint resume: ``cheems_mlx/training.py``).

**Failure handling** -- a rank that exits closes its sockets and the ring backend makes
the others' next collective raise ("connection to a peer was lost"); the CLIs
(``cheems_mlx.cli.run_cli``) turn that into a one-line error and exit 1. A rank that never connects, hangs or becomes
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
from mlx.utils import tree_flatten, tree_unflatten

from .sharding import DistributedError

DEFAULT_TIMEOUT = 120.0
TIMEOUT_ENV = "CHEEMS_DIST_TIMEOUT"
# environment variables set by mlx.launch / mpirun for the backends MLX supports
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_IBV_DEVICES",
              "MLX_JACCL_COORDINATOR", "NCCL_HOST_IP")


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
    dtype: Optional[str] = None,
):
    """``cheems_mlx.load`` for a tensor-parallel run: the weights are loaded lazily, the
    model is split with ``Model.shard``, then only this rank's slices are materialised,
    one layer at a time (the peak is this rank's share plus one layer's full weights).
    ``dtype``: as ``cheems_mlx.load``'s (``loading.compute_dtype``)."""
    from .loading import (LoadError, compute_dtype, is_native, limit_vocabulary, load_folder_tokenizer,
                          load_model_only, read_config, resolve_model_path)

    group = group or mx.distributed.init()
    path = resolve_model_path(path_or_repo, revision)
    if not is_native(read_config(path)):
        raise LoadError(
            f"{path} is not a converted model folder; sharded loading reads converted weights "
            "lazily (convert it first: python -m cheems_mlx.convert)"
        )
    model, config = load_model_only(path, lazy=True)
    model.shard(group)
    compute_dtype(model, dtype or "auto")
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    barrier(group, "waiting for the other ranks to load their shards")
    tokenizer = load_folder_tokenizer(path, tokenizer_config, config.get("eos_token_id"))
    limit_vocabulary(model, tokenizer)
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
        model.shard(PlanGroup(world, r))
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
