"""The bundled SmolLM2-135M-Instruct (GGUF, tqstore.models.smollm2) written out as a standard
mlx-lm model directory, so stock `mlx_lm.server --model DIR` and our endpoint run the same
weights side by side.

The directory holds config.json, model.safetensors (dense weights under mlx-lm's parameter
names), the Hugging Face tokenizer files (chat template included) and EXPORT_MARKER, which
records what it was built from. Invariants:
- A directory at the destination path is always complete: it is written under a hidden temp
  name in the same parent and renamed into place (rename is atomic within one filesystem), so
  a crash leaves at most a hidden ``.NAME.tmp-*`` directory, never a half model that loads.
- ``mlx_lm.load(DIR)`` builds the very llama.Model that ``load_smollm2(dtype=...)`` builds:
  the same ModelArgs (rope_traditional=True for GGUF's interleaved Q/K rows, eps as the same
  float) and the same dequantized arrays, so the logits are bitwise equal (tests/models).
- A directory is replaced only if it is empty or carries EXPORT_MARKER: an export never
  deletes a directory it did not write.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
from mlx_lm.models import llama

from tqstore.errors import InvalidArgument
from tqstore.models.loader import file_fingerprint
from tqstore.models.smollm2 import dense_weights, model_args, smollm2_gguf_path
from tqstore.models.tokenizer import tokenizer_from_gguf

MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DIR_ENV = "TQSTORE_MODEL_DIR"
EXPORT_MARKER = "tqstore_export.json"
# Bump when the directory's contents change for the same GGUF: bundled dirs then rebuild.
EXPORT_FORMAT = 1
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_model_dir() -> Path:
    """Where `bundled_model_dir()` keeps the export: $TQSTORE_MODEL_DIR, else the user cache."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tqstore" / "models" / MODEL_NAME


def _dtype_name(dtype: mx.Dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise InvalidArgument(f"dtype {dtype} is not one of {', '.join(DTYPES)}")


def _marker(gguf: str, dtype: mx.Dtype) -> dict[str, Any]:
    return {"source": os.path.basename(gguf), "source_fingerprint": file_fingerprint(gguf),
            "dtype": _dtype_name(dtype), "format": EXPORT_FORMAT}


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _config(args: llama.ModelArgs, metadata: dict) -> dict[str, Any]:
    # ModelArgs' fields as set, unset ones left out (head_dim: hidden/heads in mlx-lm and HF;
    # layer_types: derived in __post_init__), so mlx_lm.load builds equal ModelArgs.
    config = {k: v for k, v in dataclasses.asdict(args).items()
              if v is not None and k != "layer_types"}
    # HF fields beside mlx-lm's: mlx_lm.load hands eos_token_id to the tokenizer wrapper.
    config.update(
        architectures=["LlamaForCausalLM"],
        bos_token_id=int(metadata["tokenizer.ggml.bos_token_id"].item()),
        eos_token_id=int(metadata["tokenizer.ggml.eos_token_id"].item()),
        pad_token_id=int(metadata["tokenizer.ggml.padding_token_id"].item()),
        hidden_act="silu",
    )
    return config


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(tmp: Path, gguf: str, dtype: mx.Dtype) -> None:
    tensors, metadata = mx.load(gguf, return_metadata=True)
    args = model_args(metadata)
    weights = dense_weights(tensors, dtype)
    del tensors
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights
    (tmp / "config.json").write_text(json.dumps(_config(args, metadata), indent=2) + "\n")
    tokenizer_from_gguf(metadata).save_pretrained(str(tmp))
    # transformers 5 names its own class ("TokenizersBackend"), unknown to transformers 4;
    # both read "PreTrainedTokenizerFast" as tokenizer.json taken as written.
    tokenizer_config = tmp / "tokenizer_config.json"
    fields = json.loads(tokenizer_config.read_text())
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
    # Written last: a marker names a directory whose other files are all written.
    (tmp / EXPORT_MARKER).write_text(json.dumps(_marker(gguf, dtype), indent=2) + "\n")
    _fsync_tree(tmp)


def _replaceable(root: Path) -> bool:
    return root.is_dir() and (not any(root.iterdir()) or (root / EXPORT_MARKER).exists())


def _install(tmp: Path, out: Path) -> None:
    """Rename tmp to out. An existing out (checked replaceable by the caller) is first renamed
    aside, then deleted: a reader finds the old complete directory, for an instant none, or
    the new one, never a mix (Linux has no portable atomic swap of two directories)."""
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, aside / "old")
        os.rename(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, out)  # fails (ENOTEMPTY/EEXIST) if another exporter got there first
    _fsync_dir(out.parent)


def _check_destination(out: Path) -> None:
    if out.exists() and not _replaceable(out):
        what = "a file" if not out.is_dir() else "a non-empty directory tqstore did not write"
        raise InvalidArgument(f"{str(out)!r} is {what} (no {EXPORT_MARKER}); "
                              f"choose another directory or remove it")


def export_smollm2(out_dir: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> Path:
    """Write the bundled SmolLM2 as an mlx-lm model directory at out_dir (always anew;
    `bundled_model_dir` is the idempotent form). Returns the absolute directory."""
    out = Path(out_dir).expanduser().absolute()
    _dtype_name(dtype)
    _check_destination(out)
    gguf = smollm2_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the directory gets the umask's usual mode, not mkdtemp's 0700.
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        _write(tmp, gguf, dtype)
        _check_destination(out)  # again: something may have appeared while we wrote
        try:
            _install(tmp, out)
        except OSError as exc:
            # Another exporter renamed its directory into place between our check and our
            # rename: the loser uses the winner's directory if it is what we were writing.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not is_current_export(
                    out, dtype):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current_export(root: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> bool:
    """Whether root holds an export of the installed GGUF at dtype in the current format."""
    return _read_marker(Path(root)) == _marker(smollm2_gguf_path(), dtype)


@contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """One exporter per destination at a time (across processes). The lock file lives beside
    the directory, not in it, so it survives the directory's replacement."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_export(out_dir: str | os.PathLike,
                  dtype: mx.Dtype = mx.float32) -> tuple[Path, bool]:
    """(out_dir, whether this call wrote it), out_dir holding the current export at dtype:
    returned at once if its marker matches, else (re)written. Concurrent callers serialize on
    a lock beside out_dir; the ones that waited find the winner's directory current and use
    it."""
    out = Path(out_dir).expanduser().absolute()
    if is_current_export(out, dtype):
        return out, False
    with _export_lock(out):
        if is_current_export(out, dtype):
            return out, False
        return export_smollm2(out, dtype), True


def bundled_model_dir(root: str | os.PathLike | None = None) -> Path:
    """The embedded default as an mlx-lm model directory (fp32), exported on first use:
    root, else $TQSTORE_MODEL_DIR, else ~/.cache/tqstore/models/SmolLM2-135M-Instruct.
    Rebuilt when its marker does not match the installed GGUF's sha256 (or dtype/format)."""
    return ensure_export(default_model_dir() if root is None else root, mx.float32)[0]
