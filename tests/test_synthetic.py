"""The MQAR generator (cheems_mlx/synthetic.py): every answer is recoverable from the
key-value prefix, no query leaks its answer, and the layout matches Zoology's."""

import numpy as np
import pytest

from cheems_mlx.synthetic import IGNORE, mqar

CASES = [(256, 32, 8192), (512, 64, 8192), (64, 4, 128), (130, 16, 40)]


@pytest.mark.parametrize("seq_len,kv,vocab", CASES)
def test_answers_recoverable_from_prefix(seq_len, kv, vocab):
    inputs, targets = mqar(np.random.default_rng(0), 64, seq_len, kv, vocab)
    assert inputs.shape == targets.shape == (64, seq_len)
    for x, y in zip(inputs, targets):
        pairs = dict(zip(x[0 : 2 * kv : 2].tolist(), x[1 : 2 * kv : 2].tolist()))
        assert len(pairs) == kv  # keys distinct
        positions = np.nonzero(y != IGNORE)[0]
        assert positions.size == kv
        assert positions.min() >= 2 * kv  # queries come after the pairs
        for p in positions:
            assert pairs[int(x[p])] == y[p]  # the query token is a key; its value is the answer


@pytest.mark.parametrize("seq_len,kv,vocab", CASES)
def test_no_query_leaks_its_answer(seq_len, kv, vocab):
    inputs, targets = mqar(np.random.default_rng(1), 64, seq_len, kv, vocab)
    half = vocab // 2
    for x, y in zip(inputs, targets):
        prefix, rest = x[: 2 * kv], x[2 * kv :]
        assert (prefix[0::2] >= 1).all() and (prefix[0::2] < half).all()  # keys: lower half
        assert (prefix[1::2] >= half).all() and (prefix[1::2] < vocab).all()  # values: upper
        assert len(set(prefix[1::2].tolist())) == kv  # values distinct
        # after the pairs only keys and the filler 0 appear: no value is ever repeated
        assert ((rest == 0) | ((rest >= 1) & (rest < half))).all()
        # each key is asked once, and the answer is never the query token itself
        queried = rest[rest != 0]
        assert sorted(queried.tolist()) == sorted(prefix[0::2].tolist())
        positions = np.nonzero(y != IGNORE)[0]
        assert (y[positions] != x[positions]).all()


def test_gaps_follow_a_power_law():
    """Zoology's spacing: with power_a < 1 short gaps are likelier than long ones."""
    _, targets = mqar(np.random.default_rng(2), 2000, 256, 8, 8192, power_a=0.01)
    slots = (np.nonzero(targets != IGNORE)[1] - 16) // 2  # query slot in 0..119
    counts = np.bincount(slots, minlength=120)
    assert counts[:10].sum() > 4 * counts[-10:].sum()


def test_seeded_and_bad_sizes():
    a = mqar(np.random.default_rng(3), 4, 64, 4, 128)
    b = mqar(np.random.default_rng(3), 4, 64, 4, 128)
    assert all((u == v).all() for u, v in zip(a, b))
    with pytest.raises(ValueError, match="query slots"):
        mqar(np.random.default_rng(0), 1, 64, 32, 8192)
    with pytest.raises(ValueError, match="fewer than"):
        mqar(np.random.default_rng(0), 1, 256, 16, 16)
