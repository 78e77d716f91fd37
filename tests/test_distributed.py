"""Several ranks over loopback (mx.distributed, ring backend): tensor-parallel sharded
models, data-parallel LoRA and pretraining, and what happens when a rank dies, hangs or
never connects.

Ranks are started as mlx.launch starts them (MLX_RANK + MLX_HOSTFILE; one test goes
through mlx.launch itself), each in its own process group with a hard timeout. The
references come from the single-process model in this test process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_cheems_dir

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
RANK_TIMEOUT = 120  # hard limit for any launched process
PROMPT = [1, 17, 33, 99, 120, 7, 250, 3, 44, 12, 61, 5, 9, 100, 200, 150, 31, 8, 77, 66]
# two ranks on a 2-core machine: one BLAS thread each, or they fight over the cores
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")
HEADS = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128)


_handed_out = set()


def free_ports(n, consecutive=False):
    """Ports free now and not handed out before in this session (a closed probe port can
    come back from the OS). ``consecutive``: n ports in a row (mlx.launch's layout)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        ports = list(range(base, base + n)) if consecutive else [base]
        if _handed_out.isdisjoint(ports) and all(_is_free(p) for p in ports):
            _handed_out.update(ports)
            if consecutive or n == 1:
                return ports
            return ports + free_ports(n - 1)


def _is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def hostfile(tmp, n=2):
    path = tmp / f"hosts-{time.time_ns()}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    return path


def start(cmd, rank, hosts, **env):
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(ENV, MLX_RANK=str(rank), MLX_HOSTFILE=str(hosts), **env), start_new_session=True,
    )


def finish(procs, timeout=RANK_TIMEOUT):
    """Wait for every process (at most ``timeout`` s in all); kill the process groups of
    any left. Returns [(returncode, stdout, stderr, seconds)]."""
    t0, out = time.time(), []
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(1, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            so, se = p.communicate()
            pytest.fail(f"a rank did not finish within {timeout} s: {se[-2000:]}")
        out.append((p.returncode, so, se, time.time() - t0))
    return out


def run_ranks(cmds, tmp, timeout=RANK_TIMEOUT):
    hosts = hostfile(tmp, len(cmds))
    return finish([start(c, r, hosts) for r, c in enumerate(cmds)], timeout)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny float32 models covering every sharded path, and two quantized ones."""
    from cheems_mlx.io import save_model_dir
    from cheems_mlx.loading import load
    from cheems_mlx.quantize import quantize

    root = tmp_path_factory.mktemp("dist")
    made = {}
    for name, kw in {
        # SSD + DMA (mask heads = kv heads) + CDMoE with product-key queries, tied embedding
        "hybrid": {},
        # router_gate CDMoE with an uneven expert split (49 = 24 + 25), an odd vocabulary
        # (301: zero-padded rows), untied lm_head, mask heads = attention heads, biases
        "variant": dict(moe_router="router_gate", num_experts=49, vocab_size=301, tie_word_embeddings=False,
                        dynamic_mask_heads="attention", attention_bias=True, mlp_bias=True, ssd_bias=True),
        "dense": dict(is_moe=False),
    }.items():
        (root / name).mkdir()
        made[name] = tiny_cheems_dir(root / name, **HEADS, **kw)
    tok = [made["hybrid"] / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")]
    for name in ("hybrid", "dense"):  # 4-bit, group 32: tables, embedding; dt_proj/router 8-bit
        model, _, config = load(made[name], return_config=True)
        model, qconfig, _ = quantize(model, dict(config), bits=4, group_size=32)
        made[f"{name}-q4"] = save_model_dir(model, qconfig, root / f"{name}-q4", extra_files=tok)
    return made


@pytest.fixture(scope="module")
def sharded_run(models, tmp_path_factory):
    """Every model of ``models`` loaded and run by one 2-rank job: {name: [rank 0, rank 1]}."""
    out = tmp_path_factory.mktemp("dist-out")
    names = list(models)
    cmd = [sys.executable, WORKER, out, json.dumps(PROMPT)] + [models[n] for n in names]
    for rc, _, err, _ in run_ranks([cmd, cmd], out):
        assert rc == 0, err[-3000:]
    return {n: [dict(np.load(out / f"rank{r}_{k}.npz")) for r in range(2)] for k, n in enumerate(names)}


def single_process(path):
    from mlx_lm.generate import generate_step

    from cheems_mlx.loading import load

    model, _ = load(path)
    ids = mx.array(PROMPT)[None]
    logits = np.array(model(ids))
    tokens = [int(t) for t, _ in generate_step(ids[0, :8], model, max_tokens=10)]
    return model, logits, tokens


def rel_err(ours, ref):
    """Relative error over the finite logits; the -inf ones (vocabulary rows the tokenizer
    has no token for: ``Model.vocab_limit``) must be -inf in both."""
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(ours))
    return float(np.max(np.abs(ours - ref)[finite]) / np.max(np.abs(ref[finite])))


@pytest.mark.parametrize("name", ["hybrid", "variant", "dense", "hybrid-q4", "dense-q4"])
def test_sharded_logits_and_greedy_tokens_match_one_process(models, sharded_run, name):
    _, ref, ref_tokens = single_process(models[name])
    r0, r1 = sharded_run[name]
    np.testing.assert_array_equal(r0["full"], r1["full"])  # every rank has the same logits
    assert rel_err(r0["full"], ref) <= 1e-5, rel_err(r0["full"], ref)
    assert rel_err(r0["decode"], ref) <= 1e-5, rel_err(r0["decode"], ref)  # through the caches
    assert r0["tokens"].tolist() == ref_tokens == r1["tokens"].tolist()


@pytest.mark.parametrize("name", ["hybrid", "variant", "dense", "hybrid-q4", "dense-q4"])
def test_each_rank_holds_about_half_the_parameters(models, sharded_run, name):
    from cheems_mlx import distributed
    from cheems_mlx.loading import load_model_only

    whole = distributed.parameter_bytes(load_model_only(models[name], lazy=True)[0])
    held = [int(r["param_bytes"]) for r in sharded_run[name]]
    for b in held:  # replicated: norms, residual scales, the CDMoE router
        assert 0.45 * whole < b < 0.56 * whole, (held, whole)
    # the planner (shapes only, one process) predicts exactly what the ranks hold
    build = lambda: load_model_only(models[name], lazy=True)[0]  # noqa: E731
    assert distributed.plan(build, 2)["rank_bytes"] == held
    # loading shard by shard never materialises the whole model on a rank
    if name == "hybrid":
        assert max(int(r["peak_load"]) for r in sharded_run[name]) < whole


def test_shard_refuses_what_cannot_be_split():
    from cheems_mlx import distributed
    from cheems_mlx.model import Model, ModelArgs

    args = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, layers_type=["ssd", "attn"])
    with pytest.raises(distributed.DistributedError,
                       match=r"over 4 ranks: num_key_value_heads 2 is not divisible by 4$"):
        Model(ModelArgs(**args)).shard(distributed.PlanGroup(4, 0))
    with pytest.raises(distributed.DistributedError, match="3 ranks: num_attention_heads 4 .*num_key_value_heads 2"):
        Model(ModelArgs(**args)).shard(distributed.PlanGroup(3, 0))
    model = Model(ModelArgs(**args))
    import mlx.nn as nn

    nn.quantize(model, group_size=32, bits=4)  # down_proj: 96 / 32 = 3 groups per row
    with pytest.raises(distributed.DistributedError, match="down_proj has 3 quantization groups"):
        model.shard(distributed.PlanGroup(2, 0))


# --------------------------------------------------------------------------- the CLIs


def test_generate_under_mlx_launch_prints_the_single_process_text(models, tmp_path, capsys):
    from cheems_mlx.generate import main

    argv = ["--model", str(models["hybrid"]), "--prompt", "and god said", "--max-tokens", "8",
            "--ignore-chat-template"]
    assert main(argv) == 0
    single = capsys.readouterr().out
    port = free_ports(2, consecutive=True)[0]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", "2", "--backend", "ring",
         "--starting-port", str(port), "--", sys.executable, "-m", "cheems_mlx.generate", *argv],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    ((rc, out, err, _),) = finish([proc])
    assert out == single, err[-3000:]  # rank 0 prints, rank 1 stays silent


def test_server_under_two_ranks_answers_like_one_process(models, tmp_path):
    import urllib.request

    from mlx_lm.generate import generate as lm_generate

    from cheems_mlx.loading import load

    model, tokenizer = load(models["hybrid"])
    want = lm_generate(model, tokenizer, "and god said", max_tokens=6)
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "cheems_mlx.server", "--model", models["hybrid"], "--port", port,
           "--dist-timeout", "60"]
    hosts = hostfile(tmp_path)
    procs = [start(cmd, r, hosts) for r in range(2)]
    try:
        deadline = time.time() + 90
        body = json.dumps({"prompt": "and god said", "max_tokens": 6, "temperature": 0}).encode()
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    got = json.loads(r.read())["choices"][0]["text"]
                break
            except OSError:
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise AssertionError("the 2-rank server did not answer")
                time.sleep(0.5)
        assert got == want
        # rank 1 dies: rank 0 stops with one clear line instead of serving errors
        os.killpg(procs[1].pid, signal.SIGKILL)
        ((rc, _, err, _),) = finish([procs[0]], timeout=30)
        assert rc == 1 and "lost the connection to another rank" in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


# --------------------------------------------------------------------------- data parallel


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-data")
    words = "and god said let there be light in the beginning".split()
    rng = np.random.default_rng(0)
    for name, n in (("train", 24), ("valid", 8), ("test", 8)):
        rows = []
        for _ in range(n):  # different lengths: the ranks' batches hold different token counts
            phrase = " ".join(rng.choice(words, int(rng.integers(2, 9))))
            rows.append({"prompt": f"say {phrase}", "completion": f" {phrase} amen"})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def metrics(path):
    rows = [json.loads(l) for l in (Path(path) / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("iteration", r.get("step")), r.get("train_loss"), r.get("val_loss")) for r in rows]


def assert_same_curve(ours, ref, tol):
    assert [r[0] for r in ours] == [r[0] for r in ref]
    for (it, t, v), (_, rt, rv) in zip(ours, ref):
        for a, b in ((t, rt), (v, rv)):
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(a - b) <= tol * abs(b), (it, a, b)


def test_lora_on_two_ranks_follows_the_one_rank_run_with_the_whole_batch(models, jsonl, tmp_path):
    """--batch-size is the global batch (mlx-lm's convention): 2 ranks x 2 rows against
    1 rank x 4 rows, same seed. The gradients are weighted by each rank's token count, so
    the two runs compute the same steps; they differ only by float32 summation order
    (observed: losses within 1e-5 relative after 6 steps at lr 1e-3): tolerance 1e-4."""
    from cheems_mlx.lora import parse_args, run

    args = ["--model", str(models["hybrid"]), "--train", "--data", str(jsonl), "--iters", "6",
            "--batch-size", "4", "--steps-per-report", "1", "--steps-per-eval", "3", "--save-every", "3",
            "--val-batches", "2", "--learning-rate", "1e-3"]
    run(parse_args(args + ["--adapter-path", str(tmp_path / "one")]), log=lambda *a: None)
    cmd = [sys.executable, "-m", "cheems_mlx.lora", *args, "--adapter-path"]
    results = run_ranks([cmd + [tmp_path / "two"], cmd + [tmp_path / "rank1"]], tmp_path)
    for rc, _, err, _ in results:
        assert rc == 0, err[-3000:]
    assert_same_curve(metrics(tmp_path / "two"), metrics(tmp_path / "one"), 1e-4)
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes
    # Adam moves a weight whose gradient is ~0 by ~lr whatever the rounding: compare the
    # adapters as a whole (observed 5e-5)
    a = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    assert diff <= 1e-3 * sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def test_fit_on_two_ranks_follows_the_one_rank_run(models, tmp_path):
    from cheems_mlx.train import fit

    data = models["hybrid"].parent / "data"
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, layer_types=["ssd", "attn"], ssd_chunk_size=8,
                                   is_moe=True, num_experts=16, num_expert_heads=2, num_experts_per_tok=2,
                                   expert_retrieval_size=8)))
    kw = dict(steps=6, batch_size=4, seq_len=16, warmup=2, eval_every=3, eval_batches_n=2, save_every=3, seed=1)
    fit(data, cfg, tmp_path / "one", **kw)
    cmd = [sys.executable, "-m", "cheems_mlx.train", "fit", "--data", data, "--model-config", cfg,
           "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--warmup", "2", "--eval-every", "3",
           "--eval-batches", "2", "--save-every", "3", "--seed", "1", "--out"]
    results = run_ranks([cmd + [tmp_path / "two"], cmd + [tmp_path / "rank1"]], tmp_path)
    for rc, _, err, _ in results:
        assert rc == 0, err[-3000:]
    assert_same_curve(metrics(tmp_path / "two"), metrics(tmp_path / "one"), 1e-4)
    assert not (tmp_path / "rank1").exists()


# --------------------------------------------------------------------------- failures

PEER = """
import os, sys, time
import mlx.core as mx
import cheems_mlx.generate  # the CLI's imports: both ranks reach init together (the ring
# backend retries a refused connection with growing waits, 1 s, 2 s, 4 s ...)
mx.distributed.init(strict=True)
mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # cheems_mlx.distributed.init's barrier
if sys.argv[1] == "exit":
    os._exit(0)  # abruptly: no barrier, no cleanup
time.sleep(float(sys.argv[2]))  # joined, then never answers again
"""


def test_a_rank_that_dies_hangs_or_never_starts_stops_the_others(models, tmp_path):
    """Rank 0 runs the real generate CLI; its peer exits right after joining (the sockets
    close: the next collective fails at once), or joins and then never answers (the
    watchdog stops rank 0 after --dist-timeout 8 s), or never starts (connecting is
    watched too); and two ranks given a model they cannot split (one kv head) both stop
    with the same one-line error. The four cases run side by side."""
    (tmp_path / "kv1").mkdir()
    kv1 = tiny_cheems_dir(tmp_path / "kv1")  # num_key_value_heads 1
    gen = [sys.executable, "-m", "cheems_mlx.generate", "--prompt", "x", "--max-tokens", "4", "--model"]
    peer = [sys.executable, "-c", PEER]
    dies, hangs, alone, bad = (hostfile(tmp_path) for _ in range(4))
    limit = ["--dist-timeout", "8"]
    procs = [start(gen + [models["hybrid"]], 0, dies), start(gen + [models["hybrid"]] + limit, 0, hangs),
             start(gen + [models["hybrid"]] + limit, 0, alone), start(gen + [kv1], 0, bad), start(gen + [kv1], 1, bad),
             start(peer + ["exit"], 1, dies), start(peer + ["sleep", "90"], 1, hangs)]
    try:
        results = finish(procs[:5], timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    (rc_d, _, err_d, _), (rc_h, _, err_h, _), (rc_a, _, err_a, _) = results[:3]
    assert rc_d == 1, err_d[-2000:]
    assert err_d.strip().splitlines()[-1].startswith("error: rank 0 of 2 lost the connection to another rank")
    # stopped by the watchdog (SIGTERM after its message)
    assert rc_h != 0 and "error: rank 0 of 2: no progress for 8 s while waiting for the other ranks" in err_h, err_h
    assert rc_a != 0 and "error: rank 0: no progress for 8 s while connecting to the other ranks" in err_a, err_a
    for rc, _, err, _ in results[3:]:
        assert rc == 1 and err.strip().splitlines()[-1] == (
            "error: cannot split this model over 2 ranks: num_key_value_heads 1 is not divisible by 2"), err
    assert max(r[3] for r in results) < 80  # bounded: startup + the 8 s limit, never a hang


def test_lora_batch_that_does_not_split_over_the_ranks_is_one_clear_line(monkeypatch):
    from cheems_mlx import distributed
    from cheems_mlx.lora import LoRAError, check_args, parse_args

    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: distributed.PlanGroup(2, 0))
    args = parse_args(["--train", "--data", "d", "--batch-size", "3"])
    with pytest.raises(LoRAError, match=r"^--batch-size 3 is the batch of all ranks together and must be "
                                        r"divisible by the 2 ranks$"):
        check_args(args)
