"""``python -m cheems_mlx.server``: mlx-lm's OpenAI-compatible HTTP server on our models.

Everything (routes, streaming, batching, prompt-cache reuse, ``--draft-model`` speculative
decoding) is mlx-lm's; the changes are the loader -- models (draft models too) load through
``cheems_mlx.load`` (our classes, no ``--trust-remote-code``, the embedded default model when
``--model`` is omitted) -- and ``RollbackPromptCache``: our SSD caches roll back only over
their last tokens (``ssd.SSDCache``), so a longer cached prompt is reused by trimming it only
when the trim fits; otherwise the nearest shorter prompt (or none) is used. (mlx-lm drops the
shorter prompts of a trimmable cache when a longer one is stored, so a prompt that branches
off more than ``SSDCache.window`` tokens before the end of a stored one is recomputed. This
applies to the unbatched path -- a draft model, a seed, --kv-bits; the batched path stores
plain ``ArraysCache`` copies, which mlx-lm reuses by exact prefix only.)

Under ``mlx.launch`` mlx-lm's server runs one generation loop per rank in lockstep and
rank 0 answers HTTP; here the model is then loaded shard by shard
(``cheems_mlx.distributed.sharded_load``), every loop iteration is reported to the
watchdog, and a rank whose generation loop fails (another rank died) exits with a
one-line error instead of serving errors forever. ``--dist-timeout SECONDS`` (or
``CHEEMS_DIST_TIMEOUT``) bounds how long a rank waits for the others. ``--dtype`` (ours too)
sets what the weights compute in, as in ``cheems_mlx.generate``.
"""

import copy
import os
import sys

from mlx_lm.models.cache import LRUPromptCache

from .ssd import RollbackError


class RollbackPromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache for caches that roll back a bounded number of tokens."""

    def fetch_nearest_cache(self, model, tokens):
        try:
            return super().fetch_nearest_cache(model, tokens)
        except RollbackError:  # the longer cached prompt is too far ahead: use a shorter one
            result = self._trie.search(model, tokens)
            if result.shorter is not None:
                entry = self._trie.get(result.model, result.shorter)
                return copy.deepcopy(entry.prompt_cache), tokens[len(result.shorter):]
            return None, tokens


DTYPE = "auto"  # --dtype (loading.compute_dtype): float32 on the CPU backend, as stored on Metal


def _load(model_path, adapter_path=None, tokenizer_config=None, return_config=False, **_):
    from .loading import load

    if model_path in (None, "default_model"):
        model_path = None
    return load(model_path, tokenizer_config=tokenizer_config, adapter_path=adapter_path, return_config=return_config,
                dtype=DTYPE)


def _sharded_load(repo, pipeline_group=None, tensor_group=None, return_config=False, tokenizer_config=None, **_):
    from .distributed import DistributedError, sharded_load

    if pipeline_group is not None:
        raise DistributedError("pipeline parallelism (--pipeline) is not supported for Cheems models; "
                               "run without it (the model is split by heads, experts and vocabulary)")
    if repo in (None, "default_model"):
        repo = None
    return sharded_load(repo, tensor_group, tokenizer_config=tokenizer_config, return_config=return_config,
                        dtype=DTYPE)


def _pop_flag(argv, name):
    """Remove ``name VALUE`` / ``name=VALUE`` from argv (mlx-lm's parser does not know it)."""
    value = None
    out = []
    it = iter(argv)
    for arg in it:
        if arg == name:
            value = next(it, None)
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return out, value


def _patch_for_distributed(server, distributed):
    """Report each generation-loop iteration to the watchdog; stop the process when the
    loop dies in a distributed run (a lost rank), naming the cause in one line."""
    watchdog = distributed.watchdog()
    next_request = server.ResponseGenerator._next_request
    generate = server.ResponseGenerator._generate

    def _next_request(self, timeout=None):
        watchdog.beat()
        return next_request(self, timeout)

    def _generate(self):
        watchdog.arm("serving (each loop iteration syncs the ranks)")
        try:
            generate(self)
        except BaseException as e:
            msg = str(e) if isinstance(e, distributed.DistributedError) else distributed.comm_error_message(e)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            os._exit(1)
        watchdog.disarm()

    server.ResponseGenerator._next_request = _next_request
    server.ResponseGenerator._generate = _generate


def main(argv=None):
    import mlx_lm.server as server

    from . import distributed
    from .loading import LoadError, resolve_model_path

    argv = list(sys.argv[1:] if argv is None else argv)
    global DTYPE
    argv, timeout = _pop_flag(argv, "--dist-timeout")
    argv, dtype = _pop_flag(argv, "--dtype")
    DTYPE = dtype or DTYPE
    sys.argv = [sys.argv[0]] + argv
    if "--model" not in sys.argv:
        try:  # fail now, not at the first request
            resolve_model_path(None)
        except LoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        group = distributed.init(None if timeout is None else float(timeout))
    except (distributed.DistributedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server.load = _load
    server.LRUPromptCache = RollbackPromptCache
    server.sharded_load = _sharded_load
    if group.size() > 1:
        _patch_for_distributed(server, distributed)
    server.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
