"""Multi-query associative recall (MQAR), the synthetic recall task of the Zoology
benchmark (Arora et al. 2023) that the Wonderful Matrices paper uses to compare mixers.

One example of length ``seq_len``::

    k1 v1 k2 v2 ... kn vn | 0 0 k7 0 0 0 k2 0 ... 0        (inputs)
                          | . . v7 . . . v2 . ... .        (targets: -100 where "." )

- the first ``2 n`` tokens are n key-value pairs: keys drawn without replacement from
  the lower half of the vocabulary (1 .. V/2 - 1; 0 is the filler), values without
  replacement from the upper half (V/2 .. V-1);
- every key is queried exactly once, in a random order, at an even offset of the rest
  of the sequence; the gap before each query is drawn from a power law (small gaps
  likelier, exponent ``power_a``) as in Zoology;
- the target at a query position is the value paired with that key; every other target
  is ``IGNORE`` (-100). The value itself never appears after the pairs, so the model must
  recall it from the prefix.
"""

import numpy as np

IGNORE = -100


def _sample_without_replacement(rng: np.random.Generator, n: int, pool: int, k: int, log_p=None):
    """``n`` rows of ``k`` distinct integers in [0, pool); weighted by exp(log_p) when given
    (Gumbel top-k: exact sampling without replacement)."""
    scores = rng.gumbel(size=(n, pool))
    if log_p is not None:
        scores = scores + log_p
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def mqar(
    rng: np.random.Generator,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
):
    """(inputs, targets), both int32 of shape (num_examples, seq_len)."""
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2  # query slots (even offsets after the pairs)
    key_pool = vocab_size // 2 - 1
    if num_kv_pairs < 1 or space < num_kv_pairs:
        raise ValueError(
            f"seq_len {seq_len} leaves {space} query slots for {num_kv_pairs} key-value pairs"
        )
    if key_pool < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} has fewer than {num_kv_pairs} keys")
    n = num_examples
    keys = _sample_without_replacement(rng, n, key_pool, num_kv_pairs) + 1
    values = _sample_without_replacement(rng, n, vocab_size - vocab_size // 2, num_kv_pairs)
    values = values + vocab_size // 2

    # gaps: the j-th query sits at slot g_j; power law p(g) ~ g^(power_a - 1) for g = 1..space
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1))
    slots = _sample_without_replacement(rng, n, space, num_kv_pairs, log_p)

    inputs = np.zeros((n, seq_len), dtype=np.int32)
    targets = np.full((n, seq_len), IGNORE, dtype=np.int32)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    rows = np.arange(n)[:, None]
    positions = context + 2 * slots  # (n, kv)
    inputs[rows, positions] = keys
    targets[rows, positions] = values
    return inputs, targets
