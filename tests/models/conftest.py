"""The real SmolLM2-135M-Instruct, loaded once per session (load_smollm2 caches it)."""

import pytest

import tqstore  # noqa: F401  (BLAS preload before mlx)
from tqstore.models import load_smollm2
from tqstore.paged import install


@pytest.fixture(scope="session")
def smollm2():
    loaded = load_smollm2()
    install(loaded.model)
    return loaded
