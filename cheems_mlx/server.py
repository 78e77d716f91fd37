"""``python -m cheems_mlx.server``: mlx-lm's OpenAI-compatible HTTP server on our models.

Everything (routes, streaming, batching, prompt-cache reuse, ``--draft-model`` speculative
decoding) is mlx-lm's; the changes are the loader -- models (draft models too) load through
``cheems_mlx.load`` (our classes, no ``--trust-remote-code``, the embedded default model when
``--model`` is omitted) -- and ``RollbackPromptCache``: our SSD caches roll back only over
their last tokens (``ssd.SSDCache``), so a longer cached prompt is reused by trimming it only
when the trim fits; otherwise the nearest shorter prompt (or none) is used. (mlx-lm drops the
shorter prompts of a trimmable cache when a longer one is stored, so a prompt that branches
off more than ``SSDCache.window`` tokens before the end of a stored one is recomputed.) This
holds on both paths: the unbatched one (a draft model, prompt lookup, a seed, --kv-bits) and
the batched one, which stores what ``BatchGenerator.extract_cache`` returns -- SSDCache's
``merge`` / ``filter`` / ``extend`` carry each row's kept states as requests join and leave the
batch, and its ``extract`` returns a row's SSDCache with that row's states and token count, so
a conversation stored there is reused for a prompt that edits its last tokens (or a
regenerated answer) by trimming it. Rows keep states only from the positions the batch still
keeps (its last ``SSDCache.window`` + 1), and a long prefill keeps none. A cache is
stored under exactly the tokens it holds: after speculative decoding it is one token short of
the conversation (or a few drafted tokens past a stop), which mlx-lm would store under the
whole conversation.

``--prompt-lookup N`` (ours; ``--prompt-lookup-ngram G``, default 3) serves requests with
prompt-lookup decoding (``cheems_mlx.speculative``): up to N proposed tokens, the ones that
followed the latest earlier occurrence of the last G tokens in the conversation (the reused
prefix included) and the answer so far, verified in one call -- lossless, as in
``cheems_mlx.generate``. Such a server serves requests one by one, as mlx-lm serves draft-model
requests (mlx-lm's ``BatchGenerator`` has no proposals); a request with a logits processor
(repetition / presence / frequency penalty, logit bias) decodes plainly. N is 1..15 (the SSD
caches roll back over calls of at most 16 tokens); it cannot be combined with
``--draft-model`` or ``--kv-bits``.

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
from typing import List, Optional

from mlx_lm.models.cache import CacheList, LRUPromptCache

from .ssd import RollbackError, SSDCache


def _cached_tokens(c) -> Optional[int]:
    """How many tokens a single-sequence cache holds, or None when it does not say."""
    if isinstance(c, SSDCache):
        return 0 if c[1] is None else int(c[1].reshape(-1)[0].item()) if c[1].size == 1 else None
    if isinstance(c, CacheList):
        counts = [_cached_tokens(x) for x in c.caches]
        return None if None in counts or len(set(counts)) != 1 else counts[0]
    offset = getattr(c, "offset", None)
    return offset if isinstance(offset, int) else None


class RollbackPromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache for caches that roll back a bounded number of tokens.

    ``insert_cache`` stores a cache under exactly the tokens it holds: speculative decoding
    (mlx-lm's draft model, our prompt lookup) ends with the caches one token short of the
    tokens the server saw (the last token was sampled, not fed) or a few drafted tokens past a
    stop; the caches are trimmed to the shortest of them and stored under that many tokens
    (nothing is stored when a trim does not fit). ``last_fetched`` is the token list of the
    latest fetch (the prompt-lookup proposals search the reused prefix too)."""

    last_fetched: Optional[List[int]] = None

    def fetch_nearest_cache(self, model, tokens):
        self.last_fetched = list(tokens)
        try:
            return super().fetch_nearest_cache(model, tokens)
        except RollbackError:  # the longer cached prompt is too far ahead: use a shorter one
            result = self._trie.search(model, tokens)
            if result.shorter is not None:
                entry = self._trie.get(result.model, result.shorter)
                return copy.deepcopy(entry.prompt_cache), tokens[len(result.shorter):]
            return None, tokens

    def insert_cache(self, model, tokens, prompt_cache, **kwargs):
        counts = [_cached_tokens(c) for c in prompt_cache]
        if None not in counts and counts:
            n = min(counts + [len(tokens)])
            try:
                for c, k in zip(prompt_cache, counts):
                    if k > n:
                        c.trim(k - n)
            except RollbackError:
                return  # the excess reaches into a long call: this cache cannot be stored
            tokens = tokens[:n]
            if not tokens:
                return
        super().insert_cache(model, tokens, prompt_cache, **kwargs)


DTYPE = "auto"  # --dtype (loading.compute_dtype): float32 on the CPU backend, as stored on Metal
PROMPT_LOOKUP = None  # --prompt-lookup N [--prompt-lookup-ngram G]: dict(num_draft_tokens=N, ngram_size=G)


def _stream_generate(model, tokenizer, prompt, max_tokens=256, draft_model=None, *, prompt_cache=None, **kwargs):
    """mlx-lm's ``stream_generate`` as the server calls it; with --prompt-lookup, prompt-lookup
    decoding (``speculative.stream_prompt_lookup``, the same responses) for the requests it
    serves as plain decoding would: no draft model, no logits processors (repetition / presence
    penalties, logit bias: those requests decode plainly), no input embeddings."""
    from mlx_lm.generate import stream_generate

    if (PROMPT_LOOKUP is None or draft_model is not None or kwargs.get("logits_processors")
            or kwargs.get("input_embeddings") is not None or prompt_cache is None):
        return stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, draft_model=draft_model,
                               prompt_cache=prompt_cache, **kwargs)
    from .speculative import stream_prompt_lookup

    prompt = [int(t) for t in prompt]
    # the prefix the prompt cache already holds (the server feeds only the rest)
    fetched = getattr(_PROMPT_CACHE, "last_fetched", None) or []
    context = fetched[: len(fetched) - len(prompt)] if fetched[len(fetched) - len(prompt):] == prompt else []
    keep = ("sampler", "prefill_step_size", "prompt_progress_callback", "stream")
    return stream_prompt_lookup(model, tokenizer, prompt, max_tokens, prompt_cache=prompt_cache, context=context,
                                **PROMPT_LOOKUP, **{k: v for k, v in kwargs.items() if k in keep and v is not None})


_PROMPT_CACHE = None  # the server's RollbackPromptCache


def _make_prompt_cache(*args, **kwargs):
    global _PROMPT_CACHE
    _PROMPT_CACHE = RollbackPromptCache(*args, **kwargs)
    return _PROMPT_CACHE


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


def _int_flag(name, value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} takes an integer (got {value!r})") from None


def _set_prompt_lookup(lookup, ngram, argv):
    """--prompt-lookup N / --prompt-lookup-ngram G, checked as generate checks them."""
    global PROMPT_LOOKUP
    from .speculative import check_num_draft_tokens

    if lookup is None:
        if ngram is not None:
            raise ValueError("--prompt-lookup-ngram needs --prompt-lookup")
        return
    n = _int_flag("--prompt-lookup", lookup)
    check_num_draft_tokens(n, "--prompt-lookup")
    g = 3 if ngram is None else _int_flag("--prompt-lookup-ngram", ngram)
    if g < 1:
        raise ValueError(f"--prompt-lookup-ngram must be >= 1 (got {g})")
    for flag in ("--draft-model", "--kv-bits"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ValueError(f"--prompt-lookup cannot be combined with {flag}")
    PROMPT_LOOKUP = dict(num_draft_tokens=n, ngram_size=g)


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
    argv, lookup = _pop_flag(argv, "--prompt-lookup")
    argv, ngram = _pop_flag(argv, "--prompt-lookup-ngram")
    try:
        _set_prompt_lookup(lookup, ngram, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
    server.LRUPromptCache = _make_prompt_cache
    if PROMPT_LOOKUP is not None:
        # served one by one, as mlx-lm serves draft-model requests (BatchGenerator has no lookup)
        server.ResponseGenerator._is_batchable = lambda self, args: False
        server.stream_generate = _stream_generate
    server.sharded_load = _sharded_load
    if group.size() > 1:
        _patch_for_distributed(server, distributed)
    server.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
