"""Generation through mlx-lm's machinery and our CLIs on a saved model folder.

Reference for the tokens: a plain greedy loop written here (model + make_cache +
argmax), independent of mlx-lm's generation code.
"""

import json
import os
import subprocess
import sys
import urllib.request

import mlx.core as mx
import pytest

from conftest import served, tiny_cheems_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_cheems_dir(tmp_path_factory.mktemp("gen"))


def own_greedy(model, prompt_ids, n):
    cache = model.make_cache()
    logits = model(mx.array(prompt_ids)[None], cache=cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]))
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def cli(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=300)


def test_stream_and_batch_generate_match_own_greedy_loop(model_dir):
    import cheems_mlx
    from mlx_lm import batch_generate, stream_generate

    model, tok = cheems_mlx.load(model_dir)
    prompts = ["and god said", "let there be light in the beginning", "the word"]
    ids = [tok.encode(p) for p in prompts]
    expected = [own_greedy(model, p, 8) for p in ids]
    # stream_generate stops at EOS; compare up to the first EOS of the reference
    trim = lambda t: t[: t.index(2)] if 2 in t else t  # noqa: E731
    for p, exp in zip(ids, expected):
        got = [r.token for r in stream_generate(model, tok, mx.array(p), max_tokens=8)]
        assert trim(got) == trim(exp)
    res = batch_generate(model, tok, ids, max_tokens=8, return_token_ids=True)
    assert [trim(t) for t in res.token_ids] == [trim(t) for t in expected]


def test_generate_cli_matches_mlx_lm_cli(model_dir):
    ours = cli("-m", "cheems_mlx.generate", "--model", str(model_dir), "--prompt", "and god said",
               "--max-tokens", "8", "--verbose")
    assert ours.returncode == 0, ours.stderr
    assert "Generation:" in ours.stderr and "Peak memory" in ours.stderr
    theirs = cli("-m", "mlx_lm", "generate", "--model", str(model_dir), "--trust-remote-code",
                 "--prompt", "and god said", "--max-tokens", "8", "--verbose", "False")
    assert theirs.returncode == 0, theirs.stderr
    assert ours.stdout.strip() == theirs.stdout.strip()
    assert ours.stdout.strip()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--temp", "-1"], "--temp"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--prompt", "and god said " * 40], "context"),
    ],
    ids=["empty-prompt", "neg-temp", "top-p-0", "top-p-big", "max-tokens-0", "too-long"],
)
def test_generate_cli_rejects_bad_input(model_dir, extra, needle):
    proc = cli("-m", "cheems_mlx.generate", "--model", str(model_dir), *extra)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_generate_cli_missing_model_and_offline_repo(tmp_path):
    proc = cli("-m", "cheems_mlx.generate", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = cli("-m", "cheems_mlx.generate", "--model", "SmallDoge/Doge-20M",
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "local cache" in lines[0], proc.stderr


def test_max_kv_size_and_prompt_cache_file(model_dir, tmp_path):
    proc = cli("-m", "cheems_mlx.generate", "--model", str(model_dir), "--prompt", "and god said",
               "--max-tokens", "5", "--max-kv-size", "16")
    assert proc.returncode == 0, proc.stderr
    proc = cli("-m", "cheems_mlx.generate", "--model", str(model_dir), "--prompt", "and god said",
               "--max-tokens", "5", "--kv-bits", "8", "--kv-group-size", "32")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    proc = cli("-m", "cheems_mlx.generate", "--model", str(model_dir), "--kv-bits", "8")
    assert proc.returncode == 1 and "does not divide the head dimension" in proc.stderr
    cache_file = tmp_path / "c.safetensors"
    proc = cli("-m", "mlx_lm", "cache_prompt", "--model", str(model_dir), "--trust-remote-code",
               "--prompt", "and god said let there be", "--prompt-cache-file", str(cache_file))
    assert proc.returncode == 0, proc.stderr
    proc = cli("-m", "cheems_mlx.generate", "--prompt-cache-file", str(cache_file), "--prompt", " light",
               "--max-tokens", "5", "--ignore-chat-template")
    assert proc.returncode == 0, proc.stderr


def test_mlx_lm_benchmark_runs(model_dir):
    proc = cli("-m", "mlx_lm", "benchmark", "--model", str(model_dir), "--trust-remote-code",
               "-p", "32", "-g", "8", "-b", "2", "-n", "1")
    assert proc.returncode == 0, proc.stderr
    assert "tokens-per-sec" in proc.stdout or "tps" in proc.stdout.lower(), proc.stdout


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_server_answers_openai_requests(model_dir):
    with served(model_dir) as port:
        chat = post(port, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "and god said"}], "max_tokens": 6, "temperature": 0})
        assert chat["choices"][0]["message"]["content"]
        comp = post(port, "/v1/completions", {"prompt": "and god said", "max_tokens": 6, "temperature": 0})
        assert comp["choices"][0]["text"]
        # concurrent requests are batched by the server; greedy answers must not change
        from concurrent.futures import ThreadPoolExecutor

        prompts = ["and god said", "let there be light", "in the beginning was the word"]
        body = lambda p: {"prompt": p, "max_tokens": 8, "temperature": 0}  # noqa: E731
        single = [post(port, "/v1/completions", body(p))["choices"][0]["text"] for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as ex:
            batched = list(ex.map(lambda p: post(port, "/v1/completions", body(p))["choices"][0]["text"], prompts))
        assert batched == single
