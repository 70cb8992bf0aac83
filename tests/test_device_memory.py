"""Host bytes onto the device (tqstore.device_memory) and the store block chosen per backend."""

import numpy as np
import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from tqstore import generator
from tqstore.device_memory import host_to_device, prefetch_to_device


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_host_to_device_gives_the_host_bytes_in_a_fresh_array(rng, dtype):
    """On CUDA through cudaMemcpy into a device-made buffer, elsewhere mx.array: the same
    array either way, bit for bit, and a later change to the host buffer does not reach it."""
    host = (rng.standard_normal((3, 5, 7, 16)) * 50).astype(dtype)
    out = host_to_device(host)
    assert out.dtype == mx.array(host[:0]).dtype and out.shape == host.shape
    assert np.array_equal(np.array(out).view(np.uint8), host.view(np.uint8))
    kept = host.copy()
    host[...] = 0
    assert np.array_equal(np.array(out), kept)
    strided = host_to_device(kept[:, ::2])  # a strided view is copied contiguous first
    assert np.array_equal(np.array(strided), kept[:, ::2])
    assert prefetch_to_device([out]) in (0, out.nbytes)  # a hint: nothing or all of it


def test_store_block_defaults_to_256_and_grows_on_cuda_while_a_block_fits_a_put(monkeypatch):
    def layout(layers, heads, dim):
        return {"num_layers": layers, "num_kv_heads": heads, "key_head_dim": dim,
                "value_head_dim": dim}

    llama8b, llama70b, smollm2 = layout(32, 8, 128), layout(80, 8, 128), layout(30, 3, 64)
    for backend in (None, "metal"):
        monkeypatch.setattr(generator, "gpu_backend", lambda b=backend: b)
        assert generator.default_store_block(llama8b) == generator.DEFAULT_STORE_BLOCK == 256
    monkeypatch.setattr(generator, "gpu_backend", lambda: "cuda")
    assert generator.default_store_block(smollm2) == 2048
    assert generator.default_store_block(llama8b) == 2048  # 131 KB per token: 256 MiB exactly
    assert generator.default_store_block(llama70b) == 512  # 328 KB per token
    # A block of 512 would pass 256 MiB too (a 13B model with 40 KV heads): the usual 256.
    assert generator.default_store_block(layout(40, 40, 128)) == 256
