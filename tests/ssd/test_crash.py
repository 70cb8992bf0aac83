"""A writer subprocess killed with SIGKILL at random moments during puts, >= 20 times: after each
reopen every acknowledged block reads back bitwise, lookups cover every acknowledged prefix, no
temp file survives and check finds nothing torn. (tools/ssd_crash_soak.py runs many more.)"""

from tqstore.ssd.soak import run_soak


def test_sigkill_during_puts_loses_nothing_acknowledged(tmp_path):
    res = run_soak(str(tmp_path / "soak"), iterations=22, seed=12345, max_run_s=0.35,
                   deep_check_every=4)
    assert res.failures == []
    assert res.iterations == 22
    assert res.acked_blocks > 50  # the writer really was writing when killed
    assert res.verified_blocks >= res.acked_blocks
