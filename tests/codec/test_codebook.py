import hashlib

import numpy as np
import pytest

from tqstore.codec.codebook import SUPPORTED_BITS, codebook_midpoints, lloyd_max_codebook
from tqstore.errors import InvalidArgument

# Pinned digests: a codebook that changes by one bit changes every code a store ever produced,
# so any platform/NumPy drift must fail loudly here rather than silently break hits.
PINNED = {
    (128, 4): "9ed20b6cd7984f5248409ed15c2548b69a1e3b2853a4fe1283f890216b276505",
    (64, 4): "05b1e0c9a38b9dda01488e6a34bfd0f8b00223b311e4a94b4e5aa9718c7af6d8",
    (96, 3): "4b1100a7a31324d1f693051a016c4681014a60d1c177c1cf6d1df4a8d050b258",
    (80, 8): "e518648a799abdcf37e85222f262fbbbf79916a22306ce130abd2d86df6f37af",
}


@pytest.mark.parametrize("key", sorted(PINNED))
def test_codebook_bytes_are_pinned(key):
    assert hashlib.sha256(lloyd_max_codebook(*key).tobytes()).hexdigest() == PINNED[key]


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codebook_sorted_antisymmetric(head_dim, bits):
    c = lloyd_max_codebook(head_dim, bits)
    assert c.dtype == np.float32 and c.shape == (2**bits,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])


def test_one_bit_codebook_matches_gaussian_closed_form():
    # For N(0, 1/d) the 1-bit optimum is +-sqrt(2/pi)/sqrt(d); the exact density is a little
    # lighter-tailed, so within 0.5%.
    c = lloyd_max_codebook(128, 1)
    expected = np.sqrt(2 / np.pi) / np.sqrt(128)
    assert abs(c[1] - expected) / expected < 5e-3


def test_centroids_are_conditional_means(rng):
    # Lloyd-Max fixed point: each centroid is the mean of samples falling in its cell.
    d = 64
    x = rng.standard_normal((200_000, d))
    t = (x / np.linalg.norm(x, axis=1, keepdims=True))[:, 0]
    c = lloyd_max_codebook(d, 2).astype(np.float64)
    idx = np.searchsorted(codebook_midpoints(lloyd_max_codebook(d, 2)), t)
    for k in range(4):
        assert abs(t[idx == k].mean() - c[k]) < 2e-3


@pytest.mark.parametrize("bits,head_dim", [(0, 64), (9, 64), (4, 4)])
def test_unsupported_settings_raise(bits, head_dim):
    with pytest.raises(InvalidArgument):
        lloyd_max_codebook(head_dim, bits)
