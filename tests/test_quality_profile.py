"""The calibrated quality profile end to end on the real SmolLM2.

- Bit allocation is deterministic and respects the byte budget.
- `tqstore calibrate`'s means step is deterministic, and the shipped profile is what it produces.
- With the shipped per-layer profile, a hit reproduces a cold run exactly, and the daemon's
  re-quantized codes equal the generator's own pages byte for byte (padding aside).
"""

import mlx.core as mx
import numpy as np
import pytest

from tqstore.calibrate import CALIBRATION_TEXT, DATA_DIR, allocate_bits, bit_budget, calibrate
from tqstore.client import KvStoreClient
from tqstore.codec.profile import QualityProfile
from tqstore.generator import CachedGenerator
from tqstore.models.loader import chat_prompt_ids
from tqstore.models.smollm2 import load_smollm2
from tqstore.paged.policy import default_policy, default_profile_path, find_profile, profile_policy

from tests.page_compare import assert_fetched_codes_equal_fresh_pages

BLOCK = 128
SHIPPED_PREFILL = 1024  # the --prefill of the shipped profile's command (docs/fragments/quality.md)


def test_allocation_is_deterministic_and_within_budget(rng):
    ks, vs = rng.uniform(1e-4, 2e-3, 30), rng.uniform(1e-4, 1e-3, 30)
    ks[10] = 0.03  # one very sensitive layer, as on SmolLM2
    total = bit_budget(0.30, 30, 3, 64, 2048)
    assert total == 272  # K5V4 everywhere (270) plus two bits
    # a 16-token fp16 tail at the worst moment of a 2048-token sequence costs 5 of them
    assert bit_budget(0.30, 30, 3, 64, 2048, tail_tokens=16) == 267
    kb, vb = allocate_bits(ks, vs, total)
    assert (kb, vb) == allocate_bits(ks.copy(), vs.copy(), total)
    assert sum(kb) + sum(vb) == total and min(kb + vb) >= 3 and max(kb + vb) <= 8
    assert kb[10] == max(kb)


# How far means recomputed on another machine may stray from the shipped ones. Another CPU, BLAS
# or thread count rounds the prefill's keys differently, and the difference grows through the
# layers. Measured (relative RMS, largest difference in fp16 steps of the (layer, head)'s largest
# mean): 5.5e-5 and 1.0 on two OpenBLAS core types and thread counts; 4.9e-4 and 2.0 on the GPU
# machine's CPU (MLX's own BLAS). A profile of 16 prefill tokens fewer is 1.0e-2 and 22 steps
# away, one of another text or length farther still. (One token fewer, 9e-4 and 2.4 steps, is
# within what another BLAS does: this check cannot tell those apart.)
MEANS_RELATIVE_RMS = 2e-3
MEANS_MAX_STEPS = 8.0


def assert_means_agree(got_bytes: bytes, shipped_bytes: bytes) -> None:
    got, shipped = (np.frombuffer(b, np.float16).astype(np.float64).reshape(30, 3, 64)
                    for b in (got_bytes, shipped_bytes))
    rms = np.sqrt(((got - shipped) ** 2).mean() / (shipped ** 2).mean())
    step = np.spacing(np.abs(shipped).max(axis=2).astype(np.float16)).astype(np.float64)
    steps = (np.abs(got - shipped) / step[..., None]).max()
    assert rms <= MEANS_RELATIVE_RMS and steps <= MEANS_MAX_STEPS, (
        f"recomputed key means differ from the shipped profile: relative RMS {rms:.2e} "
        f"(allowed {MEANS_RELATIVE_RMS:.0e}), {steps:.2f} fp16 steps (allowed {MEANS_MAX_STEPS})")


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_calibration_means_are_deterministic_and_match_the_shipped_profile(smollm2):
    text = (DATA_DIR / CALIBRATION_TEXT).read_text()
    a = calibrate(smollm2, text, CALIBRATION_TEXT, 48, 0, uniform=(0, 0), log=lambda *_: None)
    b = calibrate(smollm2, text, CALIBRATION_TEXT, 48, 0, uniform=(0, 0), log=lambda *_: None)
    assert a.to_bytes() == b.to_bytes() and a.digest == b.digest
    shipped = find_profile(smollm2.fingerprint)
    assert shipped is not None and shipped.key_bits
    with mx.stream(mx.cpu):  # as the shipped profile was made (a GPU rounds matmuls to TF32)
        full = calibrate(smollm2, text, CALIBRATION_TEXT, SHIPPED_PREFILL, 0, uniform=(0, 0),
                         log=lambda *_: None)
    assert_means_agree(full.key_means, shipped.key_means)
    assert QualityProfile.from_bytes(default_profile_path(smollm2.fingerprint).read_bytes()) == shipped
    assert default_policy(smollm2.fingerprint).codec.profile.key_means == shipped.key_means


def test_per_layer_profile_hit_equals_cold_and_daemon_codes_equal_pages(smollm2, daemon):
    from tqstore.demo import demo_document

    profile = find_profile(smollm2.fingerprint)
    policy = profile_policy(profile)  # per-layer bits, means, the fp16 tail: the default
    assert policy == default_policy(smollm2.fingerprint) and policy.fp16_tail
    assert len(set(profile.key_bits + profile.value_bits)) > 1
    text = " ".join(demo_document().split(" ")[:260])
    ids = chat_prompt_ids(smollm2.tokenizer, text + "\n\nWho wrote this license?")
    with KvStoreClient(daemon.address) as client:
        generator = CachedGenerator(smollm2, client, policy=policy, block_size=BLOCK)
        cold = generator.generate(ids, max_tokens=8)
        cold.upload.result()
        hit = generator.generate(ids, max_tokens=8)
        assert hit.cache_status == "hit" and hit.token_ids == cold.token_ids
        fetched = client.fetch_turboquant(generator.namespace, ids, policy.codec)
    assert_fetched_codes_equal_fresh_pages(smollm2.model, generator, ids, fetched, BLOCK)


def test_shipped_default_fits_the_byte_budget_with_its_tail():
    from tqstore.bench.quality import live_bytes_per_token
    from tqstore.paged.kv_pool import PagedKVPool

    fingerprint = "sha256:b179c9523d0e6a0f"  # the bundled SmolLM2's profile file name
    path = default_profile_path(fingerprint)
    profile = QualityProfile.from_bytes(path.read_bytes())
    policy = profile_policy(profile)
    pool = PagedKVPool(num_layers=30, num_kv_heads=3, key_head_dim=64, block_size=16,
                       num_blocks=4, policy=policy)
    fp16 = pool.fp16_bytes_per_token()
    assert fp16 == 23040
    # the quality benchmark's sequence (1,024 + 1,536 tokens) and calibrate's (2,048 tokens)
    for tokens in (2560, 2048):
        assert live_bytes_per_token(policy, pool, tokens, 2048) / fp16 <= 0.30
    assert sum(profile.key_bits) + sum(profile.value_bits) == bit_budget(
        0.30, 30, 3, 64, 2048, tail_tokens=16)
