#!/usr/bin/env bash
# MLX's CUDA graph limits against a batched decode step (issue 15: the host's time inside
# mx.async_eval when pipelined). MLX's CUDA backend cuts a stream's work into CUDA graphs of
# at most MLX_MAX_OPS_PER_BUFFER ops or MLX_MAX_MB_PER_BUFFER Mi input *elements* (every input
# of an op counts whole: our step kernel's inputs include a layer's page arenas), and
# mx.async_eval waits for a graph to finish whenever more than 10 are in flight. Both limits
# are read once per process, so each setting is its own run of tools/batch_decode_gpu.py.
#
#   bash tools/graph_limits_gpu.sh count OUTDIR [batch_decode_gpu args]  # graphs per step
#   bash tools/graph_limits_gpu.sh time OUTDIR ROUNDS [batch_decode_gpu args]
#
# Settings: default (H100: 100 ops, 1000 Mi elements), mb (elements unlimited), mbops
# (both unlimited). `time` runs every setting ROUNDS times, the settings' order rotated per
# round, and stops starting runs after TQSTORE_GRAPH_LIMIT_S seconds (default 500) so a device
# call returns what it measured. TQSTORE_GRAPH_SETTINGS picks settings (default: all three).
# Each run's log and JSON land in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 count OUTDIR [args] | time OUTDIR ROUNDS [args]" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1 out=$2
shift 2
case $mode in count|time) ;; *) usage ;; esac
mkdir -p "$out"
read -ra SETTINGS <<< "${TQSTORE_GRAPH_SETTINGS:-default mb mbops}"
for name in "${SETTINGS[@]}"; do
  case $name in
    default|mb|mbops) ;;
    *) echo "unknown setting $name (default, mb, mbops)" >&2; exit 2 ;;
  esac
done
BIG=1000000000
start=$SECONDS

with_setting() {  # with_setting NAME CMD...: run CMD under setting NAME's environment
  local name=$1
  shift
  case $name in
    default) "$@" ;;
    mb) MLX_MAX_MB_PER_BUFFER=$BIG "$@" ;;
    mbops) MLX_MAX_MB_PER_BUFFER=$BIG MLX_MAX_OPS_PER_BUFFER=$BIG "$@" ;;
  esac
}

case $mode in
  count)
    for name in "${SETTINGS[@]}"; do
      echo "== graphs per step, setting $name"
      with_setting "$name" python3 tools/batch_decode_gpu.py --graphs "$out/dots-$name" \
        --json "$out/graphs-$name.json" "$@" 2>&1 | tee "$out/graphs-$name.log" \
        | grep -E "graphs/step|ops/step|Error|error"
    done ;;
  time)
    [ $# -ge 1 ] || usage
    rounds=$1
    shift
    for ((r = 0; r < rounds; r++)); do
      for ((i = 0; i < ${#SETTINGS[@]}; i++)); do
        name=${SETTINGS[$(((i + r) % ${#SETTINGS[@]}))]}
        if ((SECONDS - start > ${TQSTORE_GRAPH_LIMIT_S:-500})); then
          echo "stopped before round $r setting $name: $((SECONDS - start)) s spent"
          exit 0
        fi
        echo "== round $r setting $name ($((SECONDS - start)) s)"
        with_setting "$name" python3 tools/batch_decode_gpu.py --json "$out/time-$name-$r.json" \
          "$@" 2>&1 | tee "$out/time-$name-$r.log" \
          | grep -E "^\[.{8}\] +[0-9]+ +[0-9]+ |slowest|Error|error"
      done
    done ;;
esac
