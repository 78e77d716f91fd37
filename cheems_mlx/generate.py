"""``python -m cheems_mlx.generate``: text generation with mlx-lm's flags and machinery.

Sampling, streaming detokenization, chat templates, prompt caches and KV-cache
quantization and draft-model speculative decoding are mlx-lm's (``stream_generate``,
``make_sampler``); prompt-lookup decoding is ``cheems_mlx.speculative``'s. This file adds the
model loading (no ``--trust-remote-code`` needed, the embedded default model when
``--model`` is omitted), ``--max-kv-size`` for our hybrid caches, and input checks
that fail with one clear line instead of a traceback.
"""

import argparse
import json
import sys
import time

import mlx.core as mx

from . import blas, distributed, numerics
from .cli import add_dist_timeout, run_cli

DEFAULT_PROMPT = "In the beginning"


def build_parser() -> argparse.ArgumentParser:
    from .loading import COMPUTE_DTYPES

    p = argparse.ArgumentParser(prog="python -m cheems_mlx.generate", description="Generate text with a Cheems / Doge model.")
    p.add_argument("--model", type=str, default=None, help="converted model folder or Hub repo id (default: the embedded model)")
    p.add_argument("--adapter-path", type=str, default=None, help="LoRA adapter folder")
    p.add_argument("--prompt", "-p", type=str, default=DEFAULT_PROMPT, help="prompt text, '-' reads stdin")
    p.add_argument("--system-prompt", type=str, default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--chat-template-config", type=str, default=None, help="JSON of extra chat template arguments")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-tokens-to-keep", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None, help="bound the attention caches (rotating)")
    p.add_argument("--prompt-cache-file", type=str, default=None, help="a cache saved by mlx_lm.cache_prompt")
    p.add_argument("--kv-bits", type=int, default=None)
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--quantized-kv-start", type=int, default=5000)
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--draft-model", type=str, default=None,
                   help="a smaller model with the same tokenizer for speculative decoding (mlx-lm's)")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="tokens the draft model proposes per step (default 3)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="prompt-lookup decoding: propose the N tokens that followed the latest earlier "
                        "occurrence of the current n-gram in prompt + output (no draft model)")
    p.add_argument("--prompt-lookup-ngram", type=int, default=3, help="n-gram size for --prompt-lookup")
    p.add_argument("--extra-eos-token", type=str, nargs="+", default=())
    p.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="what the weights compute in (default auto: float32 on the CPU backend for "
                        "half-precision weights, the stored dtype on Metal; a float16 model that overflows "
                        "float16 is computed in a wider dtype, with a note; 'stored' keeps the stored one)")
    p.add_argument("--verbose", action="store_true",
                   help="print prompt / generation speed, peak memory, the BLAS and the compute dtype")
    add_dist_timeout(p)
    return p


class UsageError(ValueError):
    pass


def check_args(a):
    if a.temp < 0:
        raise UsageError(f"--temp must be >= 0 (got {a.temp})")
    if not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {a.top_p})")
    if not 0 <= a.min_p <= 1:
        raise UsageError(f"--min-p must be in [0, 1] (got {a.min_p})")
    if a.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (got {a.top_k})")
    if a.max_tokens == 0 or a.max_tokens < -1:
        raise UsageError(f"--max-tokens must be positive or -1 for no limit (got {a.max_tokens})")
    if a.max_kv_size is not None and a.max_kv_size < 1:
        raise UsageError(f"--max-kv-size must be positive (got {a.max_kv_size})")
    if a.prefill_step_size < 1:
        raise UsageError("--prefill-step-size must be positive")
    if a.kv_bits is not None and a.kv_bits not in (2, 3, 4, 5, 6, 8):
        raise UsageError(f"--kv-bits must be one of 2, 3, 4, 5, 6, 8 (got {a.kv_bits})")
    check_speculative_args(a)


def check_speculative_args(a):
    from .speculative import check_num_draft_tokens

    if a.num_draft_tokens is not None and a.draft_model is None:
        raise UsageError("--num-draft-tokens needs --draft-model")
    if a.draft_model is not None and a.prompt_lookup is not None:
        raise UsageError("--draft-model and --prompt-lookup cannot be combined")
    if a.draft_model is None and a.prompt_lookup is None:
        return
    try:
        if a.draft_model is not None:
            a.num_draft_tokens = 3 if a.num_draft_tokens is None else a.num_draft_tokens
            check_num_draft_tokens(a.num_draft_tokens)
        else:
            check_num_draft_tokens(a.prompt_lookup, "--prompt-lookup")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.prompt_lookup_ngram < 1:
        raise UsageError(f"--prompt-lookup-ngram must be >= 1 (got {a.prompt_lookup_ngram})")
    method = "--draft-model" if a.draft_model is not None else "--prompt-lookup"
    for flag, value in (("--max-kv-size", a.max_kv_size), ("--kv-bits", a.kv_bits),
                        ("--prompt-cache-file", a.prompt_cache_file)):
        if value is not None:
            raise UsageError(f"{method} cannot be combined with {flag}")


def encode_prompt(tokenizer, a, prompt_text: str):
    use_chat = not a.ignore_chat_template and tokenizer.has_chat_template
    if use_chat:
        messages = [] if a.system_prompt is None else [{"role": "system", "content": a.system_prompt}]
        messages.append({"role": "user", "content": prompt_text})
        extra = json.loads(a.chat_template_config) if a.chat_template_config else {}
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    elif a.system_prompt is not None:
        prompt_text = a.system_prompt + "\n" + prompt_text
    return tokenizer.encode(prompt_text, add_special_tokens=not use_chat)


def run(a) -> int:
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import load_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from .loading import load
    from .speculative import check_draft, stream_prompt_lookup

    check_args(a)
    prompt_text = a.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt_text == "-":
        prompt_text = sys.stdin.read()
    if not prompt_text.strip():
        raise UsageError("the prompt is empty")
    if a.seed is not None:
        mx.random.seed(a.seed)

    prompt_cache, model_ref = None, a.model
    if a.prompt_cache_file is not None:
        try:
            prompt_cache, meta = load_prompt_cache(a.prompt_cache_file, return_metadata=True)
        except Exception as e:
            raise UsageError(f"cannot read prompt cache {a.prompt_cache_file}: {e}") from None
        if model_ref is None:
            model_ref = meta.get("model")
        elif meta.get("model") not in (None, model_ref):
            raise UsageError(f"the prompt cache was made with model {meta['model']!r}, not {model_ref!r}")

    group = distributed.init(a.dist_timeout)
    main_rank = group.rank() == 0
    if group.size() > 1:  # tensor parallel: each rank loads and runs its shard of the model
        if a.adapter_path is not None:
            raise UsageError("--adapter-path is not supported by sharded generation: fuse the adapter "
                             "into the model first (python -m cheems_mlx.fuse)")
        if prompt_cache is not None:
            raise UsageError("--prompt-cache-file is not supported by sharded generation")
        if a.draft_model is not None or a.prompt_lookup is not None:
            raise UsageError("speculative decoding is not supported by sharded generation")
        model, tokenizer, config = distributed.sharded_load(model_ref, group, return_config=True, dtype=a.dtype)
        # sampling must agree on every rank: rank 0's seed for all
        mx.random.seed(distributed.share_object(a.seed if a.seed is not None else int(time.time_ns() % 2**31), group))
    else:
        model, tokenizer, config = load(model_ref, adapter_path=a.adapter_path, return_config=True, dtype=a.dtype)
    for tok in a.extra_eos_token:
        tokenizer.add_eos_token(tok)
    prompt = encode_prompt(tokenizer, a, prompt_text)
    vocab = int(config.get("vocab_size", 0) or 0)
    if vocab and prompt and max(prompt) >= vocab:
        raise UsageError(
            f"the tokenizer gave token id {max(prompt)}, but the model's vocabulary has {vocab} entries: "
            "the tokenizer files in the model folder do not belong to this model"
        )

    context = int(config.get("max_position_embeddings", 0) or 0)
    extends = bool(config.get("rope_scaling"))
    if context and not extends:
        if len(prompt) > context:
            raise UsageError(
                f"the prompt has {len(prompt)} tokens, more than the model's context of {context}"
            )
        room = context - len(prompt)
        if a.max_tokens == -1 or a.max_tokens > room:
            if main_rank:
                print(f"[note] generation capped at {room} tokens by the model's context of {context}",
                      file=sys.stderr)
            a.max_tokens = max(1, room)

    if a.kv_bits is not None and a.max_kv_size is not None:
        raise UsageError("--kv-bits and --max-kv-size cannot be combined")
    if prompt_cache is None and (a.max_kv_size is not None or a.kv_bits is not None):
        try:
            prompt_cache = model.make_cache(
                max_kv_size=a.max_kv_size, kv_bits=a.kv_bits, kv_group_size=a.kv_group_size
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        if a.kv_bits is not None and main_rank:
            print("[note] the attention K/V caches are quantized from the first token "
                  "(--quantized-kv-start does not apply to hybrid caches)", file=sys.stderr)

    dtype = numerics.model_dtype(model)
    sampler = make_sampler(a.temp, a.top_p, a.min_p, a.min_tokens_to_keep, top_k=a.top_k)
    generate, speculative = stream_generate, {}
    if a.draft_model is not None:  # mlx-lm's speculative decoding on our trimmable caches
        draft_model, draft_tokenizer, draft_config = load(a.draft_model, return_config=True, dtype=a.dtype)
        try:
            check_draft(tokenizer, config, draft_tokenizer, draft_config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        speculative = dict(draft_model=draft_model, num_draft_tokens=a.num_draft_tokens)
    elif a.prompt_lookup is not None:
        generate = stream_prompt_lookup
        speculative = dict(num_draft_tokens=a.prompt_lookup, ngram_size=a.prompt_lookup_ngram)
    response, accepted = None, 0
    watchdog = distributed.watchdog()
    watchdog.arm("generating")
    for response in generate(
        model,
        tokenizer,
        prompt,
        max_tokens=a.max_tokens,
        sampler=sampler,
        prompt_cache=prompt_cache,
        prefill_step_size=a.prefill_step_size,
        **(speculative or dict(prompt_progress_callback=watchdog.beat)),
    ):
        watchdog.beat()
        # never print a token drawn from NaN / Inf logits (an overflowing half-precision model)
        numerics.check_finite_logprobs(response.logprobs, dtype, response.generation_tokens)
        accepted += response.from_draft
        if main_rank:
            print(response.text, end="", flush=True)
    watchdog.disarm()
    distributed.finish(group)
    if main_rank:
        print(flush=True)
    if a.verbose and response is not None and main_rank:
        print("=" * 10, file=sys.stderr)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
        print(
            f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        if speculative:
            print(f"Speculative: {accepted} of {response.generation_tokens} tokens accepted from proposals",
                  file=sys.stderr)
        print(f"Peak memory: {response.peak_memory:.3f} GB", file=sys.stderr)
        print(f"BLAS: {blas.in_use()}", file=sys.stderr)
        print(f"dtype: {getattr(model, 'dtype_note', '') or numerics.dtype_name(numerics.model_dtype(model))}",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .loading import LoadError

    a = build_parser().parse_args(argv)
    try:
        return run_cli(lambda: run(a), (UsageError, LoadError, numerics.NonFiniteLogits))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
