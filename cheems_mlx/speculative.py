"""Speculative decoding on rollback caches: prompt-lookup decoding and the draft-model checks.

Draft-model speculative decoding is mlx-lm's own (``stream_generate(..., draft_model=...)``);
it works on our models because their caches can be trimmed over the last calls
(``ssd.SSDCache``; attention caches are mlx-lm's KV caches). This module holds what mlx-lm
lacks:

- ``prompt_lookup_generate_step``: prompt-lookup decoding without a draft model. The proposal
  is the tokens that followed the latest earlier occurrence of the current n-gram (the last
  ``ngram_size`` tokens, then shorter ones down to ``MIN_NGRAM``) in prompt + output; the model
  verifies the current
  token and the proposal in one forward, the longest proposed prefix equal to the model's own
  choices is kept (each position's token is sampled from the model's distribution given the
  kept prefix, so the output is exactly plain decoding's: greedy's tokens at temperature 0, the
  same distribution above), and the caches are trimmed back over the rejected tokens.
- ``stream_prompt_lookup``: the same loop as ``mlx_lm.generate.stream_generate``, yielding its
  ``GenerationResponse`` objects, so a CLI consumes either one the same way.
- ``check_num_draft_tokens`` / ``check_draft``: the limits of both methods.
"""

import time
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generation_stream, wired_limit
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .ssd import SSDCache

# a verification call sees the current token and the drafted ones; the SSD caches roll back
# only over calls of at most SSDCache.window tokens
MAX_DRAFT_TOKENS = SSDCache.window - 1


def check_num_draft_tokens(n: int, flag: str = "--num-draft-tokens"):
    if not 1 <= n <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"{flag} must be between 1 and {MAX_DRAFT_TOKENS} (got {n}): the SSD caches roll back "
            f"over calls of at most {SSDCache.window} tokens"
        )


def check_draft(tokenizer, config: dict, draft_tokenizer, draft_config: dict):
    """A draft model must share the target's tokenizer (the token ids are compared) and
    vocabulary size (its proposals are fed to the target's embedding)."""
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the draft model's tokenizer ({len(draft_tokenizer.get_vocab())} tokens) is not the "
            f"model's ({len(tokenizer.get_vocab())} tokens): a draft model must use the same tokenizer"
        )
    if draft_config.get("vocab_size") != config.get("vocab_size"):
        raise ValueError(
            f"the draft model's vocabulary has {draft_config.get('vocab_size')} entries, the model's "
            f"{config.get('vocab_size')}: a draft model must have the same vocabulary"
        )


# the shortest n-gram whose match is proposed: single-token matches are mostly wrong in free
# text, and on the CPU a verification of 5 tokens costs about two plain steps, so proposing them
# slowed free generation down (measured with `bench speculative`, the default model, N=4:
# free text 1.00x of plain with 1-token matches, 1.10x from 2, copy-heavy 1.10x -> 1.34x)
MIN_NGRAM = 2


def propose(tokens: List[int], ngram_size: int, k: int, min_ngram: int = 1) -> List[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last ``n`` tokens
    of ``tokens``, for n = ngram_size .. min_ngram (the longest n with a match); [] when none."""
    T = len(tokens)
    for n in range(min(ngram_size, T - 1), max(min_ngram, 1) - 1, -1):
        gram = tokens[T - n :]
        for start in range(T - n - 1, -1, -1):  # latest first, never the n-gram itself
            if tokens[start : start + n] == gram:
                return tokens[start + n : start + n + k]
    return []


def prompt_lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    num_draft_tokens: int = 3,
    ngram_size: int = 3,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    context: Optional[List[int]] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stream=generation_stream,
) -> Iterator[Tuple[int, mx.array, bool]]:
    """Yields ``(token, logprobs (V,), from_draft)`` like mlx-lm's ``speculative_generate_step``;
    ``from_draft`` is True for a token that was proposed by the lookup and accepted.

    ``context``: the tokens already in ``prompt_cache`` before ``prompt`` (a server's reused
    prefix); proposals are looked up in them too, nothing is computed for them.
    ``prompt_progress_callback(processed, total)`` is called as the prompt is prefilled, as in
    mlx-lm's ``generate_step``; ``stream`` is the stream the model runs on."""
    check_num_draft_tokens(num_draft_tokens, "num_draft_tokens")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1 (got {ngram_size})")
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    if not can_trim_prompt_cache(cache):
        kinds = {type(c).__name__ for c in cache if not c.is_trimmable()}
        raise ValueError(f"prompt-lookup decoding needs trimmable caches (got {kinds})")

    prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, mx.array) else prompt)]
    if not prompt:
        raise ValueError("prompt-lookup decoding needs at least one prompt token")
    tokens = [int(t) for t in (context or [])] + prompt
    total = len(prompt)
    progress = prompt_progress_callback or (lambda processed, total: None)
    with mx.stream(stream):
        y = mx.array(prompt, mx.uint32)
        while y.size > 1:  # prefill all but the last prompt token
            n = min(prefill_step_size, y.size - 1)
            model(y[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            y = y[n:]
            progress(total - y.size, total)
        progress(total, total)

        ntoks = 0
        while True:
            # the last token is not in the cache yet: verify it and the proposal in one call
            draft = propose(tokens, ngram_size, min(num_draft_tokens, max_tokens - ntoks - 1),
                            min(MIN_NGRAM, ngram_size))
            logits = model(mx.array(tokens[-1:] + draft, mx.uint32)[None], cache=cache)[0]  # (1+k, V)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = sampler(logprobs)  # (1+k,): the model's own token after each input
            mx.eval(sampled, logprobs)
            sampled = sampled.tolist()
            accepted = 0
            while accepted < len(draft) and sampled[accepted] == draft[accepted]:
                accepted += 1
            rejected = len(draft) - accepted
            # forget the rejected proposals before yielding (a caller may stop at any token)
            if rejected and trim_prompt_cache(cache, rejected) != rejected:
                raise RuntimeError(f"the caches could not be rolled back {rejected} tokens")
            for i in range(accepted + 1):
                tokens.append(sampled[i])
                ntoks += 1
                yield sampled[i], logprobs[i], i < accepted
                if ntoks == max_tokens:
                    return


def stream_prompt_lookup(
    model, tokenizer, prompt, max_tokens: int = 256, **kwargs
) -> Iterator[GenerationResponse]:
    """``stream_generate`` with prompt-lookup decoding (kwargs: prompt_lookup_generate_step's)."""
    detokenizer = tokenizer.detokenizer
    prompt = mx.array(prompt)
    n, token, logprobs, from_draft, prompt_tps = -1, None, None, None, 0.0

    def response(finish_reason):
        return GenerationResponse(
            text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=from_draft,
            prompt_tokens=prompt.size, prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason,
        )

    with wired_limit(model, [kwargs.get("stream", generation_stream)]):
        tic = time.perf_counter()
        steps = prompt_lookup_generate_step(prompt, model, max_tokens=max_tokens, **kwargs)
        for n, (token, logprobs, from_draft) in enumerate(steps):
            if n == 0:
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield response(None)
        detokenizer.finalize()
        yield response("stop" if token in tokenizer.eos_token_ids else "length")
