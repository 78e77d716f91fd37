"""cheems_mlx.load on an unconverted checkpoint folder: mapped in memory with the
converter's checks, same logits as transformers (tolerance as in the parity tests)."""

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import max_rel_err, tiny_cheems_dir, tiny_doge  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    tiny_cheems_dir(root)  # for its tokenizer (300 pieces)
    hf = tiny_doge(seed=4, vocab_size=300, is_moe=True, num_experts=64, num_experts_per_tok=4)
    out = root / "hf"
    hf.save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "data" / f, out / f)
    return hf, out


def test_load_maps_a_transformers_checkpoint_in_memory(hf_dir):
    import cheems_mlx

    hf, path = hf_dir
    model, tok, config = cheems_mlx.load(path, return_config=True)
    assert config["source_format"] == "doge" and config["moe_routing"] == "transformers_reshape"
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.numpy()
    assert max_rel_err(np.array(model(mx.array(ids.numpy()))), ref) <= 1e-4


def test_generate_cli_on_an_unconverted_checkpoint(hf_dir, tmp_path):
    _, path = hf_dir
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(path),
                           "--prompt", "and god said", "--max-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    proc = subprocess.run([sys.executable, "-m", "cheems_mlx.generate", "--model", str(broken)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
