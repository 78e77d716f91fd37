"""Rollback caches and speculative decoding (ssd.SSDCache, cheems_mlx.speculative, generate's
--draft-model / --prompt-lookup).

The references are independent of the code under test: a cache that never saw the trimmed
tokens, and plain greedy decoding (mlx-lm's stream_generate without a draft).
"""

import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from conftest import doge_to_mlx, tiny_doge
from cheems_mlx.model import Model, ModelArgs
from cheems_mlx.ssd import SSDCache

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def default_model():
    import cheems_mlx

    model, tokenizer = cheems_mlx.load(None, dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_cheems():
    """A random hybrid (SSD, attention, SSD) with an SSD chunk of 8 tokens."""
    args = ModelArgs(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, layers_type=["ssd", "attn", "ssd"],
        ssd_chunk_size=8, qk_norm=True, is_moe=False, max_position_embeddings=256,
    )
    mx.random.seed(5)
    model = Model(args)
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def doge():
    return doge_to_mlx(tiny_doge())


def feed(model, cache, tokens):
    """Logits (V,) after the last of ``tokens``, fed in one call."""
    logits = model(mx.array(tokens)[None], cache=cache)[0, -1]
    mx.eval(logits)
    return logits


def assert_same_caches(a, b):
    """The SSD states and RoPE positions, and the attention caches' positions, agree."""
    for ca, cb in zip(a, b):
        if isinstance(ca, SSDCache):
            np.testing.assert_allclose(np.array(ca[0]), np.array(cb[0]), **TOL)
            assert np.array(ca[1]).tolist() == np.array(cb[1]).tolist()
        else:
            for ka, kb in zip(ca.caches, cb.caches):
                assert ka.offset == kb.offset


def rollback_case(model, prompt, seen, kept, calls):
    """Feed ``prompt`` then ``seen`` split into ``calls``, trim back to ``kept`` tokens of
    ``seen``; compare with a cache that saw only ``prompt + seen[:kept]``."""
    trimmed = make_prompt_cache(model)
    feed(model, trimmed, prompt)
    start = 0
    for n in calls:
        feed(model, trimmed, seen[start : start + n])
        start += n
    assert start == len(seen)
    assert can_trim_prompt_cache(trimmed)
    assert trim_prompt_cache(trimmed, len(seen) - kept) == len(seen) - kept

    fresh = make_prompt_cache(model)
    feed(model, fresh, prompt + seen[:kept])
    assert_same_caches(trimmed, fresh)
    nxt = [seen[-1]]
    np.testing.assert_allclose(np.array(feed(model, trimmed, nxt)), np.array(feed(model, fresh, nxt)), **TOL)


@pytest.mark.parametrize(
    "prompt_len, seen_len, kept, calls",
    [
        (20, 5, 2, [5]),  # one verification call, 3 rejected
        (20, 6, 1, [1, 1, 4]),  # across calls (a draft model's single steps)
        (4, 8, 0, [8]),  # trim everything the short call saw
        (3, 6, 3, [2, 4]),  # the short calls cross the SSD chunk boundary (8)
    ],
)
def test_tiny_cheems_trimmed_cache_equals_a_cache_that_never_saw_the_tokens(tiny_cheems, prompt_len, seen_len, kept, calls):
    rng = np.random.default_rng(prompt_len + seen_len)
    tokens = rng.integers(0, 128, prompt_len + seen_len).tolist()
    rollback_case(tiny_cheems, tokens[:prompt_len], tokens[prompt_len:], kept, calls)


def test_default_model_rollback_across_the_chunk_boundary(default_model):
    model, tokenizer = default_model
    tokens = tokenizer.encode("In the beginning God created the heaven and the earth. " * 8)
    assert len(tokens) > 70
    # the prompt ends before the 64-token SSD chunk boundary, the verified tokens cross it
    rollback_case(model, tokens[:60], tokens[60:68], 3, [8])
    rollback_case(model, tokens[:62], tokens[62:66], 1, [1, 3])


def test_doge_attention_caches_trim_as_before(doge):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, 30).tolist()
    rollback_case(doge, tokens[:24], tokens[24:], 2, [6])


def test_trim_beyond_the_kept_states_is_refused(tiny_cheems):
    cache = make_prompt_cache(tiny_cheems)
    assert can_trim_prompt_cache(cache)  # empty
    feed(tiny_cheems, cache, list(range(40)))  # a long call keeps only its final state
    ssd = cache[0]
    assert ssd.trimmable_tokens() == 0
    with pytest.raises(ValueError, match="cannot roll the SSD state back 1 tokens"):
        trim_prompt_cache(cache, 1)  # mlx-lm's trim on the whole list: refused, not silently short
    assert trim_prompt_cache(cache, 0) == 0
    for t in range(SSDCache.window + 3):  # single steps: the window is kept
        feed(tiny_cheems, cache, [t])
    assert ssd.is_trimmable() and ssd.trimmable_tokens() == SSDCache.window
    assert ssd.nbytes == (SSDCache.window + 1) * (ssd[0].nbytes + ssd[1].nbytes)  # kept states count
    with pytest.raises(ValueError):
        ssd.trim(SSDCache.window + 1)


def test_prompt_cache_file_and_batching_keep_working(tiny_cheems, tmp_path):
    from mlx_lm.generate import _merge_caches

    tokens = list(range(1, 30))
    cache = make_prompt_cache(tiny_cheems)
    feed(tiny_cheems, cache, tokens)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in cache]
    assert_same_caches(loaded, cache)
    np.testing.assert_allclose(np.array(feed(tiny_cheems, loaded, [7, 8])), np.array(feed(tiny_cheems, cache, [7, 8])), **TOL)
    assert loaded[0].trimmable_tokens() == 2  # the history restarts from the loaded state

    merged = _merge_caches([cache, loaded])  # BatchGenerator's merge / filter / extend keep the rows' states
    assert type(merged[0]) is SSDCache and merged[0][0].shape[0] == 2 and merged[0].trimmable_tokens() == 2
    merged[0].filter(mx.array([1]))
    merged[0].extend(merged[0])
    assert merged[0][0].shape[0] == 2 and merged[0].trimmable_tokens() == 2
    merged[0].extend(SSDCache())  # a row without a state (zeros) joins; the others keep theirs
    assert merged[0][0].shape[0] == 3 and merged[0].trimmable_tokens() == 2
    assert merged[0].extract(0).trimmable_tokens() == 2 and merged[0].extract(2).trimmable_tokens() == 0


def assert_row_trims_like_a_fresh_cache(model, row_cache, tokens, k, nxt=(7,)):
    """A single-row cache holding ``tokens``, trimmed by k, equals a fresh single-sequence
    cache fed ``tokens[:-k]`` (states, offsets, the next token's logits)."""
    import copy

    trimmed = copy.deepcopy(row_cache)
    assert can_trim_prompt_cache(trimmed)
    assert trim_prompt_cache(trimmed, k) == k
    fresh = make_prompt_cache(model)
    feed(model, fresh, tokens[: len(tokens) - k])
    assert_same_caches(trimmed, fresh)
    np.testing.assert_allclose(np.array(feed(model, trimmed, list(nxt))), np.array(feed(model, fresh, list(nxt))),
                               **TOL)


def test_batch_generator_rows_extract_trimmable_caches(tiny_cheems):
    """mlx-lm's BatchGenerator merges the requests' caches, right-pads a prefill, filters the
    batch when a request ends and extends it when one joins; each finished request's cache
    (``extract_cache``) keeps that row's SSD states: trimmed by k it equals a cache that saw
    only the row's tokens minus the last k."""
    from mlx_lm.generate import BatchGenerator

    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 128, n).tolist() for n in (9, 4, 30)]
    gen = BatchGenerator(tiny_cheems, max_tokens=8, stop_tokens=[])
    first = gen.insert(prompts[:2], max_tokens=[5, 12])  # a padded prefill; the first leaves early
    done = {}
    steps = 0
    while responses := gen.next_generated():
        steps += 1
        if steps == 3:  # joins the running batch (its prefill is long: kept from its decode steps)
            first += gen.insert(prompts[2:], max_tokens=[9])
        for r in responses:
            if r.finish_reason is not None:
                done[r.uid] = (r.prompt_cache, r.all_tokens)
    gen.close()
    assert sorted(done) == sorted(first)
    # what each row can roll back: 9 + 5 tokens, all kept (its prefill call of 8 is short); of
    # the second's 4 + 12 the batch's last 17 positions hold 13 (3 of the 8-position padded
    # prefill are its own, 5 pads); the third prefilled 29 tokens at once: its 10 decode steps
    expected = [14, 13, 10]
    for uid, prompt, n in zip(first, prompts, expected):
        cache, tokens = done[uid]
        assert tokens[: len(prompt)] == prompt
        ssd = cache[0]
        assert type(ssd) is SSDCache and ssd[0].shape[0] == 1
        assert np.array(ssd[1]).tolist() == [len(tokens)]
        assert [c.trimmable_tokens() for c in (cache[0], cache[2])] == [n, n]
        for k in sorted({1, 3, min(n, len(tokens) - 1)}):
            assert_row_trims_like_a_fresh_cache(tiny_cheems, cache, tokens, k)


def test_left_padded_batch_filter_extend_extract_keep_each_rows_states(tiny_cheems):
    """A left-padded batch (make_cache(left_padding)), filtered and extended by hand: the pads
    take no RoPE positions, and an extracted row's kept states are that row's alone."""
    rng = np.random.default_rng(6)
    rows = [rng.integers(1, 128, n).tolist() for n in (7, 3)]
    L = max(len(r) for r in rows)
    cache = tiny_cheems.make_cache(left_padding=[L - len(r) for r in rows])
    tiny_cheems(mx.array([[0] * (L - len(r)) + r for r in rows]), cache=cache)  # one short call: every state kept
    steps = rng.integers(1, 128, (4, 2)).tolist()
    for s in steps:
        tiny_cheems(mx.array(s)[:, None], cache=cache)
    seen = [r + [s[i] for s in steps] for i, r in enumerate(rows)]
    assert np.array(cache[0][1]).tolist() == [len(t) for t in seen]

    other = tiny_cheems.make_cache()  # a single-sequence cache joins: a row of its own
    extra = rng.integers(1, 128, 5).tolist()
    feed(tiny_cheems, other, extra[:2])
    for t in extra[2:]:
        feed(tiny_cheems, other, [t])
    ssd = cache[0]
    ssd.filter([1, 0])
    assert ssd.trimmable_tokens() == L + len(steps)  # one pair per position of the batch
    row = ssd.extract(0)  # the once-padded row: one pair per real token
    assert row.trimmable_tokens() == len(seen[1]) and row.history[-1][0] is row[0]
    for c, o in zip(cache, other):
        if isinstance(c, SSDCache):
            if c is not ssd:
                c.filter([1, 0])
            c.extend(o)
    assert ssd.trimmable_tokens() == L + len(steps)  # the joining row repeats its oldest pair

    for i, tokens in ((0, seen[1]), (1, seen[0]), (2, extra)):
        ssd_rows = [c.extract(i) for c in cache if isinstance(c, SSDCache)]
        fresh = make_prompt_cache(tiny_cheems)
        feed(tiny_cheems, fresh, tokens)
        for got, ref in zip(ssd_rows, [c for c in fresh if isinstance(c, SSDCache)]):
            np.testing.assert_allclose(np.array(got[0]), np.array(ref[0]), **TOL)
            assert np.array(got[1]).tolist() == [len(tokens)]
            assert got.trimmable_tokens() == len(tokens)  # short calls only: every state kept
            for k in (1, 3, len(tokens) - 1):
                fewer = make_prompt_cache(tiny_cheems)
                feed(tiny_cheems, fewer, tokens[: len(tokens) - k])
                back = got.extract(0)
                back.trim(k)
                ref_k = [c for c in fewer if isinstance(c, SSDCache)][ssd_rows.index(got)]
                np.testing.assert_allclose(np.array(back[0]), np.array(ref_k[0]), **TOL)
                assert np.array(back[1]).tolist() == [len(tokens) - k]


# ---------------------------------------------------------------- speculative decoding

VERSES = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the "
    "face of the waters. And God said, Let there be light: and there was light. "
)
COPY_HEAVY = VERSES * 3 + "In the beginning God"
FREE = "The king went out to the field and said to his servants"


def greedy_tokens(model, tokenizer, prompt, n, **kwargs):
    from mlx_lm.generate import stream_generate

    out = [(r.token, r.from_draft) for r in stream_generate(model, tokenizer, prompt, max_tokens=n, **kwargs)]
    return [t for t, _ in out], sum(d for _, d in out)


def lookup_tokens(model, tokenizer, prompt, n, k=4):
    from cheems_mlx.speculative import stream_prompt_lookup

    out = [(r.token, r.from_draft) for r in stream_prompt_lookup(model, tokenizer, prompt, max_tokens=n, num_draft_tokens=k)]
    return [t for t, _ in out], sum(d for _, d in out)


def tiny_hybrid_4096(seed: int, max_position_embeddings: int = 2048) -> Model:
    """A tiny random Cheems hybrid (ssd, attn, ssd) on the default model's vocabulary (4096)."""
    args = ModelArgs(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, layers_type=["ssd", "attn", "ssd"],
        ssd_chunk_size=8, is_moe=False, max_position_embeddings=max_position_embeddings,
    )
    mx.random.seed(seed)
    model = Model(args)
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def random_draft(default_model):
    """A tiny random Cheems on the default model's tokenizer: it proposes mostly wrong
    tokens, so the target's caches are rolled back often."""
    return tiny_hybrid_4096(11)


@pytest.fixture(scope="module")
def doge_4096():
    return doge_to_mlx(tiny_doge(seed=2, vocab_size=4096))


@pytest.mark.parametrize("draft", ["itself", "random"])
@pytest.mark.parametrize("prompt", [COPY_HEAVY, FREE])
def test_draft_model_decoding_equals_greedy_on_the_default_model(default_model, random_draft, draft, prompt):
    model, tokenizer = default_model
    ids = tokenizer.encode(prompt)
    plain, _ = greedy_tokens(model, tokenizer, ids, 40)
    draft_model = model if draft == "itself" else random_draft
    spec, accepted = greedy_tokens(model, tokenizer, ids, 40, draft_model=draft_model, num_draft_tokens=4)
    assert spec == plain
    if draft == "itself":
        assert accepted >= 20


def test_draft_model_decoding_from_a_one_token_prompt(default_model, random_draft):
    """The first call is then the verification itself, on an empty cache."""
    model, tokenizer = default_model
    plain, _ = greedy_tokens(model, tokenizer, [1], 20)
    spec, _ = greedy_tokens(model, tokenizer, [1], 20, draft_model=random_draft, num_draft_tokens=4)
    assert spec == plain


def test_draft_model_decoding_equals_greedy_on_a_doge(default_model, doge_4096, random_draft):
    _, tokenizer = default_model
    ids = tokenizer.encode(FREE)
    plain, _ = greedy_tokens(doge_4096, tokenizer, ids, 30)
    for draft in (doge_4096, random_draft):
        spec, _ = greedy_tokens(doge_4096, tokenizer, ids, 30, draft_model=draft, num_draft_tokens=3)
        assert spec == plain


@pytest.mark.parametrize("prompt", [COPY_HEAVY, FREE])
def test_prompt_lookup_equals_greedy_on_the_default_model(default_model, prompt):
    model, tokenizer = default_model
    ids = tokenizer.encode(prompt)
    plain, _ = greedy_tokens(model, tokenizer, ids, 60)
    spec, accepted = lookup_tokens(model, tokenizer, ids, 60)
    assert spec == plain
    if prompt == COPY_HEAVY:
        assert accepted > 0


@pytest.mark.parametrize("prompt", [COPY_HEAVY, FREE])
def test_prompt_lookup_equals_greedy_on_a_doge(default_model, doge_4096, prompt):
    _, tokenizer = default_model
    ids = tokenizer.encode(prompt)
    plain, _ = greedy_tokens(doge_4096, tokenizer, ids, 40)
    spec, _ = lookup_tokens(doge_4096, tokenizer, ids, 40, k=5)
    assert spec == plain


def test_prompt_lookup_keeps_a_proposal_only_when_it_is_the_sampled_token(default_model):
    """Above temperature 0 a proposed token is kept only when it equals the model's own sampled
    token: with a deterministic non-greedy sampler (always the second most likely token) the
    output is plain decoding's with that sampler."""
    from mlx_lm.generate import stream_generate

    from cheems_mlx.speculative import stream_prompt_lookup

    model, tokenizer = default_model
    second = lambda logprobs: mx.argsort(-logprobs, axis=-1)[..., 1]  # noqa: E731
    ids = tokenizer.encode(COPY_HEAVY)
    plain = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=30, sampler=second)]
    spec = [r.token for r in stream_prompt_lookup(model, tokenizer, ids, max_tokens=30, sampler=second, num_draft_tokens=4)]
    assert spec == plain


def test_prompt_lookup_leaves_the_cache_of_prompt_and_output(default_model):
    """After prompt-lookup decoding (rollbacks included) the caller's cache is the one of the
    prompt and every yielded token but the last, as after plain decoding."""
    from cheems_mlx.speculative import prompt_lookup_generate_step

    model, tokenizer = default_model
    ids = tokenizer.encode(COPY_HEAVY)
    cache = make_prompt_cache(model)
    out = [t for t, _, _ in prompt_lookup_generate_step(mx.array(ids), model, num_draft_tokens=5, max_tokens=25,
                                                         prompt_cache=cache)]
    fresh = make_prompt_cache(model)
    feed(model, fresh, ids + out[:-1])
    assert_same_caches(cache, fresh)
    np.testing.assert_allclose(np.array(feed(model, cache, out[-1:])), np.array(feed(model, fresh, out[-1:])), **TOL)


def test_propose_takes_the_latest_earlier_occurrence():
    from cheems_mlx.speculative import propose

    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 2) == [7, 5]
    assert propose([1, 2, 3, 4, 8, 2, 3], 3, 3) == [4, 8, 2]  # falls back to the 2-gram
    assert propose([5, 6, 7], 3, 2) == []
    assert propose([4, 9, 1, 5, 1], 3, 2) == [5, 1]  # a 1-gram match when asked for
    assert propose([4, 9, 1, 5, 1], 3, 2, min_ngram=2) == []  # ... not from 2 up (MIN_NGRAM)
    assert propose([4, 9, 1, 5, 9, 1], 3, 2, min_ngram=2) == [5, 9]


# ---------------------------------------------------------------- the generate CLI


def cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cheems_mlx.generate", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    from conftest import tiny_cheems_dir

    return tiny_cheems_dir(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory, random_draft):
    """A random Cheems with the default model's tokenizer files but 4160 vocabulary rows."""
    from dataclasses import asdict

    from cheems_mlx.io import save_model_dir
    from cheems_mlx.loading import resolve_model_path

    args = ModelArgs(**{**asdict(random_draft.args), "vocab_size": 4160})
    model = Model(args)
    config = {k: v for k, v in asdict(args).items() if k != "layer_types"}
    config["source_format"] = "cheems_mlx"
    src = resolve_model_path(None)
    tok_files = [src / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")]
    return save_model_dir(model, config, tmp_path_factory.mktemp("vocab") / "model", dtype="float32",
                          extra_files=tok_files)


def test_generate_cli_speculative_output_equals_plain():
    from cheems_mlx.loading import resolve_model_path

    common = ["--prompt", COPY_HEAVY, "--max-tokens", "30", "--ignore-chat-template", "--dtype", "float32"]
    plain = cli(*common)
    assert plain.returncode == 0, plain.stderr
    lookup = cli(*common, "--prompt-lookup", "4")
    assert lookup.returncode == 0, lookup.stderr
    draft = cli(*common, "--draft-model", str(resolve_model_path(None)), "--num-draft-tokens", "2", "--verbose")
    assert draft.returncode == 0, draft.stderr
    assert plain.stdout.strip() and lookup.stdout == plain.stdout and draft.stdout == plain.stdout
    assert "tokens accepted from proposals" in draft.stderr  # the draft is the model: most are


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--draft-model", "DRAFT", "--num-draft-tokens", "0"], "--num-draft-tokens must be between 1 and 15"),
        (["--draft-model", "DRAFT", "--num-draft-tokens", "16"], "--num-draft-tokens must be between 1 and 15"),
        (["--num-draft-tokens", "3"], "--num-draft-tokens needs --draft-model"),
        (["--prompt-lookup", "0"], "--prompt-lookup must be between 1 and 15"),
        (["--prompt-lookup", "3", "--prompt-lookup-ngram", "0"], "--prompt-lookup-ngram"),
        (["--prompt-lookup", "3", "--max-kv-size", "64"], "cannot be combined with --max-kv-size"),
        (["--draft-model", "DRAFT", "--prompt-lookup", "3"], "cannot be combined"),
        (["--draft-model", "DRAFT"], "a draft model must use the same tokenizer"),
        (["--draft-model", "VOCAB"], "a draft model must have the same vocabulary"),
    ],
    ids=["draft-0", "draft-16", "no-draft", "lookup-0", "ngram-0", "kv-size", "both", "other-tokenizer",
         "other-vocab"],
)
def test_generate_cli_rejects_bad_speculative_input(other_tokenizer_dir, other_vocab_dir, extra, needle):
    paths = {"DRAFT": str(other_tokenizer_dir), "VOCAB": str(other_vocab_dir)}
    extra = [paths.get(a, a) for a in extra]
    proc = cli("--max-tokens", "4", *extra)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


# ---------------------------------------------------------------- the server's prompt cache


def test_server_prompt_cache_reuses_a_longer_prompt_within_the_rollback_window(tiny_cheems):
    from cheems_mlx.server import RollbackPromptCache

    rng = np.random.default_rng(3)
    A = rng.integers(0, 128, 30).tolist()
    cache = make_prompt_cache(tiny_cheems)
    feed(tiny_cheems, cache, A[:25])
    for t in A[25:]:  # decode steps: the last 5 tokens can be rolled back
        feed(tiny_cheems, cache, [t])
    lru = RollbackPromptCache()
    lru.insert_cache("m", A, cache)

    got, rest = lru.fetch_nearest_cache("m", A[:28] + [99])
    assert rest == [99]
    fresh = make_prompt_cache(tiny_cheems)
    feed(tiny_cheems, fresh, A[:28])
    assert_same_caches(got, fresh)
    np.testing.assert_allclose(np.array(feed(tiny_cheems, got, [99])), np.array(feed(tiny_cheems, fresh, [99])), **TOL)

    got, rest = lru.fetch_nearest_cache("m", A[:20] + [5, 6])  # 10 tokens back: too far
    assert got is None and rest == A[:20] + [5, 6]
    short = make_prompt_cache(tiny_cheems)
    feed(tiny_cheems, short, A[:10])
    lru.insert_cache("m", A[:10], short)
    got, rest = lru.fetch_nearest_cache("m", A[:20] + [5, 6])
    assert rest == A[10:20] + [5, 6]
    assert_same_caches(got, short)


def test_server_with_a_draft_model_answers_as_plain_greedy(default_model):
    from mlx_lm.generate import stream_generate
    from test_generation import post

    from cheems_mlx.loading import resolve_model_path
    from conftest import served

    model, tokenizer = default_model
    prompts = [VERSES, VERSES, VERSES[:-20] + " and God saw"]  # exact reuse, then a trimmed longer prompt
    expected = ["".join(r.text for r in stream_generate(model, tokenizer, tokenizer.encode(p), max_tokens=12))
                for p in prompts]
    default = resolve_model_path(None)
    with served(default, "--draft-model", default, "--num-draft-tokens", "3") as port:
        for p, exp in zip(prompts, expected):
            got = post(port, "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
            assert got["choices"][0]["text"] == exp


def test_rollback_with_the_metal_kernels_on_the_emulator(tiny_cheems):
    """With the kernels on: prefill and decode take the kernels, a verification call the ops
    path with every state kept; a short first call (a short prompt) keeps its states too."""
    from metal_emulator import make_factory

    from cheems_mlx import kernels

    rng = np.random.default_rng(9)
    tokens = rng.integers(0, 128, 30).tolist()
    with kernels.backend(make_factory(schedule="inorder")):
        rollback_case(tiny_cheems, tokens[:20], tokens[20:26], 2, [1, 5])
        cache = make_prompt_cache(tiny_cheems)
        feed(tiny_cheems, cache, tokens[:5])  # a short first call: every state kept
        assert cache[0].trimmable_tokens() == 5
        assert trim_prompt_cache(cache, 3) == 3
        fresh = make_prompt_cache(tiny_cheems)
        feed(tiny_cheems, fresh, tokens[:2])
        assert_same_caches(cache, fresh)
        nxt = tokens[5:7]
        np.testing.assert_allclose(np.array(feed(tiny_cheems, cache, nxt)), np.array(feed(tiny_cheems, fresh, nxt)),
                                   **TOL)


def test_draft_model_decoding_from_a_one_token_prompt_with_the_metal_kernels_on_the_emulator(default_model):
    """mlx-lm verifies the first drafts in the first call on an empty cache and trims into it."""
    from metal_emulator import make_factory

    from cheems_mlx import kernels

    _, tokenizer = default_model  # a random hybrid on its vocabulary (4096), drafted by itself and another
    model, draft = tiny_hybrid_4096(21, 256), tiny_hybrid_4096(22, 256)
    with kernels.backend(make_factory(schedule="inorder")):
        plain, _ = greedy_tokens(model, tokenizer, [1], 8)
        for d in (model, draft):
            spec, _ = greedy_tokens(model, tokenizer, [1], 8, draft_model=d, num_draft_tokens=3)
            assert spec == plain


# ---------------------------------------------------------------- the server's prompt lookup


def ask_concurrently(port, prompts, n):
    """The completions' texts for ``prompts`` sent at once (one thread each), greedy."""
    from test_generation import post

    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = post(port, "/v1/completions", {"prompt": prompts[i], "max_tokens": n, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [a["choices"][0]["text"] for a in answers]


def greedy_text(model, tokenizer, prompt, n):
    from mlx_lm.generate import stream_generate

    return "".join(r.text for r in stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=n))


def test_server_stream_takes_prompt_lookup_for_plain_requests(default_model, monkeypatch):
    """The server's stream_generate (as _serve_single calls it) with --prompt-lookup: proposals
    are accepted and the tokens are plain greedy's; a request with a logits processor (a
    repetition penalty) decodes plainly."""
    from cheems_mlx import server

    model, tokenizer = default_model
    ids = tokenizer.encode(COPY_HEAVY)
    plain, _ = greedy_tokens(model, tokenizer, ids, 30)
    monkeypatch.setattr(server, "PROMPT_LOOKUP", dict(num_draft_tokens=4, ngram_size=3))
    common = dict(max_tokens=30, sampler=None, prefill_step_size=2048, kv_bits=None, kv_group_size=64,
                  quantized_kv_start=0, input_embeddings=None, num_draft_tokens=3)
    out = list(server._stream_generate(model, tokenizer, ids, prompt_cache=make_prompt_cache(model),
                                       logits_processors=[], **common))
    assert [r.token for r in out] == plain and sum(r.from_draft for r in out) > 0
    noop = lambda tokens, logits: logits  # noqa: E731
    out = list(server._stream_generate(model, tokenizer, ids, prompt_cache=make_prompt_cache(model),
                                       logits_processors=[noop], **common))
    assert [r.token for r in out] == plain and not any(r.from_draft for r in out)


@pytest.mark.parametrize("method", ["lookup", "lookup-stopped", "draft"])
def test_server_prompt_cache_stores_a_speculative_cache_under_the_tokens_it_holds(default_model, random_draft, method):
    """After speculative decoding the caches hold one token less than the server's tokens (the
    last was sampled, not fed), or drafted tokens past a stop; the stored conversation, reused
    for a longer prompt, equals a cache that saw exactly the reused tokens."""
    from mlx_lm.generate import stream_generate

    from cheems_mlx.server import RollbackPromptCache
    from cheems_mlx.speculative import stream_prompt_lookup

    model, tokenizer = default_model
    ids = tokenizer.encode(COPY_HEAVY)
    cache = make_prompt_cache(model)
    if method == "draft":
        cache += make_prompt_cache(random_draft)
        stream = stream_generate(model, tokenizer, ids, max_tokens=8, prompt_cache=cache, draft_model=random_draft,
                                 num_draft_tokens=3)
    else:
        stream = stream_prompt_lookup(model, tokenizer, ids, max_tokens=8, prompt_cache=cache, num_draft_tokens=5)
    key = list(ids)
    for r in stream:  # as mlx-lm's _serve_single: every response's token, then a break
        key.append(r.token)
        if r.finish_reason or (method == "lookup-stopped" and len(key) == len(ids) + 3):
            break
    del stream
    lru = RollbackPromptCache()
    lru.insert_cache("m", key, cache)
    follow = key + tokenizer.encode(" and God said")[1:]
    got, rest = lru.fetch_nearest_cache("m", follow)
    assert got is not None and 0 < len(rest) <= len(follow) - len(ids)
    fresh = make_prompt_cache(model)
    reused = follow[: len(follow) - len(rest)]
    feed(model, fresh, reused)
    got_model = got[: len(fresh)]  # the model's caches (a draft model's follow)
    assert_same_caches(got_model, fresh)
    np.testing.assert_allclose(np.array(feed(model, got_model, rest)), np.array(feed(model, fresh, rest)), **TOL)


def test_server_with_prompt_lookup_answers_as_plain_greedy(default_model):
    from test_generation import post

    from cheems_mlx.loading import resolve_model_path
    from conftest import served

    model, tokenizer = default_model
    assert len(tokenizer.encode(COPY_HEAVY)) > 64  # crosses the default model's SSD chunk
    n = 8  # the stored prompt + answer is trimmed back within the rollback window
    first = greedy_text(model, tokenizer, VERSES, n)
    extended = VERSES + first + " and God said"
    # the stored conversation (prompt + answer tokens) is a prefix of the extended prompt
    ids = tokenizer.encode(VERSES)
    assert tokenizer.encode(extended)[: len(ids) + n] == ids + greedy_tokens(model, tokenizer, ids, n)[0]
    prompts = [
        COPY_HEAVY,  # a fresh cache, prefill across the chunk boundary
        COPY_HEAVY,  # the stored prompt + answer, trimmed back
        VERSES,
        extended,  # the stored conversation, extended
        VERSES[:-20] + " and God saw",  # an edited end: a longer stored prompt trimmed
    ]
    expected = [greedy_text(model, tokenizer, p, n) for p in prompts]
    concurrent = [VERSES + VERSES[:40], FREE, COPY_HEAVY[:-30], VERSES * 2]
    expected_concurrent = [greedy_text(model, tokenizer, p, n) for p in concurrent]
    with served(resolve_model_path(None), "--prompt-lookup", "4", "--prompt-lookup-ngram", "2") as port:
        for p, exp in zip(prompts, expected):
            got = post(port, "/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0})
            assert got["choices"][0]["text"] == exp
        assert ask_concurrently(port, concurrent, n) == expected_concurrent


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompt-lookup", "0"], "--prompt-lookup must be between 1 and 15"),
        (["--prompt-lookup", "16"], "--prompt-lookup must be between 1 and 15"),
        (["--prompt-lookup", "four"], "--prompt-lookup takes an integer"),
        (["--prompt-lookup", "3", "--prompt-lookup-ngram", "0"], "--prompt-lookup-ngram must be >= 1"),
        (["--prompt-lookup-ngram", "2"], "--prompt-lookup-ngram needs --prompt-lookup"),
        (["--prompt-lookup", "3", "--draft-model", "x"], "--prompt-lookup cannot be combined with --draft-model"),
        (["--prompt-lookup", "3", "--kv-bits", "4"], "--prompt-lookup cannot be combined with --kv-bits"),
    ],
    ids=["zero", "sixteen", "not-int", "ngram-0", "ngram-alone", "draft", "kv-bits"],
)
def test_server_rejects_bad_prompt_lookup_flags(extra, needle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.server", *extra], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_batched_server_requests_answer_as_plain_greedy(default_model):
    """Without a draft model or --prompt-lookup, concurrent requests share mlx-lm's batch."""
    from cheems_mlx.loading import resolve_model_path
    from conftest import served

    model, tokenizer = default_model
    prompts = [COPY_HEAVY, FREE]  # different lengths: the shorter one is left-padded in the batch
    expected = [greedy_text(model, tokenizer, p, 12) for p in prompts]
    with served(resolve_model_path(None)) as port:
        assert ask_concurrently(port, prompts, 12) == expected


def test_batched_server_reuses_a_longer_conversation_by_trimming(default_model):
    """On mlx-lm's batched path (no flags) the stored conversation (prompt + answer, the
    caches ``BatchGenerator.extract_cache`` returns) is reused for a prompt that edits its last
    tokens: trimmed back to the common prefix (``cached_tokens``), answered as plain greedy."""
    from mlx_lm.generate import stream_generate
    from test_generation import post

    from cheems_mlx.loading import resolve_model_path
    from conftest import served

    model, tokenizer = default_model
    ids = tokenizer.encode(FREE)
    answer = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12)]
    assert len(answer) == 12 and tokenizer.eos_token_id not in answer
    stored = ids + answer  # the tokens the finished request's caches hold
    edited = FREE + tokenizer.decode(answer[:-4]) + " and the king"
    new_ids = tokenizer.encode(edited)
    common = next(i for i, (a, b) in enumerate(zip(stored + [None], new_ids + [None])) if a != b)
    assert len(ids) < common < len(new_ids) and len(stored) - common <= SSDCache.window  # a trim within reach
    with served(resolve_model_path(None)) as port:
        first = post(port, "/v1/completions", {"prompt": FREE, "max_tokens": 12, "temperature": 0})
        assert first["choices"][0]["text"] == tokenizer.decode(answer)
        got = post(port, "/v1/completions", {"prompt": edited, "max_tokens": 12, "temperature": 0})
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == common
    assert got["choices"][0]["text"] == greedy_text(model, tokenizer, edited, 12)
