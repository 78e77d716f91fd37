"""RoPE with dynamic-NTK scaling against transformers (Doge with rope_type "dynamic").

transformers recomputes the inverse frequencies once the largest position of the call
reaches max_position_embeddings: base * (factor * seq_len / max_pos - (factor - 1)) **
(dim / (dim - 2)). A full forward over a sequence 2.5x longer than max_position_embeddings
must agree; the unscaled prefix (shorter than max_pos) too.
Tolerance as in test_transformers_parity.py: 1e-4 * max(1, max|ref|).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import doge_to_mlx, max_rel_err, tiny_doge  # noqa: E402


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_dynamic_ntk_rope_matches_transformers(factor):
    import mlx.core as mx

    hf = tiny_doge(
        seed=5,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0},
    )
    ours = doge_to_mlx(hf)
    assert ours.args.rope_scaling["rope_type"] == "dynamic"
    g = torch.Generator().manual_seed(0)
    for length in (12, 40):  # below and beyond max_position_embeddings
        ids = torch.randint(0, 256, (2, length), generator=g)
        with torch.no_grad():
            ref = hf(ids, use_cache=False).logits.numpy()
        got = np.array(ours(mx.array(ids.numpy())))
        assert max_rel_err(got, ref) <= 1e-4
