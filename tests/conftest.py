"""Import tqstore before anything imports MLX, so every test process runs on the same BLAS
(tqstore loads OpenBLAS ahead of MLX on Linux). Numerics, and so near-tie greedy choices of a
4-bit cache, depend on the BLAS: a test file that imported mlx first would run on MLX's
reference BLAS and could see other tokens than the CLI does."""

import tqstore  # noqa: F401  (must stay the first import)


import pytest  # noqa: E402

from tests.seeding import SEED_ENV, seeded_rng, start_test  # noqa: E402


@pytest.fixture(autouse=True)
def random_seed(request) -> int:
    """One seed per test for numpy (through `rng`/`seeded_rng`) and MLX's global generator; a
    failure report names it (pytest_runtest_makereport below)."""
    import mlx.core as mx

    seed = start_test()
    mx.random.seed(seed)
    request.node.user_properties.append(("random seed", seed))
    return seed


@pytest.fixture(autouse=True)
def attention_routing_restored():
    """Each test leaves attention routing (tqstore.paged.install) as it found it. Routing is
    process-wide: a test that routes a model and never removes it, or removes routing that a
    session fixture installed (uninstall restores every patched module), changes what later
    tests in the same process see, and which tests those are depends on xdist's scheduling
    (a GPU suite run failed on one). The patched modules' functions, the originals and the
    caches' flag are put back exactly."""
    import sys

    from tqstore.paged import integration
    from tqstore.paged.cache import PagedLayerCache

    saved = dict(integration._originals)
    current = {name: getattr(sys.modules[name], integration._ATTR) for name in saved}
    routed = PagedLayerCache.attention_routed
    yield
    for name, original in integration._originals.items():
        if name not in saved:  # routed by the test: the module's own function again
            setattr(sys.modules[name], integration._ATTR, original)
    for name, function in current.items():
        setattr(sys.modules[name], integration._ATTR, function)
    integration._originals.clear()
    integration._originals.update(saved)
    PagedLayerCache.attention_routed = routed


def _devices() -> list[str]:
    import mlx.core as mx

    return ["cpu"] + (["gpu"] if mx.cuda.is_available() or mx.metal.is_available() else [])


@pytest.fixture(params=_devices())
def device(request):
    """Run the test on each device this machine has (the CPU everywhere, and the GPU where there
    is one), as MLX's default device: behaviour that differs by device is tested on both, not
    skipped on one."""
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(getattr(mx, request.param))
    try:
        yield request.param
    finally:
        mx.set_default_device(before)


@pytest.fixture
def rng(random_seed):
    """Fresh random inputs, reproducible with TQSTORE_TEST_SEED=<the seed in the failure>."""
    return seeded_rng()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, seed in item.user_properties:
            if name == "random seed":
                report.sections.append(
                    ("random seed", f"random seed {seed}: replay with {SEED_ENV}={seed}"))


@pytest.fixture
def daemon(tmp_path):
    """A real daemon on loopback over a real LMDB store in a temp dir (tests/server overrides it
    with a smaller store and byte limits)."""
    from tqstore.config import ServerConfig, StoreConfig
    from tqstore.daemon import Daemon

    d = Daemon(ServerConfig(path=str(tmp_path / "kv"), listen="127.0.0.1:0",
                            store=StoreConfig(max_bytes=1 << 30, map_size=1 << 28))).start()
    yield d
    d.stop(grace=2)
