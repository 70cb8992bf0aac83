"""Seeded random test inputs: fresh every run, reproducible from the failure message.

Every test gets one seed (tests/conftest.py draws it, or takes TQSTORE_TEST_SEED to replay a
failure) and seeds MLX's global generator with it. `seeded_rng()` hands out numpy generators
derived from that seed in call order, so a test and its helpers draw the same inputs again when
the seed is replayed. The seed is printed with every failure."""

from __future__ import annotations

import os
import secrets

import numpy as np

SEED_ENV = "TQSTORE_TEST_SEED"

_seed = 0
_drawn = 0


def start_test() -> int:
    """Pick this test's seed (the replayed one if TQSTORE_TEST_SEED is set) and reset the stream."""
    global _seed, _drawn
    _seed = int(os.environ.get(SEED_ENV) or secrets.randbits(32))
    _drawn = 0
    return _seed


def seeded_rng() -> np.random.Generator:
    """A numpy generator derived from the current test's seed; the n-th call of a test always
    gets the same one."""
    global _drawn
    _drawn += 1
    return np.random.default_rng([_seed, _drawn])
