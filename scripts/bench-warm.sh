#!/usr/bin/env bash
# Warm-read benchmark (issue 16): once a lazily pulled image's layers are fully fetched, is a
# container's file system as fast as containerd's overlayfs snapshotter on the same tree? For
# every system, three warm measures, each reported as a speed ratio to overlayfs (overlay seconds
# ÷ the system's seconds; the goal is >= 0.9).
#
# Image: the same as bench-pull.sh's: the bookworm minbase + python3 rootfs of scripts/rootfs.sh
# with its data layer (`rootfs.sh oci --data`, 4 layers), pushed as gzip, and its eStargz conversion
# by Go's `ctr-remote image convert --estargz --oci` (cached in $STARGZ_TESTBED_CACHE like
# bench-pull.sh's), served by a registry behind scripts/netlink.sh's loopback link (nothing
# emulated: warm reads do not depend on the link).
# Systems (each with a fresh containerd, and a fresh daemon and cache for the lazy ones):
#   overlay         containerd's overlayfs snapshotter, `ctr image pull` of the gzip image (the baseline)
#   ours            our daemon, default config, our `ctr-remote image rpull` of the eStargz image
#   ours-fuse       ours with `[snapshotter] native_layers = false`: fully fetched layers stay FUSE
#   ours-fuse-nopt  ours-fuse with `[fuse] passthrough = false`
#   ours-fuse-1s    ours-fuse with `[fuse] attr_timeout = 1` (Go's default)
#   go              Go's daemon (scripts/go-daemon.sh) and Go's /usr/bin/ctr-remote rpull
# (each variant's daemon TOML is one line of system_conf below).
# Set-up, per system: pull (page cache dropped first), one untimed `read` run that reads every
# file so the lazy systems' fetch is complete, then the registry must be quiet for SETTLE_QUIET s,
# and for ours-variants without `native_layers = false` the daemon log must say `native layer
# ready` for every FUSE layer (or NATIVE_WAIT s pass). Every system stays up, and the measures run
# in RUNS rounds, each round every measure on every system in turn (a change of the machine's
# load weighs on all systems alike). Each measure is a separate `ctr run --rm` after
# `sync; echo 3 > /proc/sys/vm/drop_caches` on the host, timed inside the container by
# scripts/warm-read.py (bind-mounted read-only):
#   read   walk / on the root file system (other mounts skipped), open and read every regular file
#          fully in 1 MiB reads
#   stat   the same walk, os.lstat of every path, no opens
#   restat the stat walk twice in one container, 2 s apart; only the second walk is timed (what the
#          kernel keeps between the two: a running container coming back to its files)
#   small  open+read+close each regular file <= 16 KiB of a list made once, before any measure, by
#          the first system's container (warm-read.py list), bind-mounted as /bench-small.txt: the
#          timed run does not walk the tree
# Every run's files, bytes and paths must be the same as every other system's (and errors 0), else
# its cell is "failed: <reason>" and the matrix goes on. Finally a detached container (`sleep`)
# shows which lower layers its overlay mount uses: native_layers_in_use counts the lowerdir
# entries that are not a snapshot's `/fs` (a FUSE mount or, for overlay, the unpacked layer).
#
#   scripts/bench-warm.sh        writes bench-results/warm.txt (key = value lines: host load, image,
#                                MEASURE_SYSTEM_seconds (median) and _seconds_runs, MEASURE_SYSTEM_vs_overlay,
#                                SYSTEM_native_layers_in_use, files and bytes read; then the markdown
#                                table) and bench-results/warm.md (the table alone: rows measures,
#                                columns systems, cells "seconds (speed ratio to overlay)")
# Environment:
#   SYSTEMS ("overlay ours ours-fuse ours-fuse-nopt ours-fuse-1s go"), MEASURES ("read stat restat small"),
#   RUNS (3; the median is reported), DAEMON / CTR_REMOTE (ours; default target/release/...),
#   GO_DAEMON (a binary; default built by scripts/go-daemon.sh; empty: `go` is "not available"),
#   GO_CTR_REMOTE (/usr/bin/ctr-remote), DELAY_PROXY (binary; default the existing release build,
#   else built with cargo),
#   SETTLE_QUIET (5 s), SETTLE_TIMEOUT (180 s), NATIVE_WAIT (30 s), STEP_TIMEOUT (300 s for one
#   pull or run), OUT (bench-results/warm.txt), TABLE (OUT with .md), KEEP=1 (keep the work dir),
#   LOG_LEVEL (the daemons' --log-level, info), LOGS (a directory: each lazy system's daemon log is
#   kept there as warm-SYSTEM.log).
# Every process and mount started here is removed on exit, Ctrl-C included. On the 2-core test
# machine with the image and its conversion cached, the default run (six systems, RUNS=3) takes
# about 3.5 min and RUNS=1 2.5 min (+ NATIVE_WAIT s for a daemon that logs no `native layer ready`);
# the very first run also debootstraps (~2 min) and converts (~1 min). The stat measure is short
# (~0.2 s on overlay): other load on the machine moves it by tens of percent.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r -a SYSTEMS <<<"${SYSTEMS:-overlay ours ours-fuse ours-fuse-nopt ours-fuse-1s go}"
read -r -a MEASURES <<<"${MEASURES:-read stat restat small}"
RUNS=${RUNS:-3}
OUT=${OUT:-$REPO/bench-results/warm.txt}
TABLE=${TABLE:-${OUT%.txt}.md}
DAEMON=${DAEMON:-$REPO/target/release/containerd-stargz-grpc}
CTR_REMOTE=${CTR_REMOTE:-$REPO/target/release/ctr-remote}
GO_CTR_REMOTE=${GO_CTR_REMOTE:-/usr/bin/ctr-remote}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-180}
NATIVE_WAIT=${NATIVE_WAIT:-30}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
CACHE=${STARGZ_TESTBED_CACHE:-/var/cache/stargz-testbed}
LINK=warm$$
NETLINK=$REPO/scripts/netlink.sh
START=$(date +%s)

BENCH_NAME=bench-warm
# log, die, has, start_containerd, start_lazy, settle, prepare_image, cleanup, ...
source "$REPO/scripts/lib-bench.sh"

# `system_conf SYSTEM` sets KIND (overlay, ours or go: which snapshotter, daemon and pull) and
# EXTRA (TOML added to the daemon's config after the registry mirror). One line per variant.
system_conf() {
  case $1 in
    overlay)        KIND=overlay; EXTRA='' ;;
    ours)           KIND=ours; EXTRA='' ;;
    ours-fuse)      KIND=ours; EXTRA=$'[snapshotter]\nnative_layers = false' ;;
    ours-fuse-nopt) KIND=ours; EXTRA=$'[snapshotter]\nnative_layers = false\n[fuse]\npassthrough = false' ;;
    ours-fuse-1s)   KIND=ours; EXTRA=$'[snapshotter]\nnative_layers = false\n[fuse]\nattr_timeout = 1' ;;
    go)             KIND=go; EXTRA='' ;;
    *) return 1 ;;
  esac
}
for s in "${SYSTEMS[@]}"; do system_conf "$s" || die "unknown system '$s' (overlay ours ours-fuse ours-fuse-nopt ours-fuse-1s go)"; done
for m in "${MEASURES[@]}"; do has "$m" read stat restat small || die "unknown measure '$m' (read stat restat small)"; done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "bad RUNS '$RUNS'"

require_tools
use_delay_proxy any   # the link carries no measured byte: any build of the proxy will do
make_work bench-warm
# The program runs from a copy: edits to the checkout during the run do not change it.
cp "$REPO/scripts/warm-read.py" "$WORK/warm-read.py"
mkdir -p "$WORK/out"
SMALL_LIST=$WORK/out/small.txt

# ---- the image ----
link_up loopback
prepare_image python-data
GZ_REF=$ADDR/bench/python-data:gzip
ESGZ_REF=$ADDR/bench/python-data:esgz

result host_load_at_start "$(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine makes every number noisier)"
GZ_MANIFEST=$(manifest python-data gzip)
ESGZ_MANIFEST=$(manifest python-data esgz)
NLAYERS=$(jq '.layers | length' <<<"$GZ_MANIFEST")
result image "bookworm minbase + python3 + app + data layer (rootfs.sh oci --data), $NLAYERS layers"
result image_compressed_bytes "$(jq '[.layers[].size] | add' <<<"$GZ_MANIFEST")"
result image_file_bytes "$(file_bytes "$WORK/oci-python-data")"
ESGZ_BYTES=$(jq '[.layers[].size] | add' <<<"$ESGZ_MANIFEST")
result image_estargz_compressed_bytes "$ESGZ_BYTES"

# ---- which systems can run ----
declare -A UNAVAIL   # system → why it cannot run
OURS_SEEN=0
for s in "${SYSTEMS[@]}"; do
  system_conf "$s"
  if [ "$KIND" = ours ]; then
    if [ ! -x "$DAEMON" ] || [ ! -x "$CTR_REMOTE" ]; then
      UNAVAIL[$s]="not available: $DAEMON or $CTR_REMOTE not built (make release)"
    elif [ "$OURS_SEEN" = 0 ]; then
      OURS_SEEN=1; result ours_binaries "$DAEMON $CTR_REMOTE"
    fi
  elif [ "$KIND" = go ]; then
    find_go_daemon
    if [ -n "$GO_DAEMON" ] && [ -x "$GO_DAEMON" ]; then result go_binaries "$GO_DAEMON $GO_CTR_REMOTE"
    elif [ -s "$WORK/go-daemon.log" ]; then
      UNAVAIL[$s]="not available: no Go containerd-stargz-grpc (scripts/go-daemon.sh: $(tail -n 2 "$WORK/go-daemon.log" | tr '\n' ' '))"
    else UNAVAIL[$s]="not available: GO_DAEMON '$GO_DAEMON' is not an executable"; fi
  fi
done

# ---- one system ----
declare -A TIMES FAIL NATIVE   # per cell "MEASURE|SYSTEM" (NATIVE per system)
declare -A REFV                 # the first successful run's counts per measure: "files bytes" or "paths"
cell_failed() { [ -n "${FAIL[$1]:-}" ]; }
key() { echo "${1//-/_}"; }      # system name in keys

# `measure SOCK SNAPSHOTTER REF MEASURE` runs warm-read.py MEASURE in a fresh container; sets
# SECONDS_IN (its elapsed) and COUNTS ("files bytes" or "paths"). Non-zero with the reason in
# $WORK/why if the run failed, printed something unexpected or read other counts than the
# reference (REFV, set by the first successful run of MEASURE).
measure() {
  local sock=$1 snap=$2 ref=$3 m=$4 out last errors files bytes paths mounts=()
  mounts=(--mount "type=bind,src=$WORK/warm-read.py,dst=/bench-warm.py,options=rbind:ro")
  [ "$m" = small ] && mounts+=(--mount "type=bind,src=$SMALL_LIST,dst=/bench-small.txt,options=rbind:ro")
  if ! out=$(timeout "$STEP_TIMEOUT" ctr --address "$sock" run --rm --snapshotter "$snap" "${mounts[@]}" \
        "$ref" "warm$RANDOM" python3 /bench-warm.py "$m" 2>&1); then
    { echo "ctr run failed:"; echo "$out" | tail -n 3; } | tr '\n' ' ' >"$WORK/why"; return 1
  fi
  out=$(tr -d '\r' <<<"$out")
  last=$(tail -n1 <<<"$out")
  if ! [[ $last =~ ^elapsed\ ([0-9.]+)$ ]]; then
    echo "warm-read.py $m printed: $(tail -n 3 <<<"$out" | tr '\n' ' ')" >"$WORK/why"; return 1
  fi
  SECONDS_IN=${BASH_REMATCH[1]}
  errors=$(awk '$1 == "errors" { print $2 }' <<<"$out")
  files=$(awk '$1 == "files" { print $2 }' <<<"$out")
  bytes=$(awk '$1 == "bytes" { print $2 }' <<<"$out")
  paths=$(awk '$1 == "paths" { print $2 }' <<<"$out")
  if [ "$errors" != 0 ]; then
    echo "$errors errors, first: $(awk '$1 == "first_error" { $1 = ""; print }' <<<"$out" | cut -c1-200)" >"$WORK/why"; return 1
  fi
  case $m in
    read) COUNTS="$files $bytes"
          { [ "${files:-0}" -ge 1000 ] && [ "${bytes:-0}" -ge 50000000 ]; } || { echo "read only $files files, $bytes bytes" >"$WORK/why"; return 1; } ;;
    stat|restat) COUNTS=$paths
          [ "${paths:-0}" -ge 1000 ] || { echo "$m only $paths paths" >"$WORK/why"; return 1; } ;;
    small) COUNTS="$files $bytes"
           [ "${files:-0}" = "$(wc -l <"$SMALL_LIST")" ] || { echo "read $files of the $(wc -l <"$SMALL_LIST") listed files" >"$WORK/why"; return 1; } ;;
  esac
  if [ -z "${REFV[$m]:-}" ]; then REFV[$m]=$COUNTS
  elif [ "${REFV[$m]}" != "$COUNTS" ]; then
    echo "counts '$COUNTS' differ from the other runs' '${REFV[$m]}'" >"$WORK/why"; return 1
  fi
}

# `native_in_use SOCK SNAPSHOTTER REF CTRD_DIR` prints "K of N": of the N lowerdirs of a detached
# container's overlay mount, K are not a snapshot's /fs; or "n/a". The lowerdirs go to
# $WORK/lowerdirs.
native_in_use() {
  local sock=$1 snap=$2 ref=$3 cdir=$4 id=native$RANDOM i line lower n=0 k=0 d
  timeout 60 ctr --address "$sock" run -d --snapshotter "$snap" "$ref" "$id" sleep 30 >/dev/null 2>&1 || { echo n/a; return; }
  for i in $(seq 1 50); do
    line=$(grep -F " $cdir/state/" /proc/self/mountinfo | grep -F "/$id/rootfs " | grep -F ' - overlay ' || true)
    [ -n "$line" ] && break; sleep 0.1
  done
  timeout 20 ctr --address "$sock" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  for i in $(seq 1 50); do
    timeout 5 ctr --address "$sock" tasks rm -f "$id" >/dev/null 2>&1 && break; sleep 0.1
  done
  timeout 20 ctr --address "$sock" containers rm "$id" >/dev/null 2>&1 || true
  lower=$(sed -n 's/.* - overlay [^ ]* .*lowerdir=\([^,]*\).*/\1/p' <<<"$line" | head -n1)
  echo "$lower" >"$WORK/lowerdirs"
  [ -n "$lower" ] || { echo n/a; return; }
  while read -r d; do
    [ -n "$d" ] || continue
    n=$((n + 1)); [[ $d == */fs ]] || k=$((k + 1))
  done < <(tr ':' '\n' <<<"$lower")
  echo "$k of $n"
}

# Per system, once set up: its containerd (S_SOCK, S_CPID), snapshotter, image, daemon pid and
# dirs; S_WHY is why it cannot be measured (every one of its cells fails with it).
declare -A S_SOCK S_CPID S_SNAP S_REF S_PID S_WHY

# `setup_system S`: containerd (and daemon), pull, an untimed read of every file (so that the lazy
# systems have fetched everything), the small-file list if there is none yet, the registry quiet
# and, for our daemon with native layers, every FUSE layer's `native layer ready`. The system
# stays up for the measures.
setup_system() {
  local s=$1 k dir cdir sock snap ref rpull daemon before nfuse ready waited t0 why="" out
  k=$(key "$s")
  system_conf "$s"
  if [ -n "${UNAVAIL[$s]:-}" ]; then S_WHY[$s]=${UNAVAIL[$s]}; return; fi
  log "system $s: set-up"
  dir=$WORK/$s; cdir=$WORK/$s-ctrd
  rm -rf "$dir" "$cdir"
  if [ "$KIND" = overlay ]; then
    start_containerd "$s-ctrd"; snap=overlayfs; ref=$GZ_REF; S_PID[$s]=""
  else
    if [ "$KIND" = ours ]; then daemon=$DAEMON; rpull=$CTR_REMOTE; else daemon=$GO_DAEMON; rpull=$GO_CTR_REMOTE; fi
    snap=stargz; ref=$ESGZ_REF
    start_lazy "$daemon" "$dir" "$s-ctrd" "$EXTRA" || why="daemon: $(cat "$WORK/why")"
    S_PID[$s]=$DAEMON_PID
  fi
  sock=$CTRD_SOCK
  S_SOCK[$s]=$sock; S_CPID[$s]=$CTRD_PID; S_SNAP[$s]=$snap; S_REF[$s]=$ref
  before=$(served)
  drop_caches
  t0=$(now)
  if [ -n "$why" ]; then :
  elif [ "$KIND" = overlay ]; then
    timeout "$STEP_TIMEOUT" ctr --address "$sock" image pull --plain-http "$ref" >"$WORK/$s-pull.out" 2>&1 \
      || why="pull failed: $(tail -n 3 "$WORK/$s-pull.out" | tr '\n' ' ')"
  else
    timeout "$STEP_TIMEOUT" "$rpull" --address "$sock" image rpull --plain-http "$ref" >"$WORK/$s-pull.out" 2>&1 \
      || why="rpull failed: $(tail -n 3 "$WORK/$s-pull.out" | tr '\n' ' ')"
  fi
  [ -n "$why" ] || result "${k}_pull_seconds" "$(elapsed "$t0" "$(now)")"
  # Untimed: every file read once, so that the lazy systems have fetched everything.
  if [ -z "$why" ] && ! measure "$sock" "$snap" "$ref" read; then why="warm-up read: $(cat "$WORK/why")"; fi
  # The list for `small`, once, from the first system that gets here.
  if [ -z "$why" ] && [ ! -s "$SMALL_LIST" ] && has small "${MEASURES[@]}"; then
    if out=$(timeout "$STEP_TIMEOUT" ctr --address "$sock" run --rm --snapshotter "$snap" \
          --mount "type=bind,src=$WORK/warm-read.py,dst=/bench-warm.py,options=rbind:ro" \
          --mount "type=bind,src=$WORK/out,dst=/bench-out,options=rbind:rw" \
          "$ref" "list$RANDOM" python3 /bench-warm.py list /bench-out/small.txt 2>&1) \
        && [ -s "$SMALL_LIST" ]; then
      result small_list "$(wc -l <"$SMALL_LIST") regular files <= 16 KiB (listed in the $s system's container)"
    else
      rm -f "$SMALL_LIST"; why="listing the small files failed: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
    fi
  fi
  if [ -z "$why" ] && [ "$KIND" != overlay ]; then
    settle
    result "${k}_fetched_bytes" "$(( $(served) - before ))"
    nfuse=$(grep -F " $dir/root/" /proc/self/mountinfo | grep -c ' - fuse' || true)
    result "${k}_fuse_layers" "$nfuse"
    # Our daemon's post-fetch work: the native form of each fully fetched layer.
    if [ "$KIND" = ours ] && ! grep -q 'native_layers *= *false' <<<"$EXTRA"; then
      waited=0; ready=0
      while :; do
        ready=$(grep -c 'native layer ready' "$dir/daemon.log" || true)
        [ "$ready" -ge "$nfuse" ] && [ "$nfuse" -gt 0 ] && break
        [ "$waited" -ge "$NATIVE_WAIT" ] && break
        sleep 1; waited=$((waited + 1))
      done
      result "${k}_native_ready" "$ready of $nfuse layers logged 'native layer ready' (waited ${waited}s)"
    fi
    kill -0 "${S_PID[$s]}" 2>/dev/null || why="daemon exited: $(daemon_complaints "$dir")"
  fi
  S_WHY[$s]=$why
  [ -z "$why" ] || log "system $s cannot be measured: $why"
}

# `teardown_system S`: which lower layers a container uses (if S was measured), then its
# containerd and daemon go, and its directories.
teardown_system() {
  local s=$1 k dir cdir warn
  k=$(key "$s")
  system_conf "$s"
  [ -n "${UNAVAIL[$s]:-}" ] && return
  dir=$WORK/$s; cdir=$WORK/$s-ctrd
  if [ -z "${S_WHY[$s]}" ]; then
    NATIVE[$s]=$(native_in_use "${S_SOCK[$s]}" "${S_SNAP[$s]}" "${S_REF[$s]}" "$cdir")
    result "${k}_native_layers_in_use" "${NATIVE[$s]} lowerdirs not a snapshot's /fs"
    [ ! -s "$WORK/lowerdirs" ] || result "${k}_container_lowerdirs" "$(sed "s#$WORK/##g" "$WORK/lowerdirs")"
    rm -f "$WORK/lowerdirs"
  fi
  CTRD_PID=${S_CPID[$s]}; CTRD_SOCK=${S_SOCK[$s]}
  if [ "$KIND" != overlay ]; then
    warn=$(daemon_complaints "$dir")
    [ -z "$warn" ] || result "${k}_daemon_log_warnings" "$warn"
    if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS"; cp "$dir/daemon.log" "$LOGS/warm-$s.log" 2>/dev/null || true; fi
    kill -0 "${S_PID[$s]}" 2>/dev/null || log "$s: the daemon has exited"
    DAEMON_PID=${S_PID[$s]}
    stop_lazy "$dir"
  else
    stop_containerd
  fi
  grep -qF "$dir/" /proc/self/mountinfo || grep -qF "$cdir/" /proc/self/mountinfo || rm -rf "$dir" "$cdir"
  return 0
}

for s in "${SYSTEMS[@]}"; do setup_system "$s"; done
# The measures: RUNS rounds, each of every measure on every system in turn, so that a change of
# the machine's load during the run weighs on every system alike.
for r in $(seq 1 "$RUNS"); do
  for m in "${MEASURES[@]}"; do
    for s in "${SYSTEMS[@]}"; do
      c="$m|$s"
      if [ -n "${S_WHY[$s]}" ]; then FAIL[$c]=${S_WHY[$s]}; continue; fi
      cell_failed "$c" && continue
      drop_caches
      if measure "${S_SOCK[$s]}" "${S_SNAP[$s]}" "${S_REF[$s]}" "$m"; then
        TIMES[$c]="${TIMES[$c]:-} $SECONDS_IN"
        log "$m $s run $r: ${SECONDS_IN}s ($COUNTS)"
      else
        FAIL[$c]=$(cat "$WORK/why")
        [ -z "${S_PID[$s]}" ] || FAIL[$c]+=" (daemon log: $(daemon_complaints "$WORK/$s"))"
        log "$m $s run $r failed: ${FAIL[$c]}"
      fi
    done
  done
done
for s in "${SYSTEMS[@]}"; do teardown_system "$s"; done
"$NETLINK" down "$LINK" >/dev/null 2>&1 || true

# ---- results ----
median3() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { printf "%.3f", (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
declare -A MED
[ -n "${REFV[read]:-}" ] && { result files_read "${REFV[read]% *}"; result bytes_read "${REFV[read]#* }"; }
[ -n "${REFV[stat]:-}" ] && result paths_stated "${REFV[stat]}"
[ -n "${REFV[small]:-}" ] && { result small_files_read "${REFV[small]% *}"; result small_bytes_read "${REFV[small]#* }"; }
for m in "${MEASURES[@]}"; do
  for s in "${SYSTEMS[@]}"; do
    c="$m|$s"; k="${m}_$(key "$s")"
    if cell_failed "$c"; then result "${k}_seconds" "failed: ${FAIL[$c]}"; continue; fi
    [ -n "${TIMES[$c]:-}" ] || continue
    read -r -a ts <<<"${TIMES[$c]}"
    MED[$c]=$(median3 "${ts[@]}")
    result "${k}_seconds" "${MED[$c]}"
    result "${k}_seconds_runs" "${ts[*]}"
  done
  for s in "${SYSTEMS[@]}"; do
    [ "$s" = overlay ] && continue
    [ -n "${MED[$m|$s]:-}" ] && [ -n "${MED[$m|overlay]:-}" ] \
      && result "${m}_$(key "$s")_vs_overlay" "$(ratio "${MED[$m|overlay]}" "${MED[$m|$s]}")"
  done
done
WALL=$(( $(date +%s) - START ))
result host_load_at_end "$(cut -d' ' -f1-3 /proc/loadavg)"
result wall_seconds "$WALL"

# The markdown table: rows measures, columns systems.
cellv() {
  local c=$1 s=${1#*|}
  if [ -n "${MED[$c]:-}" ]; then
    if [ -n "${MED[${c%%|*}|overlay]:-}" ]; then echo "${MED[$c]} ($(ratio "${MED[${c%%|*}|overlay]}" "${MED[$c]}"))"
    else echo "${MED[$c]}"; fi
  elif [ -n "${UNAVAIL[$s]:-}" ]; then echo "not available"
  elif cell_failed "$c"; then echo failed
  else echo "–"; fi
}
{
  printf '| measure |'; printf ' %s |' "${SYSTEMS[@]}"; echo
  printf '|---|'; printf -- '---|%.0s' "${SYSTEMS[@]}"; echo
  for m in "${MEASURES[@]}"; do
    printf '| %s |' "$m"; for s in "${SYSTEMS[@]}"; do printf ' %s |' "$(cellv "$m|$s")"; done; echo
  done
  printf '| native layers |'; for s in "${SYSTEMS[@]}"; do printf ' %s |' "${NATIVE[$s]:-–}"; done; echo
  echo
  echo "Seconds inside the container (median of $RUNS runs, page cache dropped before each), (speed ratio) = overlay s ÷ system s, goal >= 0.9; the run took $((WALL / 60)) min $((WALL % 60)) s."
  for m in "${MEASURES[@]}"; do
    case $m in
      read) echo "read = every regular file read fully (${REFV[read]:-?} files bytes)." ;;
      stat) echo "stat = lstat of every path (${REFV[stat]:-?} paths)." ;;
      restat) echo "restat = the stat walk again 2 s after a first one in the same container (${REFV[restat]:-?} paths)." ;;
      small) echo "small = open+read+close of the listed files <= 16 KiB (${REFV[small]:-?} files bytes)." ;;
    esac
  done
  echo "native layers = lowerdirs of a container's overlay mount that are not a snapshot's /fs (of all lowerdirs)."
  for c in "${!FAIL[@]}"; do
    [ -n "${UNAVAIL[${c#*|}]:-}" ] && continue
    echo "- failed ${c//|/ }: ${FAIL[$c]}"
  done | sort
  for s in "${!UNAVAIL[@]}"; do echo "- $s: ${UNAVAIL[$s]}"; done | sort
} >"$WORK/table.md"

mkdir -p "$(dirname "$OUT")"
{
  echo "# bench-warm $(date -u +%FT%TZ): warm reads of fully fetched layers, timed inside the container"
  echo "# systems: ${SYSTEMS[*]}; measures: ${MEASURES[*]}; RUNS=$RUNS; image: bookworm minbase + python3"
  echo "# + app + data layers (scripts/rootfs.sh oci --data), eStargz by Go ctr-remote convert."
  echo "# Goal (issue 16): MEASURE_SYSTEM_vs_overlay (overlay s / system s) >= 0.9. See the header of"
  echo "# scripts/bench-warm.sh for every key."
  printf '%s\n' "${RESULTS[@]}"
  echo
  cat "$WORK/table.md"
} >"$OUT"
cp "$WORK/table.md" "$TABLE"
cat "$WORK/table.md" >&2
log "wrote $OUT and $TABLE"
