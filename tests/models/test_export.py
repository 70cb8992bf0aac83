"""`tqstore export-model`: the bundled SmolLM2 as an mlx-lm model directory that stock
`mlx_lm.load` turns into the very model `load_smollm2()` builds (logits bitwise equal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tqstore import cli
from tqstore.models import load_model, load_smollm2
from tqstore.models.export import (EXPORT_MARKER, MODEL_DIR_ENV, bundled_model_dir,
                                   export_smollm2, is_current_export)
from tqstore.models.loader import check_model_dir, file_fingerprint
from tqstore.models.smollm2 import smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "How many legs do 12 spiders have? Think: 12 x 8."}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_smollm2(tmp_path_factory.mktemp("export") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def stock(exported):
    """The exported directory as stock mlx-lm loads it."""
    return load_model(exported)


def _leftovers(parent: Path) -> list[str]:
    """Hidden temp or set-aside directories an export left behind (the lock file may stay)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir())


def test_directory_is_a_standard_mlx_lm_model(exported):
    assert check_model_dir(exported) == exported
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            EXPORT_MARKER} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert (config["rope_theta"], config["tie_word_embeddings"], config["vocab_size"],
            config["max_position_embeddings"], config["eos_token_id"]) == (
                100000.0, True, 49152, 8192, 2)
    weights, metadata = mx.load(str(exported / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"} and len(weights) == 2 + 30 * 9
    assert {w.dtype for w in weights.values()} == {mx.float32}
    assert "lm_head.weight" not in weights  # tied to model.embed_tokens
    marker = json.loads((exported / EXPORT_MARKER).read_text())
    assert marker["source_fingerprint"] == file_fingerprint(smollm2_gguf_path())
    assert _leftovers(exported.parent) == []


def test_mlx_lm_load_gives_bitwise_the_same_logits(stock):
    """Bitwise, not close: both sides run llama.Model with equal ModelArgs (eps is the GGUF's
    float32 1e-5 as the same Python float, JSON round-trips it exactly) on the same
    mx.dequantize output, stored and read back as fp32 safetensors without conversion."""
    ours = load_smollm2()
    assert stock.model.args == ours.model.args
    ids = mx.array(ours.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))[None]
    a, b = stock.model(ids), ours.model(ids)
    assert a.shape == (1, ids.shape[1], 49152)
    assert mx.array_equal(a, b).item()


def test_tokenizer_matches_the_gguf_tokenizer(stock):
    ours, stock = load_smollm2().tokenizer, stock.tokenizer
    want = ours.apply_chat_template(CHAT, add_generation_prompt=True)
    got = stock.apply_chat_template(CHAT, add_generation_prompt=True)
    assert list(got) == list(want) and len(want) > 30
    assert stock.eos_token == "<|im_end|>" and stock.eos_token_id == ours.eos_token_id == 2
    assert stock.eos_token_ids == ours.eos_token_ids == {2}
    text = "Paris, 2026: $12.50 each"
    assert stock.encode(text) == ours.encode(text) and stock.decode(stock.encode(text)) == text


def test_bundled_model_dir_is_idempotent(exported, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    assert bundled_model_dir(exported) == exported
    monkeypatch.setenv(MODEL_DIR_ENV, str(exported))
    assert bundled_model_dir() == exported
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before


def test_bundled_model_dir_rebuilds_on_a_stale_marker(exported):
    marker = exported / EXPORT_MARKER
    stale = {**json.loads(marker.read_text()), "source_fingerprint": "sha256:" + "0" * 64}
    marker.write_text(json.dumps(stale))
    weights_inode = (exported / "model.safetensors").stat().st_ino
    assert not is_current_export(exported)
    assert bundled_model_dir(exported) == exported
    assert is_current_export(exported)
    assert (exported / "model.safetensors").stat().st_ino != weights_inode  # written anew
    assert _leftovers(exported.parent) == []


def test_an_export_never_replaces_a_directory_it_did_not_write(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["export-model", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tqstore: error: ") and "did not write" in err and err.count("\n") == 1
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert cli.main(["export-model", "--dtype", "float16"]) == 2
    assert "needs --out" in capsys.readouterr().err


def test_cli_prints_the_directory_and_exports_other_dtypes(exported, tmp_path, capsys):
    assert cli.main(["export-model", "--out", str(exported)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{exported}\n" and "up to date" in err
    half = tmp_path / "f16"
    assert cli.main(["export-model", "--out", str(half), "--dtype", "float16"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{half}\n" and "exported" in err
    name = "model.layers.7.mlp.down_proj.weight"
    w16 = mx.load(str(half / "model.safetensors"))[name]
    w32 = mx.load(str(exported / "model.safetensors"))[name]
    assert w16.dtype == mx.float16 and mx.array_equal(w16, w32.astype(mx.float16)).item()
    assert is_current_export(half, mx.float16) and not is_current_export(half, mx.float32)


def test_two_processes_exporting_at_once_share_one_directory(tmp_path):
    """Both start on a missing directory: one exports, the other waits on the lock and uses
    the winner's directory (python -m tqstore.cli: the real command line)."""
    out = tmp_path / "shared" / "SmolLM2-135M-Instruct"
    env = {**os.environ, "TQSTORE_MODEL_DIR": str(out)}
    procs = [subprocess.Popen([sys.executable, "-m", "tqstore.cli", "export-model"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [(o, rc) for o, _, rc in results] == [(f"{out}\n", 0)] * 2, results
    assert sorted("exported" in e for _, e, _ in results) == [False, True], results
    assert is_current_export(out) and _leftovers(out.parent) == []
