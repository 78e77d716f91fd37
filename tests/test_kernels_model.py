"""A whole hybrid Cheems (SSD + DMA + CDMoE) with every Metal kernel run by the CPU
emulator (tests/metal_emulator) against the same model on the pure-MLX ops path: the
logits of the prompt and of each decode step, and the greedy tokens.

Reference: the ops path, which the official vectors and the transformers parity tests pin
to independent implementations. Tolerance 1e-4 * max(1, max|ref|): float32 throughout,
the paths differ only in summation order (kernel chunk sizes, SIMD reductions, online
softmax), observed ~1e-6; a wrong kernel gives errors of order 1e-1.
"""

import mlx.core as mx
import numpy as np
import pytest

from cheems_mlx import kernels
from test_model_consistency import hybrid_args, random_model

from metal_emulator import make_factory

KERNELS = {"ssd_step", "ssd_scan", "dma_prefill", "dma_decode", "dma_decode_combine", "cdmoe_route", "cdmoe_mix"}


class CountingFactory:
    """The emulator's factory, counting launches per kernel name (so a silent fallback to
    the ops path cannot pass as agreement)."""

    def __init__(self, schedule):
        self.inner = make_factory(schedule=schedule)
        self.launches = {}

    def __call__(self, name, *args, **kwargs):
        kern = self.inner(name, *args, **kwargs)

        def launch(*a, **kw):
            self.launches[name] = self.launches.get(name, 0) + 1
            return kern(*a, **kw)

        return launch


def prefill_and_decode(model, ids, steps):
    """Logits of the prompt's last position and of each greedy decode step, and the tokens."""
    cache = model.make_cache()
    logits = model(ids, cache=cache)[:, -1]
    out, tokens = [np.array(logits)], []
    for _ in range(steps):
        tok = mx.argmax(logits, axis=-1)
        tokens.append(np.array(tok))
        logits = model(tok[:, None], cache=cache)[:, -1]
        out.append(np.array(logits))
    return out, np.stack(tokens, axis=1)


@pytest.mark.parametrize(
    "overrides,schedule",
    [
        ({}, "inorder"),  # keep-window W = 12 < T: per-row top-W selection in the kernels
        ({"moe_router": "router_gate", "num_experts_per_tok": 6, "dynamic_mask_rule": "cheems_ratio",
          "dynamic_mask_ratio": 0.25, "dynamic_mask_heads": "attention"}, "random:5"),
    ],
    ids=["queries-topW", "router_gate-ratio"],
)
def test_hybrid_model_on_the_emulator_matches_the_ops_path(overrides, schedule):
    args = hybrid_args(**overrides)
    model = random_model(args)
    model.eval()
    ids = mx.random.randint(0, args.vocab_size, (2, 17), key=mx.random.key(4))
    ref_logits, ref_tokens = prefill_and_decode(model, ids, steps=5)

    factory = CountingFactory(schedule)
    with kernels.backend(factory):
        ours_logits, ours_tokens = prefill_and_decode(model, ids, steps=5)

    assert KERNELS <= set(factory.launches), f"kernels never launched: {KERNELS - set(factory.launches)}"
    for step, (o, r) in enumerate(zip(ours_logits, ref_logits)):
        err = np.abs(o - r).max() / max(1.0, np.abs(r).max())
        assert err < 1e-4, f"step {step}: relative error {err:.3g}"
    np.testing.assert_array_equal(ours_tokens, ref_tokens)
