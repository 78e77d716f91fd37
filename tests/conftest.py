"""Shared test helpers.

``doge_to_mlx`` / ``tiny_doge``: build tiny random transformers ``DogeForCausalLM`` models
and import them into cheems_mlx through the same path a real checkpoint takes
(``detect_format`` -> ``native_config`` -> ``ModelArgs.from_dict`` -> ``Model.sanitize``
-> ``load_weights(strict=True)``). Used by ``test_transformers_parity.py``.
"""

import contextlib
import os
from pathlib import Path

import cheems_mlx  # noqa: F401  (first: it puts a fast BLAS in front of MLX's, cheems_mlx/blas.py)
import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def kernel_check_cache(tmp_path_factory):
    """Every test its own on-disk cache of kernel self-check verdicts (cheems_mlx.kernels), so
    no test reads another's verdicts or writes into the user's ~/.cache."""
    previous = os.environ.get("CHEEMS_MLX_CACHE_DIR")
    os.environ["CHEEMS_MLX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cheems_mlx_cache"))
    yield
    if previous is None:
        os.environ.pop("CHEEMS_MLX_CACHE_DIR", None)
    else:
        os.environ["CHEEMS_MLX_CACHE_DIR"] = previous


# The official reference vectors (tests/data/vectors: README.txt per case, INDEX.txt), kept in
# the repository so every clone runs the parity tests; $CHEEMS_VECTORS points them at another
# copy of the same layout.
VECTORS = Path(os.environ.get("CHEEMS_VECTORS") or ROOT / "tests" / "data" / "vectors")


def doge_to_mlx(hf_model, drop_keys=()):
    """A cheems_mlx ``Model`` holding the weights of a transformers ``DogeForCausalLM``
    (``drop_keys``: state_dict entries to leave out, e.g. a tied ``lm_head.weight``)."""
    from cheems_mlx.convert.formats import detect_format, native_config, native_weights
    from cheems_mlx.model import Model, ModelArgs

    config = hf_model.config.to_dict()
    weights = {
        k: mx.array(v.detach().to("cpu").float().numpy())
        for k, v in hf_model.state_dict().items()
        if k not in drop_keys
    }
    fmt = detect_format(config, weights.keys())
    shapes = {k: tuple(v.shape) for k, v in native_weights(weights).items()}
    args = ModelArgs.from_dict(native_config(config, fmt, shapes))
    model = Model(args)
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def tiny_doge(seed=0, **overrides):
    """A small random float32 ``DogeForCausalLM`` (eager attention) whose every path is
    exercised: ``self_attn.A`` nonzero (so the dynamic bias varies per key), every RMSNorm
    and residual weight 1 + N(0, 0.1^2) (so a swapped or missing weight shows), and an
    initializer range of 0.1 so logits are O(1) rather than O(0.01)."""
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        keep_window_size=2048,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    config = DogeConfig(**kw)
    model = DogeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.A"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight") or name.endswith("_residual"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


# Metal kernels on the CPU emulator (tests/metal_emulator, test_kernels_*.py): the activation
# dtypes every kernel is checked in and the relative tolerances against the ops path (float32:
# summation order only; float16 / bfloat16: the ops path rounds intermediates to the dtype,
# 2^-11 / 2^-8 relative -- reasons per kernel in each test file's docstring).
KERNEL_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
KERNEL_TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}  # = cheems_mlx.kernels.TOLERANCE


def planted_kernel(monkeypatch, name, source, header, emulator):
    """Until ``monkeypatch.undo()``: ``kernels.kernel(name, ...)`` builds ``source`` (a copy of
    the kernel with a planted bug) with ``emulator``, outside kernels' cache of real builds."""
    from cheems_mlx import kernels

    real = kernels.kernel

    def kernel(kname, input_names, output_names, **kw):
        if kname != name:
            return real(kname, input_names, output_names, **kw)
        return emulator(name=f"{name}_planted", input_names=list(input_names), output_names=list(output_names),
                        source=source, header=header)

    monkeypatch.setattr(kernels, "kernel", kernel)

RTOL_F32 = 2e-5  # float32 vs a float64 numpy reference: ~1e-6 observed


def assert_close(ours, ref, rtol=RTOL_F32):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    assert err <= rtol * scale, f"max|diff| {err:.3g} > {rtol:g} * {scale:.3g}"


def max_rel_err(ours, ref):
    """max|ours - ref| / max(1, max|ref|)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))


TINY_WORDS = "and god said let there be light in the beginning was the word unto them".split()


def tiny_cheems_dir(root, seed=3, **overrides):
    """A saved model folder (random hybrid Cheems: SSD + DMA + CDMoE) with a sentencepiece
    tokenizer trained on a small synthetic corpus by ``cheems_mlx.train.prepare``."""
    import random
    from dataclasses import asdict

    from cheems_mlx.io import save_model_dir
    from cheems_mlx.model import Model, ModelArgs
    from cheems_mlx.train import prepare

    rng = random.Random(0)
    docs = [" ".join(rng.choice(TINY_WORDS) for _ in range(40)) + "." for _ in range(80)]
    (root / "c.txt").write_text("\n\n".join(docs))
    prepare([root / "c.txt"], root / "data", vocab_size=300, val_fraction=0.1)
    cfg = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, layers_type=["ssd", "attn", "ssd"],
        ssd_chunk_size=8, qk_norm=True, is_moe=True, num_experts=64, num_expert_heads=2,
        num_experts_per_tok=4, expert_retrieval_size=16, max_position_embeddings=64,
        eos_token_id=2, bos_token_id=1,
    )
    cfg.update(overrides)
    args = ModelArgs(**cfg)
    mx.random.seed(seed)
    model = Model(args)
    for layer in model.layers:  # a peaked output distribution: greedy ties are unlikely
        if layer.layer_type == "attn":
            layer.attn.A = mx.random.uniform(-1, 1, layer.attn.A.shape)
    model.model.word_embed.weight = model.model.word_embed.weight * 4
    config = {k: v for k, v in asdict(args).items() if k != "layer_types"}
    config["source_format"] = "cheems_mlx"
    tok_files = [root / "data" / f for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")]
    return save_model_dir(model, config, root / "model", dtype="float32", extra_files=tok_files)


@contextlib.contextmanager
def served(model_dir, *extra):
    """``python -m cheems_mlx.server --model MODEL_DIR`` on a free port until the block ends:
    yields the port once the server accepts connections."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cheems_mlx.server", "--model", str(model_dir), "--port", str(port),
                             *map(str, extra)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start: {proc.stderr.read()}")
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
