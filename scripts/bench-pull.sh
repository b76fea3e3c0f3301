#!/usr/bin/env bash
# Benchmark of issue 6: time from pull start to the end of `python3 -c 'print(1)'` in a container,
# with the registry behind a slow link (scripts/netlink.sh: default 100mbit, 20 ms RTT), all in one
# run so the ratios compare like with like:
#   (b)  full pull, containerd's overlayfs snapshotter: `ctr image pull` + `ctr run`, of the original
#        gzip image (the baseline of the ratios) and of its eStargz conversion;
#   (a)  lazy pull with our daemon: target/release/containerd-stargz-grpc + `ctr-remote image rpull`
#        + `ctr run --snapshotter stargz`; also its peak RSS (VmHWM) through rpull, run and the
#        background fetch of the whole image, the cache's disk use (`du -sb <root>/stargz`) and the
#        bytes the registry served (delay-proxy counters), then the same for an image about twice as
#        big (flat-RSS check);
#   (c)  the same with Go's containerd-stargz-grpc (the reference), built by scripts/go-daemon.sh
#        from Debian's Go library (Debian's stargz-snapshotter ships only ctr-remote), with Go's
#        ctr-remote rpull.
# The image is the cached bookworm python3 rootfs of scripts/rootfs.sh (3 layers), converted to
# eStargz without optimization by Go's `ctr-remote image convert --estargz --oci`.
# Parts whose binaries cannot do the job yet are reported as "not available: <why>", never guessed.
#
#   scripts/bench-pull.sh                      writes bench-results/pull.txt
# Environment: RATE (100mbit), DELAY_MS (10, one way), BIG (1: also the twice-as-big image),
# OUT (bench-results/pull.txt), DAEMON / CTR_REMOTE (default target/release/...), GO_DAEMON (a
# binary; default: built by scripts/go-daemon.sh; empty: skip (c)),
# RUNS (1: times are the median of RUNS fresh pulls; other figures come from the last run),
# SETTLE_TIMEOUT (180 s to wait for the background fetch), KEEP=1 (keep the work dir for debugging),
# RUN_CMD (default "python3 -c print(1)"; e.g. "python3 /app/main.py" imports a wider spread of the
# stdlib) with EXPECT (last output line required, default 1; empty: only the exit status counts).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RATE=${RATE:-100mbit}
DELAY_MS=${DELAY_MS:-10}
BIG=${BIG:-1}
OUT=${OUT:-$REPO/bench-results/pull.txt}
DAEMON=${DAEMON:-$REPO/target/release/containerd-stargz-grpc}
CTR_REMOTE=${CTR_REMOTE:-$REPO/target/release/ctr-remote}
GO_CTR_REMOTE=${GO_CTR_REMOTE:-/usr/bin/ctr-remote}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-180}
RUNS=${RUNS:-1}
read -r -a RUN_CMD <<<"${RUN_CMD:-python3 -c print(1)}"
EXPECT=${EXPECT-1}
LINK=bench$$
NETLINK=$REPO/scripts/netlink.sh

log() { echo "bench-pull: $*" >&2; }
die() { log "$*"; exit 1; }

for t in containerd ctr runc docker-registry skopeo tc ip curl jq; do
  command -v "$t" >/dev/null || die "$t missing: run 'make deps'"
done
[ -x "$GO_CTR_REMOTE" ] || die "Go ctr-remote ($GO_CTR_REMOTE) is needed to convert to eStargz: apt-get install stargz-snapshotter"

# The link's delay proxy, optimised (netlink.sh would otherwise take whichever build exists).
if [ -z "${DELAY_PROXY:-}" ]; then
  (cd "$REPO" && cargo build --quiet --release --example delay-proxy) || die "cannot build the delay proxy"
  export DELAY_PROXY=$REPO/target/release/examples/delay-proxy
fi

WORK=$(mktemp -d /var/tmp/bench-pull.XXXXXX)
PIDS=()      # containerd and daemons we started, stopped in reverse order
SOCKS=()     # "PID SOCKET" of each containerd, for removing containers

stop_pid() {
  local pid=$1 sig=${2:-TERM} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
  set +e
  local s i pid m
  local entry cpid
  for entry in "${SOCKS[@]}"; do
    cpid=${entry%% *}; s=${entry#* }
    # ctr waits forever for a containerd that is gone: only ask live ones, with a time limit.
    kill -0 "$cpid" 2>/dev/null || continue
    for t in $(timeout 20 ctr --address "$s" tasks ls -q 2>/dev/null); do
      timeout 20 ctr --address "$s" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; sleep 0.2
      timeout 20 ctr --address "$s" tasks rm -f "$t" >/dev/null 2>&1
    done
    for c in $(timeout 20 ctr --address "$s" containers ls -q 2>/dev/null); do
      timeout 20 ctr --address "$s" containers rm "$c" >/dev/null 2>&1
    done
  done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}" INT; done
  # Shims of our containerds carry our work dir in their command line.
  for pid in $(grep -l -s -F "$WORK" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    [ "$pid" != $$ ] && stop_pid "$pid"
  done
  for m in $(awk '{print $5}' /proc/self/mountinfo | grep -F "$WORK" | sort -r); do umount -l "$m" 2>/dev/null; done
  "$NETLINK" down "$LINK" >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
served() { "$NETLINK" stats "$LINK" | jq -r .upstream_to_client; }

# Starts containerd NAME (root/state/socket under $WORK/NAME), extra TOML in $2; sets CTRD_SOCK and
# CTRD_PID (globals, not output: PIDS and SOCKS must be updated in this shell, not a subshell).
start_containerd() {
  local name=$1 extra=${2:-} dir=$WORK/$1
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
$extra
TOML
  containerd --config "$dir/config.toml" --log-level info >"$dir/containerd.log" 2>&1 </dev/null &
  CTRD_PID=$!; CTRD_SOCK=$dir/containerd.sock
  PIDS+=("$CTRD_PID"); SOCKS+=("$CTRD_PID $CTRD_SOCK")
  local i
  for i in $(seq 1 300); do
    timeout 5 ctr --address "$CTRD_SOCK" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  tail -n 20 "$dir/containerd.log" >&2; die "containerd $name did not start"
}

# Seconds from the start of PULL_CMD... to the end of RUN_CMD in a container of
# REF with SNAPSHOTTER. Sets T (seconds) and FETCHED (bytes served by the registry meanwhile);
# returns non-zero (with the reason in $WORK/why) if a step failed.
timed_run() {
  local sock=$1 ref=$2 snapshotter=$3; shift 3
  local before t0 t1 out
  before=$(served)
  t0=$(now)
  if ! timeout 900 "$@" >"$WORK/pull.out" 2>&1; then
    { echo "pull failed: $*"; tail -n 5 "$WORK/pull.out"; } >"$WORK/why"; return 1
  fi
  if ! out=$(timeout 600 ctr --address "$sock" run --rm --snapshotter "$snapshotter" "$ref" "run$RANDOM" \
        "${RUN_CMD[@]}" 2>&1); then
    { echo "ctr run failed:"; echo "$out" | tail -n 5; } >"$WORK/why"; return 1
  fi
  t1=$(now)
  if [ -n "$EXPECT" ] && [ "$(echo "$out" | tr -d '\r' | tail -n1)" != "$EXPECT" ]; then
    { echo "${RUN_CMD[*]} printed: $out"; } >"$WORK/why"; return 1
  fi
  T=$(elapsed "$t0" "$t1")
  FETCHED=$(( $(served) - before ))
}

# Waits until the registry has served nothing new for SETTLE_QUIET (5) s: the background fetch is
# done (or stalled; compare the bytes fetched with the image size in the results).
settle() {
  local last cur quiet=0 waited=0
  last=$(served)
  while [ "$quiet" -lt "${SETTLE_QUIET:-5}" ] && [ "$waited" -lt "$SETTLE_TIMEOUT" ]; do
    sleep 1; waited=$((waited + 1)); cur=$(served)
    if [ "$cur" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; last=$cur; fi
  done
}

# Uncompressed size of the regular files of an image's layers in an OCI layout.
file_bytes() {
  local dir=$1 m total=0 d n
  m=$(jq -r '.manifests[0].digest' "$dir/index.json" | cut -d: -f2)
  for d in $(jq -r '.layers[].digest' "$dir/blobs/sha256/$m" | cut -d: -f2); do
    n=$(tar -tzvf "$dir/blobs/sha256/$d" | awk '$1 ~ /^-/ { s += $3 } END { print s + 0 }')
    total=$((total + n))
  done
  echo "$total"
}
compressed_bytes() {
  local dir=$1 m
  m=$(jq -r '.manifests[0].digest' "$dir/index.json" | cut -d: -f2)
  jq '[.layers[].size] | add' "$dir/blobs/sha256/$m"
}

RESULTS=()
result() { RESULTS+=("$1 = $2"); log "$1 = $2"; }

# ---- link and images ----
ADDR=$("$NETLINK" up "$LINK" "$RATE" "$DELAY_MS")
log "registry behind $RATE / $((2 * DELAY_MS)) ms RTT at $ADDR"
rtt=$(curl -s -o /dev/null -o /dev/null -w '%{time_starttransfer}\n' "http://$ADDR/v2/" "http://$ADDR/v2/" | tail -n1)

variants=(python)
[ "$BIG" = 1 ] && variants+=(python-big)
# Pushes the gzip image VARIANT and its eStargz conversion to the registry (once).
prepare_image() {
  local v=$1 flag=""
  [ -f "$WORK/oci-$v/.pushed" ] && return 0
  [ "$v" = python-big ] && flag=--big
  "$REPO/scripts/rootfs.sh" oci "$WORK/oci-$v" $flag >/dev/null
  "$NETLINK" exec "$LINK" skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/oci-$v:latest" \
    "docker://127.0.0.1:5000/bench/$v:gzip"
  # Set-up, not measured: this containerd is on the host, so the conversion crosses the link.
  start_containerd "conv-$v"
  ctr --address "$CTRD_SOCK" image pull --plain-http "$ADDR/bench/$v:gzip" >/dev/null
  "$GO_CTR_REMOTE" --address "$CTRD_SOCK" image convert --estargz --oci \
    "$ADDR/bench/$v:gzip" "$ADDR/bench/$v:esgz" >/dev/null
  ctr --address "$CTRD_SOCK" image push --plain-http "$ADDR/bench/$v:esgz" >/dev/null
  stop_pid "$CTRD_PID"
  rm -rf "$WORK/conv-$v"
  touch "$WORK/oci-$v/.pushed"
  log "images $ADDR/bench/$v:{gzip,esgz} ready"
}
prepare_image python

result link "$RATE, one-way delay ${DELAY_MS} ms; measured /v2/ round trip on an open connection ${rtt}s"
result image_compressed_bytes "$(compressed_bytes "$WORK/oci-python")"
UNCOMPRESSED=$(file_bytes "$WORK/oci-python")
result image_file_bytes "$UNCOMPRESSED"
ESGZ_BYTES=$("$NETLINK" exec "$LINK" curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  http://127.0.0.1:5000/v2/bench/python/manifests/esgz | jq '[.layers[].size] | add')
result image_estargz_compressed_bytes "$ESGZ_BYTES"

# ---- (b) full pulls with overlayfs ----
for tag in gzip esgz; do
  ref=$ADDR/bench/python:$tag
  times=()
  for r in $(seq 1 "$RUNS"); do
    start_containerd "full-$tag-$r"; sock=$CTRD_SOCK
    if ! timed_run "$sock" "$ref" overlayfs ctr --address "$sock" image pull --plain-http "$ref"; then
      stop_pid "$CTRD_PID"; times=(); break
    fi
    times+=("$T")
    disk=$(du -sb "$WORK/full-$tag-$r/root" 2>/dev/null | cut -f1)
    stop_pid "$CTRD_PID"
    rm -rf "$WORK/full-$tag-$r"
  done
  if [ ${#times[@]} -gt 0 ]; then
    T=$(median "${times[@]}")
    result "full_${tag}_overlayfs_seconds" "$T"
    [ "$RUNS" -gt 1 ] && result "full_${tag}_overlayfs_seconds_runs" "${times[*]}"
    result "full_${tag}_overlayfs_fetched_bytes" "$FETCHED"
    result "full_${tag}_overlayfs_disk_bytes" "$disk"
    declare "FULL_$tag=$T"
  else
    result "full_${tag}_overlayfs_seconds" "failed: $(tr '\n' ' ' <"$WORK/why")"
  fi
done
[ -n "${FULL_gzip:-}" ] || die "the baseline full pull failed; see above"

# ---- (a)/(c) lazy pulls through a stargz daemon ----
# lazy NAME DAEMON_BIN RPULL_BIN VARIANT RUN: measures one lazy pull with a fresh daemon and containerd.
lazy() {
  local name=$1 daemon=$2 rpull=$3 v=$4 dir=$WORK/$1-$4-$5 sock dsock pid i ready=0 out
  mkdir -p "$dir"
  dsock=$dir/stargz.sock
  cat >"$dir/stargz.toml" <<TOML
[[resolver.host."$ADDR".mirrors]]
host = "$ADDR"
insecure = true
TOML
  "$daemon" --address "$dsock" --root "$dir/root" --config "$dir/stargz.toml" --log-level info \
    >"$dir/daemon.log" 2>&1 </dev/null &
  pid=$!; PIDS+=("$pid")
  start_containerd "$name-$v-$5-ctrd" "[proxy_plugins.stargz]
  type = \"snapshot\"
  address = \"$dsock\"
[proxy_plugins.stargz.exports]
  root = \"$dir/root/\""
  sock=$CTRD_SOCK
  for i in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || break
    if timeout 10 ctr --address "$sock" snapshots --snapshotter stargz prepare probe-$$ >/dev/null 2>&1; then
      timeout 10 ctr --address "$sock" snapshots --snapshotter stargz rm probe-$$ >/dev/null 2>&1; ready=1; break
    fi
    sleep 0.1
  done
  if [ "$ready" != 1 ]; then
    echo "daemon did not serve: $(tail -n 3 "$dir/daemon.log" | tr '\n' ' ')" >"$WORK/why"; return 1
  fi
  local ref=$ADDR/bench/$v:esgz
  timed_run "$sock" "$ref" stargz "$rpull" --address "$sock" image rpull --plain-http "$ref" || return 1
  LAZY_T=$T; LAZY_FETCHED=$FETCHED
  LAZY_REMOTE=$(grep -c 'remote-snapshot-prepared.\{0,4\}true' "$dir/daemon.log" || true)
  LAZY_FUSE=$(grep -F "$dir/root" /proc/self/mountinfo | grep -c fuse || true)
  settle
  LAZY_TOTAL=$(served)
  LAZY_RSS=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo "n/a")
  LAZY_CACHE=$(du -sb "$dir/root/stargz" 2>/dev/null | cut -f1 || echo 0)
  kill -0 "$pid" 2>/dev/null || { echo "daemon exited during the run" >"$WORK/why"; return 1; }
  # Done with this pair: SIGINT makes the daemon unmount everything.
  stop_pid "$CTRD_PID"; stop_pid "$pid" INT
  # The caches are measured; free the disk unless something is still mounted there.
  grep -qF "$dir/" /proc/self/mountinfo || rm -rf "$dir/root" "$WORK/$name-$v-$5-ctrd/root"
}

report_lazy() {
  local name=$1 daemon=$2 rpull=$3 v
  for v in "${variants[@]}"; do
    local key=${name}_lazy; [ "$v" = python-big ] && key=${name}_lazy_big
    prepare_image "$v"
    local before r runs=1 times=() ok=1
    [ "$v" = python ] && runs=$RUNS
    for r in $(seq 1 "$runs"); do
      before=$(served)
      lazy "$name" "$daemon" "$rpull" "$v" "$r" || { ok=0; break; }
      times+=("$LAZY_T")
    done
    if [ "$ok" = 1 ]; then
      LAZY_T=$(median "${times[@]}")
      result "${key}_seconds" "$LAZY_T"
      [ "$runs" -gt 1 ] && result "${key}_seconds_runs" "${times[*]}"
      [ "$v" = python ] && result "${key}_over_full_gzip" "$(ratio "$LAZY_T" "$FULL_gzip")"
      [ "$v" = python ] && [ -n "${FULL_esgz:-}" ] && result "${key}_over_full_esgz" "$(ratio "$LAZY_T" "$FULL_esgz")"
      result "${key}_fetched_bytes_until_python_exit" "$LAZY_FETCHED"
      result "${key}_fetched_bytes_after_background_fetch" "$((LAZY_TOTAL - before))"
      [ "$v" = python ] && result "${key}_fetched_after_background_over_estargz_bytes" "$(ratio "$((LAZY_TOTAL - before))" "$ESGZ_BYTES")"
      [ "$v" = python ] && result "${key}_fetched_until_python_exit_over_estargz_bytes" "$(ratio "$LAZY_FETCHED" "$ESGZ_BYTES")"
      result "${key}_remote_snapshots_logged" "$LAZY_REMOTE"
      result "${key}_fuse_mounts" "$LAZY_FUSE"
      result "${key}_peak_rss_kib" "$LAZY_RSS"
      result "${key}_cache_disk_bytes" "$LAZY_CACHE"
      [ "$v" = python ] && result "${key}_cache_over_image_file_bytes" "$(ratio "$LAZY_CACHE" "$UNCOMPRESSED")"
      declare -g "RSS_${name}_${v//-/_}=$LAZY_RSS"
    else
      result "${key}_seconds" "not available: $(tr '\n' ' ' <"$WORK/why")"
      return 0
    fi
  done
  local a="RSS_${name}_python" b="RSS_${name}_python_big"
  if [ -n "${!a:-}" ] && [ -n "${!b:-}" ]; then result "${name}_peak_rss_big_over_normal" "$(ratio "${!b}" "${!a}")"; fi
}

if [ -x "$DAEMON" ] && [ -x "$CTR_REMOTE" ]; then
  report_lazy ours "$DAEMON" "$CTR_REMOTE"
else
  result ours_lazy_seconds "not available: $DAEMON or $CTR_REMOTE not built (make release)"
fi
if [ -z "${GO_DAEMON+set}" ]; then
  GO_DAEMON=$("$REPO/scripts/go-daemon.sh" 2>"$WORK/go-daemon.log") || GO_DAEMON=""
fi
if [ -n "$GO_DAEMON" ] && [ -x "$GO_DAEMON" ]; then
  report_lazy go "$GO_DAEMON" "$GO_CTR_REMOTE"
else
  result go_lazy_seconds "not available: no Go containerd-stargz-grpc (scripts/go-daemon.sh: $(tail -n 2 "$WORK/go-daemon.log" 2>/dev/null | tr '\n' ' '))"
fi

mkdir -p "$(dirname "$OUT")"
{
  echo "# bench-pull $(date -u +%FT%TZ): pull start -> end of \`${RUN_CMD[*]}\` in a container"
  echo "# registry in a netns behind tbf $RATE + delay-proxy ${DELAY_MS} ms each way; image: bookworm"
  echo "# minbase + python3, 3 layers (scripts/rootfs.sh); eStargz by Go ctr-remote convert (no optimization)."
  echo "# Goals (issue 6): ours_lazy_over_full_gzip <= 0.25, peak RSS < 24 MiB and flat (big/normal ~1),"
  echo "# cache disk <= 1.1x the uncompressed bytes fetched."
  printf '%s\n' "${RESULTS[@]}"
} >"$OUT"
log "wrote $OUT"
