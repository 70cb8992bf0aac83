"""Small versions of the daemon-level reliability tools (tools/daemon_load.py,
tools/daemon_crash_rounds.py, tools/vanishing_clients.py): a real `tqstore serve` subprocess on
loopback, real client processes, real SIGKILLs. Each run is seeded from the test's seed, so a
failure replays with TQSTORE_TEST_SEED."""

from tqstore.reliability.crash_rounds import run_crash_rounds
from tqstore.reliability.load import run_load
from tqstore.reliability.vanishing import run_vanishing


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
