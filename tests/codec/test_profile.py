"""Quality profiles: canonical bytes, validation, identity, and centered codecs."""

import numpy as np
import pytest
import mlx.core as mx

from tqstore.codec import CodecConfig, layer_codecs
from tqstore.codec.profile import QualityProfile
from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import Namespace
from tqstore.requantize import Requantizer


def _profile(rng, layers=4, heads=2, dim=64, key_bits=(), value_bits=()):
    means = rng.standard_normal((layers, heads, dim)) * 3
    return QualityProfile.build("sha256:test", means, key_bits=key_bits, value_bits=value_bits,
                                calibration="unit test")


def test_bytes_round_trip_and_digest_are_stable(rng):
    p = _profile(rng, key_bits=(4, 6, 5, 4), value_bits=(4, 4, 3, 5))
    data = p.to_bytes()
    q = QualityProfile.from_bytes(data)
    assert q == p and hash(q) == hash(p) and q.to_bytes() == data
    assert q.digest == p.digest and len(q.digest) == 64
    # Means are exactly the fp16 rounding of the calibrated float means.
    want = np.frombuffer(p.key_means, dtype="<f2").reshape(4, 2, 64)[1].astype(np.float32)
    assert np.array_equal(q.key_mean(1), want)
    assert q.bits_for(1, 9, 9) == (6, 4)
    other = p.__class__.from_bytes(_profile(rng).to_bytes())
    assert other.digest != p.digest


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1],                                   # truncated payload
    lambda d: b"XXXXXXXX" + d[8:],                       # bad magic
    lambda d: d[:12],                                    # truncated header
    lambda d: d[:8] + (10 ** 9).to_bytes(4, "little") + d[12:],  # header length lies
    lambda d: d.replace(b'"key_bits":[4,6,5,4]', b'"key_bits":[4,6,5,9]'),
    lambda d: d.replace(b'"num_layers":4', b'"num_layers":5'),
    lambda d: d.replace(b'"calibration":"unit test"', b'"calibration": "unit test"'),
    lambda d: d + b"\0\0",
    lambda d: b"",
])
def test_garbage_is_rejected_with_value_error(rng, mutate):
    p = _profile(rng, key_bits=(4, 6, 5, 4), value_bits=(4, 4, 3, 5))
    with pytest.raises(ValueError):
        QualityProfile.from_bytes(mutate(p.to_bytes()))


def test_non_finite_means_are_rejected():
    means = np.zeros((2, 2, 8))
    means[1, 0, 3] = 1e6  # overflows float16
    with pytest.raises(ValueError):
        QualityProfile.build("m", means)


def test_identity_names_the_profile_and_bits_must_match_the_widest_layer(rng):
    p = _profile(rng, key_bits=(4, 6, 5, 4), value_bits=(4, 4, 3, 5))
    config = CodecConfig(6, 5, profile=p)
    assert config.identity().endswith(f":profile{p.digest}")
    assert CodecConfig(6, 5).identity() != config.identity()
    assert config.layer_bits(1) == (6, 4) and config.layer_bits(3) == (4, 5)
    with pytest.raises(InvalidArgument):
        CodecConfig(5, 5, profile=p)
    assert hash(config) == hash(CodecConfig(6, 5, profile=QualityProfile.from_bytes(p.to_bytes())))


def test_centered_codec_codes_the_residual_whatever_the_batching(rng):
    p = _profile(rng, layers=3, heads=2, dim=64)
    kc, vc = layer_codecs(CodecConfig(4, 4, profile=p), 2, 2, 64)
    assert kc.center is not None and vc.center is None
    x = mx.array((rng.standard_normal((1, 2, 19, 64)) * 2 + np.asarray(p.key_mean(2))[None, :, None])
                 .astype(np.float16))
    whole = kc.quantize(x)
    parts = [kc.quantize(x[:, :, a:b]) for a, b in ((0, 16), (16, 17), (17, 19))]
    for name in ("codes", "scales"):
        joined = np.concatenate([np.array(getattr(q, name)) for q in parts], axis=2)
        assert joined.tobytes() == np.array(getattr(whole, name)).tobytes()
    # The center-free view of the same codec, fed x - mean, gives the same bytes (the arena's path).
    res = kc.residual_codec.quantize(kc.centered(x))
    assert np.array(res.codes).tobytes() == np.array(whole.codes).tobytes()
    assert np.array(res.scales).tobytes() == np.array(whole.scales).tobytes()
    # Reconstruction adds the mean back; the residual view does not.
    full, resid = np.array(kc.dequantize(whole)), np.array(kc.dequantize_residual(whole))
    assert np.allclose(full - resid, np.asarray(p.key_mean(2))[None, :, None], atol=1e-5)
    err = np.linalg.norm(full - np.array(x, dtype=np.float32)) / np.linalg.norm(np.array(x, dtype=np.float32))
    assert err < 0.12


def test_requantizer_with_per_layer_profile_equals_layer_codecs(rng):
    ns = Namespace("test-model", num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
    p = _profile(rng, key_bits=(4, 6, 5, 4), value_bits=(3, 4, 4, 5))
    config = CodecConfig(6, 5, profile=p, seed=3)
    shape = (4, 2, 16, 64)
    keys = (rng.standard_normal(shape) * 2 + np.asarray(p._means16())[:, :, None]).astype(np.float16)
    values = rng.standard_normal(shape).astype(np.float16)
    out = Requantizer().quantize_block(ns, config, keys, values)
    assert out["key_codes"].shape == (4, 2, 16, 48) and out["value_codes"].shape == (4, 2, 16, 40)
    for layer in range(4):
        kc, vc = layer_codecs(config, layer, 2, 64)
        for prefix, codec, x in (("key", kc, keys), ("value", vc, values)):
            q = codec.quantize(mx.array(x[layer][None]))
            got = out[f"{prefix}_codes"][layer]
            assert got[..., : codec.code_bytes].tobytes() == np.array(q.codes)[0].tobytes()
            assert not got[..., codec.code_bytes:].any()  # zero padding up to the wire width
            assert out[f"{prefix}_scales"][layer].tobytes() == np.array(q.scales)[0].tobytes()
    with pytest.raises(InvalidArgument):
        Requantizer().quantize_block(Namespace("m", 5, 2, 64, 16), config, keys, values)
