"""Loading stock mlx-lm models from local directories, and model fingerprints.

The fingerprint names the weights in every prefix-hash namespace: two models share cached KV
only if their fingerprints match. It must be stable across processes and restarts, so it is a
SHA-256 over file bytes, never a path or a timestamp.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from tqstore.errors import InvalidArgument

_CHUNK = 8 << 20


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # an mlx-lm model (llama.Model for SmolLM2)
    tokenizer: TokenizerWrapper  # what mlx_lm.generate / stream_generate take
    fingerprint: str  # "sha256:<hex>" of the weights (see file_fingerprint / dir_fingerprint)
    path: str


@lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a whole weights file (cached per process by path, size and mtime)."""
    st = os.stat(path)
    return "sha256:" + _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def dir_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over config.json and every weights file (name + full sha256) of a model dir."""
    root = Path(path)
    h = hashlib.sha256(b"tqstore/model-dir/v1\0")
    for f in sorted(root.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".gguf", ".npz"):
            h.update(f.name.encode() + b"\0" + file_fingerprint(f).encode() + b"\0")
    return "sha256:" + h.hexdigest()


ACCEPTED = ("a local mlx-lm model directory (config.json, *.safetensors weights and the "
            "tokenizer files, e.g. from `mlx_lm.convert` or a downloaded Hugging Face snapshot), "
            "or no --model for the bundled SmolLM2-135M-Instruct")


def check_model_dir(path: str | os.PathLike) -> Path:
    """The directory, or InvalidArgument saying what is wrong and what is accepted.

    mlx-lm's `load` treats any path that does not exist as a Hugging Face Hub id: a typo'd path
    failed with the Hub's "Repo id must use alphanumeric chars", and a Hub name with a network
    error (tqstore never downloads). So the checks happen here, before mlx-lm sees the path."""
    root = Path(path).expanduser()
    if not root.exists():
        hub = "" if root.is_absolute() or str(path).startswith(".") else (
            " (Hugging Face Hub names are not downloaded: download the model first and pass "
            "its directory)")
        raise InvalidArgument(f"model {str(path)!r}: no such directory{hub}; expected {ACCEPTED}")
    if not root.is_dir():
        raise InvalidArgument(f"model {str(path)!r} is a file, not a directory; "
                              f"expected {ACCEPTED}")
    missing = [what for what, found in (
        ("config.json", (root / "config.json").is_file()),
        ("*.safetensors weights", any(root.glob("*.safetensors"))),
    ) if not found]
    if missing:
        raise InvalidArgument(f"model directory {str(path)!r} has no {' and no '.join(missing)}; "
                              f"expected {ACCEPTED}")
    return root


def load_model(path: str | os.PathLike) -> LoadedModel:
    """A local mlx-lm model directory (config.json + safetensors + tokenizer files)."""
    from mlx_lm import load

    root = check_model_dir(path)
    model, tokenizer = load(str(root))
    return LoadedModel(model, tokenizer, dir_fingerprint(root), str(root))


def chat_prompt_ids(tokenizer: Any, user_text: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat prompt with the generation prompt appended."""
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_text})
    ids: Sequence[int] = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return [int(t) for t in ids]
