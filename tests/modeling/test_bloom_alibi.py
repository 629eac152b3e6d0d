"""ALiBi: BLOOM's slopes, and key positions counted over real keys whatever the padding or cache layout."""

import numpy as np
import pytest

from owl_jax.modeling.bloom import alibi_slopes, key_positions


@pytest.mark.parametrize(
    "heads, exponents",
    [
        (6, [-2, -4, -6, -8, -1, -3]),  # 1/4, 1/16, 1/64, 1/256, then 1/2, 1/8
        (12, [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]),
        (32, [-i / 4 for i in range(1, 33)]),
    ],
)
def test_slopes(heads, exponents):
    np.testing.assert_allclose(alibi_slopes(heads), np.exp2(exponents), rtol=1e-6)
    assert alibi_slopes(heads).dtype == np.float32


def _causal(key_valid: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """`(B, L, K)`: query slot i sees valid keys at slots <= i."""
    slots = np.arange(key_valid.shape[1])
    return (slots[None, None, :] <= queries[None, :, None]) & key_valid[:, None, :]


def test_key_positions_count_real_keys_only():
    right = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)  # the processor's right padding
    left = right[:, ::-1]  # the generator's left padding
    for valid in (right, left):
        expected = np.where(valid, np.cumsum(valid, axis=1) - 1, 0)
        got = np.asarray(key_positions(_causal(valid, np.arange(6)), 2, 6))
        np.testing.assert_array_equal(got, expected)
    # one decode step at slot 6 of an 8-slot cache: the prompt's keys, then the new token, later slots empty
    cache = np.concatenate([left, np.ones((2, 1), bool), np.zeros((2, 1), bool)], axis=1)
    got = np.asarray(key_positions(cache[:, None, :], 2, 8))
    np.testing.assert_array_equal(got, [[0, 0, 0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 1, 2, 0]])
    np.testing.assert_array_equal(np.asarray(key_positions(None, 2, 5)), np.tile(np.arange(5), (2, 1)))
