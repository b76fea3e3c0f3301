#!/usr/bin/env bash
# Cold start of the python image optimized by our `ctr-remote image optimize` vs by Go's, in the
# same run, with the plain eStargz conversion (no landmark, no prefetch) as the baseline: the time
# from the start of `ctr-remote image rpull` to the end of the workload in a container, through
# OUR daemon, behind a slow link. Each cell is the median of RUNS fresh pulls (fresh daemon,
# containerd and cache, dropped page cache).
#
# Image: scripts/rootfs.sh's bookworm minbase + python3 (3 layers: base / stdlib / app), gzip.
# Workload (also what each optimize records): python3 /app/imports.py (imports 273 stdlib modules).
# Link: scripts/netlink.sh, RATE (100mbit) and DELAY_MS one way (10 → 20 ms RTT).
#
#   scripts/bench-optimize.sh                 prints a table and writes bench-results/optimize.txt
#   RUNS=5 RATE=20mbit DELAY_MS=5 scripts/bench-optimize.sh
#
# Binaries: DAEMON and CTR_REMOTE (rpull; default target/release/…), OPT_CTR_REMOTE (the one that
# optimizes; default target/release/ctr-remote if it has `optimize`, else target/debug/ctr-remote),
# GO_CTR_REMOTE (/usr/bin/ctr-remote). Needs root, like the tests. Everything it starts (link,
# registry, containerds, daemons, mounts, temp dir) is removed on exit, also on Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NETLINK=$REPO/scripts/netlink.sh
RUNS=${RUNS:-3}
RATE=${RATE:-100mbit}
DELAY_MS=${DELAY_MS:-10}
LINK=optbench
DAEMON=${DAEMON:-$REPO/target/release/containerd-stargz-grpc}
CTR_REMOTE=${CTR_REMOTE:-$REPO/target/release/ctr-remote}
GO_CTR_REMOTE=${GO_CTR_REMOTE:-/usr/bin/ctr-remote}
if [ -z "${OPT_CTR_REMOTE:-}" ]; then
  OPT_CTR_REMOTE=$REPO/target/release/ctr-remote
  "$OPT_CTR_REMOTE" image optimize --help >/dev/null 2>&1 || OPT_CTR_REMOTE=$REPO/target/debug/ctr-remote
fi
WORKLOAD=(python3 /app/imports.py)
EXPECT='^imported [0-9]+ modules$'

die() { echo "bench-optimize.sh: $*" >&2; exit 1; }
log() { echo "bench-optimize.sh: $*" >&2; }
for t in containerd ctr runc skopeo jq ip tc; do command -v "$t" >/dev/null || die "$t missing: run 'make deps'"; done
for b in "$DAEMON" "$CTR_REMOTE" "$OPT_CTR_REMOTE" "$GO_CTR_REMOTE"; do [ -x "$b" ] || die "$b missing (make release)"; done
"$OPT_CTR_REMOTE" image optimize --help >/dev/null 2>&1 || die "$OPT_CTR_REMOTE has no 'image optimize'"
if [ -z "${DELAY_PROXY:-}" ]; then
  (cd "$REPO" && cargo build --quiet --release --example delay-proxy) || die "cannot build the delay proxy"
  export DELAY_PROXY=$REPO/target/release/examples/delay-proxy
fi

WORK=$(mktemp -d /var/tmp/bench-optimize.XXXXXX)
PIDS=()
SOCKS=()
stop_pid() {
  local pid=$1 sig=${2:-TERM} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
clear_containers() {
  local cpid=$1 s=$2 t c
  # ctr waits for a containerd that is gone until its timeout: only ask live ones.
  kill -0 "$cpid" 2>/dev/null || return 0
  for t in $(timeout 20 ctr --address "$s" tasks ls -q 2>/dev/null); do
    timeout 20 ctr --address "$s" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; sleep 0.2
    timeout 20 ctr --address "$s" tasks rm -f "$t" >/dev/null 2>&1
  done
  for c in $(timeout 20 ctr --address "$s" containers ls -q 2>/dev/null); do
    timeout 20 ctr --address "$s" containers rm "$c" >/dev/null 2>&1
  done
}
cleanup() {
  set +e
  local i pid m s
  for s in "${SOCKS[@]}"; do clear_containers "${s%% *}" "${s#* }"; done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}" INT; done
  for pid in $(grep -l -s -F "$WORK" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    [ "$pid" != $$ ] && stop_pid "$pid"
  done
  for m in $(awk '{print $5}' /proc/self/mountinfo | grep -F "$WORK" | sort -r); do umount -l "$m" 2>/dev/null; done
  "$NETLINK" down "$LINK" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { printf "%.2f", (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
served() { "$NETLINK" stats "$LINK" | jq -r .upstream_to_client; }
reglog() { echo "/run/stargz-testbed/netlink/$LINK/registry.log"; }
blob_reqs() { grep -cE '"(GET|HEAD) /v2/[^ ]+/blobs/' "$(reglog)" 2>/dev/null || true; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Starts containerd NAME under $WORK/NAME with extra TOML $2; sets CTRD_SOCK and CTRD_PID.
start_containerd() {
  local dir=$WORK/$1 i
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[metrics]
  address = ""
${2:-}
TOML
  containerd --config "$dir/config.toml" --log-level info >"$dir/containerd.log" 2>&1 </dev/null &
  CTRD_PID=$!; CTRD_SOCK=$dir/containerd.sock
  PIDS+=("$CTRD_PID"); SOCKS+=("$CTRD_PID $CTRD_SOCK")
  for i in $(seq 1 300); do
    timeout 5 ctr --address "$CTRD_SOCK" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "containerd $1 did not start: $(tail -n 5 "$dir/containerd.log")"
}
stop_containerd() { clear_containers "$CTRD_PID" "$CTRD_SOCK"; stop_pid "$CTRD_PID"; }

# ---- images ----
ADDR=$(REGISTRY_DIR=$WORK/registry "$NETLINK" up "$LINK" "$RATE" "$DELAY_MS")
"$REPO/scripts/rootfs.sh" oci "$WORK/oci" >/dev/null
"$NETLINK" exec "$LINK" skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/oci:latest" \
  "docker://127.0.0.1:5000/bench/python:gzip"
SRC=$ADDR/bench/python:gzip
start_containerd build
ctr --address "$CTRD_SOCK" image pull --plain-http "$SRC" >/dev/null
ARGS=$(printf '%s\n' "${WORKLOAD[@]}" | jq -R . | jq -sc .)
t0=$(now)
"$OPT_CTR_REMOTE" --address "$CTRD_SOCK" image optimize --oci --args "$ARGS" \
  --record-out "$WORK/ours.json" "$SRC" "$ADDR/bench/python:opt-ours" >"$WORK/opt-ours.out" 2>&1 \
  || die "our optimize failed: $(tail -n 5 "$WORK/opt-ours.out")"
OPT_OURS_S=$(elapsed "$t0" "$(now)")
t0=$(now)
"$GO_CTR_REMOTE" --address "$CTRD_SOCK" image optimize --oci --args "$ARGS" \
  --record-out "$WORK/go.json" "$SRC" "$ADDR/bench/python:opt-go" >"$WORK/opt-go.out" 2>&1 \
  || die "Go's optimize failed: $(tail -n 5 "$WORK/opt-go.out")"
OPT_GO_S=$(elapsed "$t0" "$(now)")
"$OPT_CTR_REMOTE" --address "$CTRD_SOCK" image convert --estargz --oci "$SRC" "$ADDR/bench/python:esgz" >/dev/null
for tag in opt-ours opt-go esgz; do
  ctr --address "$CTRD_SOCK" image push --plain-http "$ADDR/bench/python:$tag" >/dev/null
done
stop_containerd
count_files() { jq -r '.path' "$1" | sort -u | wc -l; }
log "optimized: ours in ${OPT_OURS_S}s ($(count_files "$WORK/ours.json") files), Go in ${OPT_GO_S}s ($(count_files "$WORK/go.json") files)"

# ---- one cold start: fresh daemon + containerd, rpull + run; sets T, REQ, BYTES ----
cold_start() {
  local tag=$1 dir=$WORK/run dsock pid i ready=0 t0 r0 b0 out
  rm -rf "$dir" "$WORK/run-ctrd"; mkdir -p "$dir"
  dsock=$dir/stargz.sock
  printf '[[resolver.host."%s".mirrors]]\nhost = "%s"\ninsecure = true\n' "$ADDR" "$ADDR" >"$dir/stargz.toml"
  "$DAEMON" --address "$dsock" --root "$dir/root" --config "$dir/stargz.toml" --log-level info \
    >"$dir/daemon.log" 2>&1 </dev/null &
  pid=$!; PIDS+=("$pid")
  start_containerd run-ctrd "[proxy_plugins.stargz]
  type = \"snapshot\"
  address = \"$dsock\"
[proxy_plugins.stargz.exports]
  root = \"$dir/root/\""
  for i in $(seq 1 200); do
    if timeout 10 ctr --address "$CTRD_SOCK" snapshots --snapshotter stargz prepare probe-$$ >/dev/null 2>&1; then
      timeout 10 ctr --address "$CTRD_SOCK" snapshots --snapshotter stargz rm probe-$$ >/dev/null 2>&1; ready=1; break
    fi
    sleep 0.1
  done
  [ "$ready" = 1 ] || die "daemon did not serve: $(tail -n 3 "$dir/daemon.log")"
  drop_caches
  r0=$(blob_reqs); b0=$(served); t0=$(now)
  "$CTR_REMOTE" --address "$CTRD_SOCK" image rpull --plain-http "$ADDR/bench/python:$tag" >"$dir/pull.out" 2>&1 \
    || die "rpull $tag failed: $(tail -n 3 "$dir/pull.out")"
  out=$(ctr --address "$CTRD_SOCK" run --rm --snapshotter stargz "$ADDR/bench/python:$tag" "run$RANDOM" "${WORKLOAD[@]}" 2>&1) \
    || die "run $tag failed: $out"
  T=$(elapsed "$t0" "$(now)")
  [[ $(echo "$out" | tail -n1) =~ $EXPECT ]] || die "$tag printed: $out"
  REQ=$(( $(blob_reqs) - r0 )); BYTES=$(( $(served) - b0 ))
  stop_containerd; stop_pid "$pid" INT
  for i in $(seq 1 50); do grep -qF "$dir/" /proc/self/mountinfo || break; sleep 0.1; done
}

declare -A TIMES REQS MBS
TAGS=(esgz opt-ours opt-go)
for r in $(seq 1 "$RUNS"); do
  for tag in "${TAGS[@]}"; do
    cold_start "$tag"
    TIMES[$tag]="${TIMES[$tag]:-} $T"; REQS[$tag]="${REQS[$tag]:-} $REQ"
    MBS[$tag]="${MBS[$tag]:-} $(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1e6 }')"
    log "run $r $tag: ${T}s, $REQ blob requests, $BYTES bytes"
  done
done

mkdir -p "$REPO/bench-results"
{
  echo "Cold start (rpull + python3 /app/imports.py) through our daemon, link $RATE / $((DELAY_MS * 2)) ms RTT, median of $RUNS"
  echo "optimize itself: ours ${OPT_OURS_S}s ($(count_files "$WORK/ours.json") files recorded), Go ${OPT_GO_S}s ($(count_files "$WORK/go.json") files recorded)"
  printf '%-10s %10s %10s %10s   %s\n' image seconds requests MB "runs (s)"
  for tag in "${TAGS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s %10s %10s %10s   %s\n' "$tag" "$(median ${TIMES[$tag]})" "$(median ${REQS[$tag]})" "$(median ${MBS[$tag]})" "${TIMES[$tag]# }"
  done
  echo "esgz = eStargz without optimization (no prefetch); opt-ours / opt-go = optimized by our / Go's ctr-remote"
} | tee "$REPO/bench-results/optimize.txt"
