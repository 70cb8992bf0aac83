#!/usr/bin/env bash
# The step kernel's phases (tools/mma_phases.py) in several trees, in ONE device call, the
# trees taking turns in an order that rotates each round: an A/B of kernel branches on the
# GPU's own clock.
#
# Why: a kernel change is read from the launch span and its phases, which move by ~1 us
# between calls and machines; trees timed in one call, taking turns, share the machine's
# state. Each branch travels as a `git archive` copy of its tqstore/ and tools/ (under
# .carry/, ignored by git, carried with the call) and runs its own tools/mma_phases.py (its
# stamps' anchors are its own kernel's). The working tree itself is timed as "worktree".
#
#   here:    bash tools/ab_trees.sh pack BRANCH...      # -> .carry/ab/<branch>, sizes printed
#   device:  carry [".carry/gpu-N", ".carry/ab"] after gpu_suite.sh's receive calls:
#            bash tools/gpu_suite.sh run bash tools/ab_trees.sh run [ROUNDS] [mma_phases args]
#            (default: 2 rounds, --forms step-epilogue; outputs $OUT/phases_<tree>_<round>.txt)
# TQSTORE_AB_DIR moves the copies elsewhere (a path relative to where the script is called).
set -euo pipefail
usage() {
  echo "usage: bash tools/ab_trees.sh pack BRANCH... | run [ROUNDS] [mma_phases args]" >&2
  exit 2
}
AB=${TQSTORE_AB_DIR:-}
[ -z "$AB" ] || case "$AB" in /*) ;; *) AB=$PWD/$AB ;; esac  # before the cd: the caller's
cd "$(dirname "$0")/.."
AB=${AB:-$PWD/.carry/ab}
WORKTREE=worktree

case "${1:-}" in
  pack)
    shift
    [ "$#" -ge 1 ] || usage
    for branch in "$@"; do
      [ "${branch//\//_}" != "$WORKTREE" ] || { echo "ab_trees: '$WORKTREE' names the working tree" >&2
                                             exit 2; }
    done
    if [ -d "$AB" ]; then  # only ever remove a folder this script filled
      for d in "$AB"/*; do
        [ -e "$d" ] || continue
        [ -f "$d/REV" ] || { echo "ab_trees: $AB holds $d, not a packed tree: not removing it" >&2
                             exit 2; }
      done
      rm -rf "$AB"
    fi
    mkdir -p "$AB"
    for branch in "$@"; do
      name=${branch//\//_}
      mkdir -p "$AB/$name"
      git archive "$branch" tqstore tools | tar -x -C "$AB/$name"
      git rev-parse --short "$branch" > "$AB/$name/REV"
    done
    du -sh "$AB"/* ;;
  run)
    shift
    rounds=2
    if [ "$#" -gt 0 ] && [[ $1 != -* ]]; then
      [[ $1 =~ ^[1-9][0-9]*$ ]] || usage
      rounds=$1; shift
    fi
    args=("$@"); [ "${#args[@]}" -gt 0 ] || args=(--forms step-epilogue)
    site=${TQSTORE_GPU_STAGE:-$HOME/tqstore-gpu}/site
    trees=("$WORKTREE")
    for d in "$AB"/*/; do [ -f "$d/REV" ] && trees+=("$(basename "$d")"); done
    n=${#trees[@]}
    for round in $(seq 1 "$rounds"); do
      for k in $(seq 0 $((n - 1))); do  # round r starts at tree r - 1: no fixed first place
        tree=${trees[$(((round - 1 + k) % n))]}
        if [ "$tree" = "$WORKTREE" ]; then
          dir=$PWD; rev=$(git describe --always --dirty 2>/dev/null || echo "$WORKTREE")
        else
          dir=$AB/$tree; rev=$(cat "$dir/REV")
        fi
        out=${OUT:-/tmp}/phases_${tree}_$round.txt
        (cd "$dir" && PYTHONPATH="$site:$dir" timeout 150 python3 tools/mma_phases.py \
           "${args[@]}" > "$out" 2>&1) || echo "$tree round $round: mma_phases failed (see $out)"
        echo "== round $round $tree $rev"
        grep -E "launch span|queries scaled|split-K merge|epilogue:" "$out" || tail -5 "$out"
      done
    done ;;
  *) usage ;;
esac
