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


def rope_rotate_half_ref(x, positions, inv_freq, seq_axis):
    """float64 rotate-half RoPE of x (b, ..., P): positions (b, l) on ``seq_axis``."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    theta = positions[..., None] * inv_freq  # (b, l, half)
    shape = [x.shape[0]] + [x.shape[a] if a == seq_axis else 1 for a in range(1, x.ndim - 1)] + [half]
    cos, sin = np.cos(theta).reshape(shape), np.sin(theta).reshape(shape)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
@pytest.mark.parametrize("seq_axis", [1, 2])
@pytest.mark.parametrize("offset_kind", ["int", "scalar", "rows"])
def test_rotate_step_matches_a_float64_rope(scaling, seq_axis, offset_kind):
    """A decode step's RoPE (``rotate_step``: one fused kernel for plain / linear RoPE, the
    probe path for llama3) against float64 numpy at the same positions; the frequencies are
    base^(-2i/P) scaled by the linear factor, and for llama3 mlx-lm's own ``_freqs`` (its
    wavelength rule). Positions up to ~40: float32 angles err by < 1e-5 there; tolerance 1e-4."""
    import mlx.core as mx

    from cheems_mlx.rope import RotaryEmbedding, rotate_step

    P, b = 16, 2
    rope = RotaryEmbedding(P, 10000.0, scaling, 64)
    inv = 10000.0 ** (-np.arange(0, P, 2) / P)
    if scaling and scaling["rope_type"] == "linear":
        inv = inv / scaling["factor"]
    elif scaling:
        inv = 1.0 / np.array(rope._rope._freqs, np.float64)
    rng = np.random.default_rng(3)
    for l in (1, 3):
        shape = (b, l, 3, P) if seq_axis == 1 else (b, 3, l, P)
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
        starts = {"int": [37, 37], "scalar": [21, 21], "rows": [5, 40]}[offset_kind]
        offset = {"int": 37, "scalar": mx.array(21), "rows": mx.array(starts)}[offset_kind]
        got = rotate_step(rope, [mx.array(x) for x in xs], offset, seq_axis)
        positions = np.array(starts, np.float64)[:, None] + np.arange(l)
        for x, y in zip(xs, got):
            ref = rope_rotate_half_ref(x, positions, inv, seq_axis)
            assert np.abs(np.array(y) - ref).max() <= 1e-4
