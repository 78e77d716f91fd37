"""The benchmark CLI writes its JSON / markdown / PNG; the kernels suite says where it cannot run."""

import json

from cheems_mlx.bench import ClassicMoE, main


def test_experts_suite_writes_its_outputs(tmp_path):
    assert main(["experts", "--out", str(tmp_path), "--sizes", "256"]) == 0
    result = json.loads((tmp_path / "experts.json").read_text())
    assert {r["design"] for r in result["rows"]} == {"cdmoe", "classic_moe", "switch_glu"}
    assert all(r["prefill_ms"] > 0 and r["decode_ms"] > 0 for r in result["rows"])
    assert "| 256 | cdmoe |" in (tmp_path / "experts.md").read_text()
    assert (tmp_path / "experts.png").stat().st_size > 1000


def test_ssd_suite_writes_its_outputs_and_agrees_with_mlx_lm(tmp_path):
    assert main(["ssd", "--out", str(tmp_path), "--sizes", "128"]) == 0
    result = json.loads((tmp_path / "ssd.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert {"recurrence", "mlx-lm ssm_attn (256)", "chunked Q=64"} <= methods
    diff = next(r["value"] for r in result["rows"] if "value" in r)
    assert diff < 1e-5  # mlx-lm's independent SSD implementation computes the same scan


def test_attention_suite_writes_its_outputs(tmp_path):
    assert main(["attention", "--out", str(tmp_path), "--sizes", "256"]) == 0
    result = json.loads((tmp_path / "attention.json").read_text())
    assert {r["design"] for r in result["rows"]} == {"dense", "dma W=256", "dma W=1024"}
    assert (tmp_path / "attention.png").exists()


def test_kernels_suite_says_plainly_it_cannot_time_without_metal(tmp_path, capsys):
    import mlx.core as mx

    if mx.metal.is_available():  # pragma: no cover - a Mac times the kernels instead
        assert main(["kernels", "--out", str(tmp_path)]) == 0
        assert json.loads((tmp_path / "kernels.json").read_text())["measured"]
        return
    assert main(["kernels", "--out", str(tmp_path)]) == 1
    assert "Metal is not available" in capsys.readouterr().err
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["measured"] is False and "cannot be timed" in result["reason"]


def test_classic_moe_baseline_mixes_its_top_k_experts():
    """The baseline is a real MoE: with one expert selected, the output is that expert."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    m = ClassicMoE(8, 4, 1)
    x = mx.random.normal((1, 3, 8))
    out = np.array(m(x))
    idx = np.array(mx.argmax(m.router(x), axis=-1))
    for t in range(3):
        e = idx[0, t]
        down, up = np.array(m.down_embed.weight[e]), np.array(m.up_embed.weight[e])
        h = np.array(nn.silu(mx.array(np.array(x[0, t]) @ down)))
        np.testing.assert_allclose(out[0, t], h * up, rtol=1e-5, atol=1e-6)


def test_kernels_suite_runs_its_mac_path_on_the_emulator(tmp_path, monkeypatch):
    """The Mac code path of the suite (timing each module with and without its kernels) runs
    end to end, with the kernels executed by the CPU emulator at toy sizes."""
    from cheems_mlx import bench, kernels

    from metal_emulator import make_factory

    monkeypatch.setattr(kernels, "metal_available", lambda: True)
    with kernels.backend(make_factory()):
        result = bench.suite_kernels(tmp_path, d=64, heads=4, head_dim=16, prefill=16, cache_len=32,
                                     dtype="float32", num_experts=64)
    assert result["measured"]
    assert [r["module"] for r in result["rows"]] == ["ssd", "dma W=256", "dma W=32", "cdmoe",
                                                      "cdmoe 4-bit tables"]
    assert all(r["kernel_decode_ms"] > 0 and r["ops_prefill_ms"] > 0 for r in result["rows"])
    assert "| cdmoe 4-bit tables |" in (tmp_path / "kernels.md").read_text()


def test_speculative_suite_writes_its_outputs_and_keeps_plain_tokens(tmp_path):
    """With --draft-model (here a tiny random Cheems saved beside the default model's
    tokenizer) the draft rows join; every method's tokens are plain greedy decoding's."""
    import dataclasses

    import mlx.core as mx

    from cheems_mlx.bench import suite_speculative
    from cheems_mlx.io import save_model_dir
    from cheems_mlx.loading import TOKENIZER_FILES, resolve_model_path
    from cheems_mlx.model import Model, ModelArgs

    config = dict(model_type="cheems", vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, layers_type=["ssd", "attn"], ssd_chunk_size=8,
                  is_moe=False, max_position_embeddings=2048, source_format="cheems_mlx")
    mx.random.seed(5)
    draft = Model(ModelArgs(**config))
    shipped = resolve_model_path(None)
    save_model_dir(draft, dataclasses.asdict(draft.args), tmp_path / "draft", extra_files=[shipped / f for f in TOKENIZER_FILES
                                                                    if (shipped / f).exists()])
    result = suite_speculative(tmp_path, lookups=(3,), new_tokens=12, reps=1, draft_path=str(tmp_path / "draft"),
                               draft_tokens=(2,))
    assert {r["method"] for r in result["rows"]} == {"plain", "prompt lookup N=3", "draft = the model itself, N=3",
                                                     "draft model (0.3M), N=2"}
    assert all(r["same_tokens_as_plain"] for r in result["rows"])
    text = (tmp_path / "speculative.md").read_text()
    assert "| copy-heavy | prompt lookup N=3 |" in text and "Draft model: draft, 0.33M parameters" in text


def test_step_profile_counts_fewer_operations_when_the_decode_step_is_compiled():
    """count_ops reads the step's graph: the whole-model compiled step must need fewer MLX
    operations than the per-layer compiled functions, and those fewer than every operation
    eager (the three forms of step_profile)."""
    import cheems_mlx
    from cheems_mlx.bench import STEP_MODES, step_profile

    model, _ = cheems_mlx.load()
    prof = step_profile(model, prompt=8, reps=2)
    whole, layers, eager = (prof["forms"][STEP_MODES[m]]["ops"] for m in ("1", "layers", "0"))
    assert 0 < whole < layers < eager and prof["ops"] == whole
    assert any(kind.startswith("Compiled") for kind in prof["ops_by_kind"])
    assert "DynamicSliceUpdate" in prof["ops_by_kind"]  # the K/V writes are inside the one function
    assert set(prof["layers_ms"]) == {"ssd layers", "attn layers", "rest"}
    assert {"norms", "residuals", "StateSpaceDuality", "DynamicMaskAttention"} <= set(prof["modules_uncompiled_ms"])
