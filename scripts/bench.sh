#!/usr/bin/env bash
# Runs every benchmark of the project and collects the results in bench-results/:
#   - each benches/NAME.rs (declared with `harness = false`) via `cargo bench --bench NAME`; a bench
#     writes its own bench-results/NAME.txt (ratios against a baseline measured in the same run);
#   - each scripts/bench-*.sh (e.g. bench-pull.sh → bench-results/pull.txt).
# Output of each run goes to bench-results/logs/NAME.log. One failing benchmark does not stop the
# others; the exit status is non-zero if any failed, and bench-results/summary.txt lists them all.
#
#   scripts/bench.sh                 all benchmarks (what `make bench` runs)
#   scripts/bench.sh pull fs_read    only those names (bench-pull.sh is "pull")
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=$REPO/bench-results
mkdir -p "$RESULTS/logs"
cd "$REPO"

ONLY=("$@")
# True when NAME was asked for (or nothing was, meaning everything).
wanted() {
  [ ${#ONLY[@]} -eq 0 ] && return 0
  local w
  for w in "${ONLY[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

declare -a SUMMARY
failed=0
run_one() {
  local name=$1; shift
  local t0 t1 rc
  echo "== $name: $*" >&2
  t0=$(date +%s)
  "$@" >"$RESULTS/logs/$name.log" 2>&1; rc=$?
  t1=$(date +%s)
  if [ $rc -eq 0 ]; then SUMMARY+=("ok      $name ($((t1 - t0)) s)"); else
    SUMMARY+=("FAILED  $name (exit $rc, see bench-results/logs/$name.log)"); failed=1
    tail -n 15 "$RESULTS/logs/$name.log" >&2
  fi
}

shopt -s nullglob
for f in benches/*.rs; do
  name=$(basename "$f" .rs)
  if wanted "$name"; then
    run_one "$name" cargo bench --bench "$name"
  fi
done
for f in scripts/bench-*.sh; do
  name=$(basename "$f" .sh); name=${name#bench-}
  if wanted "$name"; then
    run_one "$name" bash "$f"
  fi
done

{
  echo "# bench.sh $(date -u +%FT%TZ)"
  printf '%s\n' "${SUMMARY[@]}"
  for r in "$RESULTS"/*.txt; do
    [ "$(basename "$r")" = summary.txt ] && continue
    echo; echo "## $(basename "$r")"; cat "$r"
  done
} >"$RESULTS/summary.txt"
cat "$RESULTS/summary.txt"
exit $failed
