"""`tqstore generate`: what --model accepts, said plainly; prefill progress on stderr."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from tqstore.cli.progress import PrefillProgress
from tqstore.demo import demo_document
from tqstore.errors import InvalidArgument
from tqstore.models.loader import check_model_dir


def _generate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tqstore.cli", "generate", "--server", "none",
                           *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_a_missing_model_directory_says_what_is_accepted(tmp_path):
    out = _generate("--model", "/nonexistent", "--prompt", "hi")
    assert out.returncode == 2
    assert "model '/nonexistent': no such directory" in out.stderr
    assert "config.json" in out.stderr and "safetensors" in out.stderr
    assert "bundled SmolLM2" in out.stderr
    assert "Repo id" not in out.stderr and "Traceback" not in out.stderr
    # A Hub name is not fetched (no network call, no Hub error): the message says so.
    hub = _generate("--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--prompt", "hi",
                    cwd=tmp_path)
    assert hub.returncode == 2 and "Hugging Face Hub names are not downloaded" in hub.stderr
    assert "Traceback" not in hub.stderr


def test_a_directory_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match=r"has no config\.json and no \*\.safetensors"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match=r"has no \*\.safetensors weights; expected a local"):
        check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_model_dir(tmp_path) == tmp_path
    with pytest.raises(InvalidArgument, match="is a file, not a directory"):
        check_model_dir(tmp_path / "config.json")


def test_prefill_progress_goes_to_stderr_as_plain_lines(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(demo_document().split(" ")[:600]))  # > 2 store blocks
    out = _generate("--raw", "--prompt-file", str(prompt), "--max-tokens", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    total = int(re.search(r"prompt tokens (\d+)", out.stderr).group(1))
    assert total > 512
    lines = re.findall(r"^prefill: (\d+)/(\d+) tokens, [\d.]+ s$", out.stderr, re.M)
    assert lines and lines[-1] == (str(total), str(total))  # the last line always comes
    assert "\r" not in out.stderr  # not a terminal: no bar redrawn in place
    assert "prefill" not in out.stdout  # stdout carries only the generated text
    # Where TTFT went, by phase (no daemon here: no fetch, no restore to speak of).
    ttft, fetch, restore, rest = map(float, re.search(
        r"TTFT ([\d.]+) s \(fetch ([\d.]+), restore ([\d.]+), prefill ([\d.]+)\)",
        out.stderr).groups())
    assert rest > 0 and abs(fetch + restore + rest - ttft) <= 0.025  # four values printed to 0.01


def test_progress_on_a_terminal_redraws_one_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = PrefillProgress("cold", stream=stream)
    progress._last -= 1.0  # the first update is due
    progress(256, 1024)
    progress(1024, 1024)
    first, last = stream.getvalue().split("\r")[1:]
    assert first.startswith("cold [" + "#" * 7 + "-" * 23 + "] 256/1024 tokens")
    assert "\n" not in first  # redrawn in place until the prefill ends
    assert last.startswith("cold [" + "#" * 30 + "] 1024/1024 tokens") and last.endswith(" s\n")
