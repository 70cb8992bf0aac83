"""Daemon-level reliability harnesses (issue 17): a real `tqstore serve` subprocess on loopback
driven by many client processes.

- daemon_proc: start, watch (RSS, open fds), kill and stop the daemon process; `tqstore check`.
- workload: the shared model-like namespace, prompt families and block contents any process
  can recompute, so every byte fetched is verified bitwise.
- load: N clients mixing Lookup / Fetch / Put for T seconds (tools/daemon_load.py).
- crash_rounds: writers Put while the daemon is SIGKILLed; nothing acknowledged may be lost
  (tools/daemon_crash_rounds.py).
- vanishing: clients SIGKILLed or cancelled mid-Put and mid-Fetch; the daemon keeps serving and
  returns to its baseline fds (tools/vanishing_clients.py).

tests/server/test_reliability_small.py runs a small version of each.
"""
