"""`tqstore demo`: the daemon and `tqstore openai` as real processes, two agents over a shared
system prompt; every turn says where its prompt came from; after the endpoint's restart turn 1 is
a daemon hit; the temp store and the logs are removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tqstore.cli import build_parser
from tqstore.cli.demo import DEMO

ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+'", re.M)


def test_defaults_are_the_demo_workload_and_every_option_says_its_default():
    args = build_parser().parse_args(["demo"])
    assert (args.turns, args.system_tokens, args.task_tokens, args.tool_tokens,
            args.max_tokens) == (DEMO.turns, DEMO.system_tokens, DEMO.task_tokens,
                                 DEMO.tool_tokens, DEMO.max_tokens)
    help_text = " ".join(subprocess.run(
        [sys.executable, "-m", "tqstore.cli", "demo", "--help"], capture_output=True, text=True,
        timeout=120).stdout.split())
    for value in (DEMO.turns, DEMO.system_tokens, DEMO.task_tokens, DEMO.tool_tokens,
                  DEMO.max_tokens):
        assert f"(default {value})" in help_text


def test_demo_shows_each_tier_and_removes_its_temp_store(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "demo", "--turns", "2",
                          "--system-tokens", "300", "--task-tokens", "64", "--tool-tokens", "48",
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    store = re.search(r"starting the daemon on (\S+):", out.stderr).group(1)
    assert store.startswith(str(tmp_path / "tqstore-demo-"))
    assert [n for n in os.listdir(tmp_path) if n.startswith("tqstore")] == []  # store and logs
    rows = [tuple(int(x) if i != 3 else float(x) for i, x in enumerate(m))
            for m in ROW.findall(out.stdout)]
    assert len(rows) == 4 + 2, out.stdout  # 2 agents x 2 turns, then turn 1 of each again
    first, replay = rows[:4], rows[4:]
    for agent, turn, prompt, ttft, memory, daemon, computed in rows:
        assert memory + daemon + computed == prompt and ttft > 0
    by_key = {(r[0], r[1]): r for r in first}
    assert by_key[(1, 1)][4:6] == (0, 0)  # nothing cached on a fresh store
    # Agent 2 starts once agent 1's first turn ended: the shared system prompt is in memory.
    assert by_key[(2, 1)][4] >= 256
    assert by_key[(1, 2)][4] >= by_key[(1, 1)][2] - 16  # turn 2 extends turn 1's transcript
    agent1 = next(r for r in replay if r[0] == 1)
    assert agent1[4] == 0 and agent1[5] >= 256  # a fresh endpoint: the prefix is the daemon's
    assert re.search(r"agent 1 turn 1: .* same answer: yes", out.stdout)
