"""`tqstore demo`: its help states the prompt length it runs, and it leaves no temp store."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tqstore.cli import build_parser
from tqstore.cli.demo import DEFAULT_PROMPT_TOKENS
from tqstore.demo import build_prompt
from tqstore.models import load_smollm2


def test_help_names_the_prompt_length_the_demo_builds():
    demo = build_parser().parse_args(["demo"])
    assert demo.prompt_tokens == DEFAULT_PROMPT_TOKENS
    help_text = subprocess.run([sys.executable, "-m", "tqstore.cli", "demo", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert f"(default {DEFAULT_PROMPT_TOKENS})" in " ".join(help_text.split())
    ids = build_prompt(load_smollm2(), DEFAULT_PROMPT_TOKENS)
    # Cut at a whole word: at most one word's tokens short, never over.
    assert DEFAULT_PROMPT_TOKENS - 8 <= len(ids) <= DEFAULT_PROMPT_TOKENS


def test_demo_removes_its_temp_store(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "demo", "--prompt-tokens", "300",
                          "--max-tokens", "2"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    store = re.search(r"starting the daemon on (\S+)", out.stderr).group(1)
    assert store.startswith(str(tmp_path / "tqstore-demo-"))
    assert not os.path.exists(store)
    assert [n for n in os.listdir(tmp_path) if n.startswith("tqstore")] == []
    tokens = int(re.search(r"^prompt tokens\s+(\d+)$", out.stdout, re.M).group(1))
    assert 292 <= tokens <= 300
    assert "outputs identical  yes" in out.stdout
    assert f"      cold: {tokens}/{tokens} tokens" in out.stderr  # prefill progress
