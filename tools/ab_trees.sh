#!/usr/bin/env bash
# The step kernel's phases (tools/mma_phases.py) in several trees, in ONE device call, the
# trees alternating round by round: an A/B of kernel branches on the GPU's own clock.
#
# Why: a kernel change is read from the launch span and its phases, which move by ~1 us
# between calls and machines; trees timed in one call, alternating, share the machine's
# state. Each branch travels as a `git archive` copy (ignored by git, carried with the call)
# and runs its own tools/mma_phases.py (its stamps' anchors are its own kernel's).
#
#   here:    bash tools/ab_trees.sh pack BRANCH...      # -> .carry/ab/<branch>, sizes printed
#   device:  carry [".carry/gpu-N", ".carry/ab"] after gpu_suite.sh's receive calls:
#            bash tools/gpu_suite.sh run bash tools/ab_trees.sh run [ROUNDS] [mma_phases args]
#            (the working tree itself is timed as "main"; outputs in $OUT/phases_<tree>_<k>.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
AB=${TQSTORE_AB_DIR:-.carry/ab}  # (tests point it elsewhere)
case "$AB" in /*) ;; *) AB=$PWD/$AB ;; esac

case "${1:-}" in
  pack)
    shift
    [ "$#" -ge 1 ] || { echo "usage: bash tools/ab_trees.sh pack BRANCH..." >&2; exit 2; }
    case "$AB" in "$PWD"/.carry/*)  # ignored by git, so the copies never get committed
      mkdir -p .git/info
      grep -qxF "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >> .git/info/exclude ;;
    esac
    rm -rf "$AB" && mkdir -p "$AB"
    for branch in "$@"; do
      name=${branch//\//_}
      mkdir -p "$AB/$name"
      git archive "$branch" tqstore tools | tar -x -C "$AB/$name"
      git rev-parse --short "$branch" > "$AB/$name/REV"
    done
    du -sh "$AB"/* ;;
  run)
    shift
    rounds=${1:-2}; [ "$#" -gt 0 ] && shift
    args=("$@"); [ "${#args[@]}" -gt 0 ] || args=(--forms step-epilogue)
    site=${TQSTORE_GPU_STAGE:-$HOME/tqstore-gpu}/site
    trees=(main); for d in "$AB"/*/; do [ -d "$d" ] && trees+=("$(basename "$d")"); done
    for round in $(seq 1 "$rounds"); do
      for tree in "${trees[@]}"; do
        dir=$PWD; [ "$tree" = main ] || dir=$AB/$tree
        out=${OUT:-/tmp}/phases_${tree}_$round.txt
        (cd "$dir" && PYTHONPATH="$site:$dir" timeout 150 python3 tools/mma_phases.py "${args[@]}" \
           > "$out" 2>&1) || echo "$tree round $round: mma_phases failed (see $out)"
        echo "== round $round $tree $(cat "$dir/REV" 2>/dev/null || git rev-parse --short HEAD)"
        grep -E "launch span|queries scaled|split-K merge|epilogue:" "$out" || tail -5 "$out"
      done
    done ;;
  *) echo "usage: bash tools/ab_trees.sh pack BRANCH... | run [ROUNDS] [mma_phases args]" >&2
     exit 2 ;;
esac
