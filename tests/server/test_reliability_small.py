"""Small versions of the daemon-level reliability tools (tools/daemon_load.py,
tools/daemon_crash_rounds.py, tools/vanishing_clients.py): a real `tqstore serve` subprocess on
loopback, real client processes, real SIGKILLs. Each run is seeded from the test's seed, so a
failure replays with TQSTORE_TEST_SEED."""

import pytest

from tqstore.config import ServerConfig, StoreConfig
from tqstore.daemon import Daemon
from tqstore.reliability.crash_rounds import run_crash_rounds
from tqstore.reliability.load import run_load
from tqstore.reliability.vanishing import MAX_HEAVY, check_heavy_slots_free, run_vanishing


def test_load_small_has_no_errors_and_verifies_every_fetch(tmp_path, random_seed):
    s = run_load(tmp_path, clients=6, seconds=4.0, seed=random_seed, max_gib=2.0, workers=16)
    assert s["errors"] == {}, s["problems"]
    assert (s["lost"], s["short"], s["wrong"]) == (0, 0, 0), s["problems"]
    # Every call type ran, and fetches went both ways a same-host client fetches.
    assert all(s["calls"][c]["n"] > 0 for c in ("lookup", "fetch", "put")), s["calls"]
    assert s["fetched_mb"] > 0 and s["put_mb"] > 0
    assert s["daemon_serving"] and s["daemon_exit"] == 0 and s["check_exit"] == 0, s["check"]
    assert s["rss_samples"] > 0 and s["ok"]


def test_crash_rounds_lose_nothing_acknowledged(tmp_path, random_seed):
    res = run_crash_rounds(tmp_path, rounds=3, writers=4, seed=random_seed, max_run_s=1.0)
    assert res.failures == []
    assert res.rounds == 3
    assert (res.lost, res.wrong) == (0, 0)
    # The writers were cut by the crash (not by a bug of their own) and had acknowledged blocks,
    # all of which were read back.
    assert set(res.writer_ends) == {"UNAVAILABLE"}, res.writer_ends
    assert res.acked_blocks > 0 and res.verified_blocks >= res.acked_blocks


def test_vanishing_clients_leave_no_partial_put_and_no_leaked_fds(tmp_path, random_seed):
    res = run_vanishing(tmp_path, rounds=5, concurrent=2, seed=random_seed, max_delay_s=0.8)
    assert res.failures == []
    assert sum(res.victims.values()) == 10 and res.victims["kill-heavy"] == 2
    assert (res.lost, res.partial, res.wrong, res.serving_failures) == (0, 0, 0, 0)
    assert res.fds_end <= res.fds_baseline
    assert res.put_families > 0


@pytest.mark.parametrize("slots, failure", [
    (MAX_HEAVY, None),
    (MAX_HEAVY - 1, "heavy Puts refused: a heavy slot leaked"),  # as if a vanished client kept one
    (MAX_HEAVY + 1, "a heavy call was admitted"),  # as if the limit let one more through
])
def test_heavy_slot_check_fails_on_a_leaked_or_missing_slot(tmp_path, slots, failure):
    """The vanishing run's last check retries an attempt a racing probe spoiled; a daemon with
    one heavy slot fewer or more than MAX_HEAVY must still fail it, every attempt."""
    daemon = Daemon(ServerConfig(path=str(tmp_path / "kv"), listen="127.0.0.1:0",
                                 drain_seconds=1, max_heavy_requests=slots,
                                 store=StoreConfig(max_bytes=64 << 20, map_size=64 << 20))).start()
    try:
        found = check_heavy_slots_free(daemon.address, attempts=2, probe_s=1.0)
    finally:
        daemon.stop(grace=0)
    if failure is None:
        assert found is None
    else:
        assert found is not None and failure in found, found
