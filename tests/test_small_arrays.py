"""tqstore.small_arrays: host-made kernel inputs padded out of MLX's CUDA small pool."""

import mlx.core as mx
import numpy as np
import pytest

from tqstore.codec.rotation import HeadRotations
from tqstore.metal.quantize import _rotation_norm
from tqstore.small_arrays import MIN_BYTES, padded_array, padded_rows


@pytest.mark.parametrize("values", [[7], [3, -1], [1, 2, 3, 4, 5]])
def test_padded_array_holds_exactly_the_values(values):
    a = padded_array(values)
    assert a.dtype == mx.int32 and a.shape == (len(values),)
    assert a.tolist() == values


def test_padded_array_float_and_empty():
    a = padded_array([0.1], mx.float32)
    assert a.dtype == mx.float32 and a.shape == (1,)
    assert np.array(a).tobytes() == np.float32(0.1).tobytes()
    e = padded_array([])
    assert e.shape == (0,) and e.dtype == mx.int32


def test_padded_rows_shape_and_values():
    r = padded_rows([[4, 9]])
    assert r.shape == (1, 2) and r.tolist() == [[4, 9]]
    assert padded_rows([[1, 2, 3], [4, 5, 6]]).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="equal"):
        padded_rows([[1, 2], [3]])


def test_min_bytes_is_above_the_small_pool():
    # MLX's CUDA allocator serves <= 8 bytes from its read-mostly managed pool.
    assert MIN_BYTES > 8


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_quantize_kernel_norm_is_the_codecs_scalar_bitwise(head_dim):
    rot = HeadRotations(head_dim, [b"seed"])
    assert np.array(_rotation_norm(rot.p)).tobytes() == np.array(rot._norm.reshape(1)).tobytes()
