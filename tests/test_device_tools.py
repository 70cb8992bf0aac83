"""The device benchmark tools run their CPU paths here: tools/attention_e2e.py end to end on a
tiny model (prefill and synthetic-context modes) and tools/launch_overhead.py's refusal without
a GPU backend. Their numbers come from the GPU machine (docs/BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", [[], ["--synthetic"]], ids=["prefill", "synthetic"])
def test_attention_e2e_runs_every_row_on_a_tiny_model(mode, tmp_path):
    out = tmp_path / "e2e.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools/attention_e2e.py"), "--small",
                          "--context", "40", "--steps", "2", "--warmup", "2", "--layers", "2",
                          "--skip-reference", "--json", str(out), *mode],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["synthetic"] == bool(mode) and result["context"] == 40
    assert set(result["tokens_per_s"]) == {"fp16", "tq-kernels", "tq-kernels-tail"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert set(result["tokens_per_s_pipelined"]) == set(result["tokens_per_s"])
    assert all(v > 0 for v in result["tokens_per_s_pipelined"].values())


def test_launch_overhead_refuses_without_a_gpu():
    res = subprocess.run([sys.executable, str(ROOT / "tools/launch_overhead.py")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no GPU backend" in res.stderr
