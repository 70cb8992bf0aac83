"""Build the C kernels (tq_attention.c, tq_quantize.c, tq_softmax.c, tq_common.h) and the
same-host reader's read-and-verify loop (tq_read.c) into one shared library at first use and
load it with ctypes.

Why at first use and not at install: the library is plain C with no Python or MLX headers, so
any C compiler builds it in about a second, and building on the machine that runs it lets the
compiler target that CPU (-march=native) without a wheel per CPU. The result is cached under
``$TQSTORE_NATIVE_CACHE`` (default ``~/.cache/tqstore/native``), keyed by the source, the
compiler's identity, the flags and the CPU, so a changed source or another machine sharing a
home directory never loads a stale or foreign build. Concurrent first uses each compile into a
private temp file and rename it into place (atomic; the results are identical).

Floating-point flags are part of the kernels' contract: -ffp-contract=off and no fast-math keep
every float32 operation of tq_quantize a single correctly rounded IEEE operation, which is what
makes it byte-identical to the codec (tqstore/native/tq_quantize.c).

No compiler, a failed build or ``TQSTORE_NATIVE=0``: ``load()`` returns None with the reason in
``unavailable_reason()``, and the callers run the pure-MLX reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("tqstore.native")

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "tq_attention.c", HERE / "tq_quantize.c", HERE / "tq_softmax.c",
           HERE / "tq_read.c"]
HEADERS = [HERE / "tq_common.h"]
BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
              "-fno-math-errno", "-Wall"]
_NATIVE_FLAGS = {"x86_64": ["-march=native"], "AMD64": ["-march=native"],
                 "arm64": ["-mcpu=native"], "aarch64": ["-mcpu=native"]}

_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("TQSTORE_NATIVE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tqstore" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features",
                                                                    "CPU part", "CPU implementer")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_identity(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cc


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile into ``out`` atomically; None on success, else the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"{cc} exited {proc.returncode}"
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cc}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    lib.tq_decode_attention.argtypes = [p] * 9 + [i] * 11 + [p, p]
    lib.tq_decode_attention.restype = i
    lib.tq_decode_step_rows.argtypes = [p, f] + [p] * 16 + [i] * 9 + [p]
    lib.tq_decode_step_rows.restype = i
    lib.tq_quantize.argtypes = [p, i, l, i, i, i, i, i, p, p, p, f, p, p, i]
    lib.tq_quantize.restype = i
    lib.tq_dequantize_rows.argtypes = [p, p, p, i, i, l, p]
    lib.tq_dequantize_rows.restype = i
    lib.tq_softmax_rows.argtypes = [p, i, i, i, i, i]
    lib.tq_softmax_rows.restype = i
    q = ctypes.c_int64
    lib.tq_read_verify.argtypes = [i, q, p, p, q, p, p, q, p, p, p, p, p]
    lib.tq_read_verify.restype = q
    return lib


def _build_and_load() -> ctypes.CDLL | str:
    if os.environ.get("TQSTORE_NATIVE", "1") == "0":
        return "disabled by TQSTORE_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return "no C compiler found (set CC, or install gcc or clang)"
    source = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    attempts = [BASE_FLAGS + _NATIVE_FLAGS.get(platform.machine(), []), BASE_FLAGS]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(),
                                         _compiler_identity(cc).encode(),
                                         platform.machine().encode(),
                                         _cpu_identity().encode()])).hexdigest()[:20]
        path = cache_dir() / f"tq_cpu-{key}.so"
        if not path.exists():
            error = _compile(cc, flags, path)
            if error is not None:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
        try:
            return _declare(ctypes.CDLL(str(path)))
        except OSError as exc:
            errors.append(f"loading {path}: {exc}")
    return "build failed: " + " | ".join(errors)


def load() -> ctypes.CDLL | None:
    """The loaded library (built once per process at most), or None if it is unavailable."""
    if "lib" not in _state:
        result = _build_and_load()
        if isinstance(result, str):
            _state["lib"], _state["reason"] = None, result
            log.warning("tqstore CPU kernels unavailable, the pure-MLX reference serves: %s", result)
        else:
            _state["lib"], _state["reason"] = result, None
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    load()
    return _state.get("reason")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library and the reason (tests switch TQSTORE_NATIVE or CC)."""
    _state.clear()
