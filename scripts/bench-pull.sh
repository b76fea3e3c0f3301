#!/usr/bin/env bash
# Cold-start benchmark matrix (issue 11; issue 6's lazy-pull benchmark is one of its cells): the
# time from the start of a pull to the end of a workload in a container, for every
#   workload × link × system, all in one run, each cell the median of RUNS fresh pulls.
#
# Image: the bookworm minbase + python3 rootfs of scripts/rootfs.sh with its data layer
# (`rootfs.sh oci --data`: 4 layers, base / python stdlib / app / data), pushed as gzip, and its
# eStargz conversion by Go's `ctr-remote image convert --estargz --oci` WITHOUT optimization (no
# prefetch landmark). The conversion is cached in $STARGZ_TESTBED_CACHE keyed by the gzip manifest
# digest and Go's ctr-remote binary.
#
# Workloads (the files are in scripts/testbed-app/, the app layer of the image):
#   imports  python3 /app/imports.py: imports 273 stdlib modules across packages (json, http.client,
#            email.*, xml.*, asyncio, unittest, sqlite3, decimal, ...); many small files
#   tools    sh /app/tools.sh: 52 steps running coreutils, util-linux, grep/sed/mawk, perl with
#            modules, debconf, dpkg/apt-cache, tar/gzip, find/xargs, diff, pydoc; binaries + libraries
#   print    python3 -c print(1): few files (issue 6's headline)
#   large    sha256sum -c /data/large.sha256: reads one 64 MiB file (~29 MB as eStargz); bytes,
#            not latency, dominate
# Links (scripts/netlink.sh; registry in a network namespace, RATE/DELAY_MS with the delay one way):
#   100mbit/10 (20 ms RTT), 1gbit/25 (50 ms RTT), 20mbit/5 (10 ms RTT), loopback (no tbf, no delay:
#   the same veth + delay-proxy path with nothing emulated)
# Systems:
#   ours  our containerd-stargz-grpc + our `ctr-remote image rpull` + `ctr run --snapshotter stargz`
#   go    Go's containerd-stargz-grpc (scripts/go-daemon.sh) + Go's /usr/bin/ctr-remote rpull
#   full  containerd's overlayfs: `ctr image pull` of the gzip image + `ctr run`. To keep the run
#         short the image is pulled ONCE per run and link, then each workload runs on it; a full
#         cell's time is that pull's time + the workload's own `ctr run` time.
# Optimized images (issue 12): per workload, the gzip image optimized
# for that workload (`image optimize --oci --args <its command>`) by our ctr-remote and by Go's,
# then cold-started lazily like `ours`/`go` (prefetch of everything before the landmark at mount):
#   ours-opt    our daemon and rpull on the image optimized by OUR ctr-remote
#   ours-goopt  our daemon and rpull on the image optimized by GO's ctr-remote
#   go-goopt    Go's daemon and rpull on the image optimized by Go's
# Their goals: ours-opt / ours-goopt <= 1 (our optimize is as good as Go's, same daemon) and
# ours-goopt / go-goopt <= 1 (our daemon on Go's optimized image). The optimized images are cached
# in $STARGZ_TESTBED_CACHE keyed by the gzip image, the optimizing binary and the workload.
# zstd:chunked (issue 14; not in the default SYSTEMS): the same tree converted by Go's
# `ctr-remote image convert --zstdchunked --oci` without optimization (cached like the eStargz one):
#   ours-zstd   our daemon and rpull on the zstd:chunked image (against `ours`: zstd vs gzip)
#   go-zstd     Go's daemon and rpull on it
# e.g. SYSTEMS="ours ours-zstd go go-zstd" WORKLOADS=imports BIG=0.
# Every timed step starts with a dropped page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`),
# each lazy run with a fresh daemon, containerd and cache, each full run with a fresh containerd.
#
# What a cell reports (pull.txt keys WORKLOAD_LINK_SYSTEM_*; the table has one row per
# workload × link):
#   seconds        median of the runs (and the runs); a failed cell says "failed: <reason>" and the
#                  matrix goes on (its later runs are skipped)
#   ratios         to Go's cell and to the full pull's cell on the same link
#   blob_requests  blob requests the registry answered during pull + run (GET and HEAD of
#                  /v2/*/blobs/*, counted in the registry's access log inside the namespace). Our
#                  daemon holds its background fetch back while the container reads, so these are
#                  the requests the start-up waited for; Go's daemon fetches in the background from
#                  the start, so its count includes background requests
#   fetched_bytes  bytes the registry sent through the link during pull + run (delay-proxy counter)
#   limit          the physical limit of a lazy start: compressed bytes of the files the workload
#                  really reads ÷ the link's rate + RTTS round trips (4: connection, manifest,
#                  config and TOCs in parallel, file data in parallel) + the workload's `ctr run`
#                  time on the fully local image (the full system's run time on that link; without
#                  `full` in SYSTEMS, the one measured while tracing). The files read are traced
#                  once per workload on the gzip image unpacked by containerd's `native`
#                  snapshotter (overlayfs opens lower files O_NOATIME): every file of the
#                  container's rootfs gets atime 0, the workload runs, and the files whose atime
#                  moved (relatime) are looked up in the eStargz TOCs (a file's compressed size =
#                  the distance from its first chunk's gzip member to the next file's member,
#                  summed over its chunks; files the workload wrote itself are not in a TOC and
#                  are reported as *_read_files_not_in_toc)
# Memory and disk (issue 6's flat-RSS check) come from one cell: `imports` on 100mbit/10, last
# run, after the background fetch has settled (no new bytes for SETTLE_QUIET s): each daemon's
# peak RSS (VmHWM) and its cache's disk use (`du -sb <root>/stargz`), also on the zstd:chunked
# image when ours-zstd / go-zstd run, and with BIG=1 for an image about twice as big
# (`rootfs.sh oci --data --big`, one run).
#
#   scripts/bench-pull.sh        writes bench-results/pull.txt (key = value lines, then the
#                                markdown table) and bench-results/pull.md (the table alone)
# Environment:
#   WORKLOADS ("imports tools print large"), LINKS ("100mbit/10 1gbit/25 20mbit/5 loopback"),
#   SYSTEMS ("ours go full ours-opt ours-goopt go-goopt"; also ours-zstd go-zstd), RUNS (3), BIG (1: also the twice-as-big image's RSS check; 0: not),
#   DAEMON / CTR_REMOTE (ours; default target/release/...), DAEMON_TOML (added to our daemon's
#   config, e.g. $'[fuse]\nattr_timeout = 1' for an A/B of one setting), GO_DAEMON (a binary; default built by
#   scripts/go-daemon.sh; empty: no `go` cells), GO_CTR_REMOTE (/usr/bin/ctr-remote),
#   DELAY_PROXY (binary; default built with cargo), RTTS (4), SETTLE_TIMEOUT (180 s),
#   SETTLE_QUIET (5 s), STEP_TIMEOUT (300 s for one pull or one run), OUT
#   (bench-results/pull.txt), TABLE (OUT with .md), KEEP=1 (keep the work dir for debugging),
#   LOG_LEVEL (the daemons' --log-level, info) and LOGS (a directory: each lazy run's daemon log
#   is kept there as WORKLOAD_LINK_SYSTEM_RUN.log, to see what a slow run waited for, and the
#   traced list of files each workload reads as read-WORKLOAD.txt).
# Every process and mount started here is removed on exit, Ctrl-C included. On the 2-core test
# machine, with the conversions cached, ours/go/full took 14 min and the three optimized systems
# 12 min (the default runs both, ~26 min); the very first run also debootstraps (~2 min),
# converts both images (~100 s) and optimizes each workload with both tools (~3 min).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r -a WORKLOADS <<<"${WORKLOADS:-imports tools print large}"
read -r -a LINKS <<<"${LINKS:-100mbit/10 1gbit/25 20mbit/5 loopback}"
read -r -a SYSTEMS <<<"${SYSTEMS:-ours go full ours-opt ours-goopt go-goopt}"
RUNS=${RUNS:-3}
BIG=${BIG:-1}
OUT=${OUT:-$REPO/bench-results/pull.txt}
TABLE=${TABLE:-${OUT%.txt}.md}
DAEMON=${DAEMON:-$REPO/target/release/containerd-stargz-grpc}
CTR_REMOTE=${CTR_REMOTE:-$REPO/target/release/ctr-remote}
GO_CTR_REMOTE=${GO_CTR_REMOTE:-/usr/bin/ctr-remote}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-180}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
RTTS=${RTTS:-4}
CACHE=${STARGZ_TESTBED_CACHE:-/var/cache/stargz-testbed}
LINK=bench$$
NETLINK=$REPO/scripts/netlink.sh
RSS_CELL="imports 100mbit/10"
START=$(date +%s)

BENCH_NAME=bench-pull
# log, die, has, median, start_containerd, start_lazy, settle, prepare_image, cleanup, ...
source "$REPO/scripts/lib-bench.sh"

# Command and the regex its last output line must match, of each workload.
declare -A WCMD=(
  [imports]="python3 /app/imports.py"
  [tools]="sh /app/tools.sh"
  [print]="python3 -c print(1)"
  [large]="sha256sum -c /data/large.sha256"
)
declare -A WEXPECT=(
  [imports]='^imported [0-9]+ modules$'
  [tools]='^tools: [0-9]+ steps$'
  [print]='^1$'
  [large]='^/data/large.bin: OK$'
)
for w in "${WORKLOADS[@]}"; do [ -n "${WCMD[$w]:-}" ] || die "unknown workload '$w' (imports tools print large)"; done
LAZY_SYSTEMS=(ours go ours-opt ours-goopt go-goopt ours-zstd go-zstd)
for s in "${SYSTEMS[@]}"; do has "$s" full "${LAZY_SYSTEMS[@]}" || die "unknown system '$s' (full ${LAZY_SYSTEMS[*]})"; done
# Whether any system of SYSTEMS runs an optimized image.
wants_opt() { local s; for s in "${SYSTEMS[@]}"; do [[ $s == *opt ]] && return 0; done; return 1; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "bad RUNS '$RUNS'"

for l in "${LINKS[@]}"; do parse_link "$l"; done

# Bytes per second of a tc rate (100mbit, 1gbit, 500kbit); 0 for none.
rate_bytes() {
  local r=${1,,}
  [ "$r" = none ] && { echo 0; return; }
  [[ $r =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "bad rate '$1' (e.g. 100mbit)"
  case "${BASH_REMATCH[2]}" in
    bit) echo $((BASH_REMATCH[1] / 8)) ;; kbit) echo $((BASH_REMATCH[1] * 1000 / 8)) ;;
    mbit) echo $((BASH_REMATCH[1] * 1000000 / 8)) ;; gbit) echo $((BASH_REMATCH[1] * 1000000000 / 8)) ;;
  esac
}

require_tools
use_delay_proxy
make_work bench-pull

# The registry's access log (combined format, one line per answered request) of the current link;
# req_mark prints its size, req_since MARK counts the blob requests (and ALL=1 every request) after it.
reglog() { echo "/run/stargz-testbed/netlink/$LINK/registry.log"; }
req_mark() { stat -c %s "$(reglog)" 2>/dev/null || echo 0; }
req_since() {
  local pat='^[0-9a-f.:]+ - - \[[^]]*\] "(GET|HEAD) /v2/[^ ]+/blobs/'
  [ "${ALL:-0}" = 1 ] && pat='^[0-9a-f.:]+ - - \[[^]]*\] "[A-Z]+ /v2/'
  tail -c +$(($1 + 1)) "$(reglog)" 2>/dev/null | grep -cE "$pat" || true
}

# Runs workload W in a fresh container of REF with SNAPSHOTTER on containerd SOCK; sets OUTPUT.
# Non-zero with the reason in $WORK/why if it failed or printed something else than expected.
run_workload() {
  local sock=$1 ref=$2 snapshotter=$3 w=$4 cmd last
  read -r -a cmd <<<"${WCMD[$w]}"
  if ! OUTPUT=$(timeout "$STEP_TIMEOUT" ctr --address "$sock" run --rm --snapshotter "$snapshotter" "$ref" \
        "run$RANDOM" "${cmd[@]}" 2>&1); then
    { echo "ctr run failed:"; echo "$OUTPUT" | tail -n 3; } | tr '\n' ' ' >"$WORK/why"; return 1
  fi
  last=$(echo "$OUTPUT" | tr -d '\r' | tail -n1)
  if ! [[ $last =~ ${WEXPECT[$w]} ]]; then
    echo "${WCMD[$w]} printed: $(echo "$OUTPUT" | tail -n 3 | tr '\n' ' ')" >"$WORK/why"; return 1
  fi
}

# ---- images: gzip and eStargz in one registry storage that every link's registry serves ----
link_up loopback

prepare_image python-data
[ "$BIG" = 1 ] && prepare_image python-data-big
if has ours-zstd "${SYSTEMS[@]}" || has go-zstd "${SYSTEMS[@]}"; then
  prepare_conversion python-data "$(jq -r '.manifests[0].digest' "$WORK/oci-python-data/index.json")" zstd --zstdchunked
fi

# Pushes bench/python-data:TAG-W, the gzip image optimized for workload W by ctr-remote BINARY
# (TAG opt: ours, goopt: Go's); from the cache when this image, binary and workload were seen
# (the cache keeps the last binary's optimization of each workload).
# Set-up, not measured: the build containerd is on the host, so nothing crosses a limited link.
prepare_optimized() {
  local tag=$1 bin=$2 w=$3 gz_digest key cached args t0
  local ref=$ADDR/bench/python-data:$tag-$w
  gz_digest=$(jq -r '.manifests[0].digest' "$WORK/oci-python-data/index.json")
  key=$( { echo "$gz_digest ${WCMD[$w]}"; sha256sum <"$bin"; } | sha256sum | cut -c1-16)
  cached=$CACHE/opt-python-data-$tag-$w-$key
  push_cached "$cached" "python-data:$tag-$w" && return 0
  t0=$(now)
  args=$(tr ' ' '\n' <<<"${WCMD[$w]}" | jq -R . | jq -sc .)
  start_containerd "opt-$tag-$w"
  ctr --address "$CTRD_SOCK" image pull --plain-http "$ADDR/bench/python-data:gzip" >/dev/null
  "$bin" --address "$CTRD_SOCK" image optimize --oci --args "$args" \
    "$ADDR/bench/python-data:gzip" "$ref" >"$WORK/opt-$tag-$w.out" 2>&1 \
    || die "$bin image optimize for $w failed: $(tail -n 3 "$WORK/opt-$tag-$w.out")"
  ctr --address "$CTRD_SOCK" image push --plain-http "$ref" >/dev/null
  stop_containerd
  rm -rf "$WORK/opt-$tag-$w"
  store_cached "python-data:$tag-$w" "$cached"
  # Each build of the binary has its own key: keep only this one's image (94 MB each).
  local stale
  for stale in "$CACHE/opt-python-data-$tag-$w"-*; do
    [ "$stale" = "$cached" ] || rm -rf "$stale"
  done
  log "optimized bench/python-data for $w with $bin in $(elapsed "$t0" "$(now)") s (cached in $cached)"
}
if wants_opt; then
  for w in "${WORKLOADS[@]}"; do
    has ours-opt "${SYSTEMS[@]}" && prepare_optimized opt "$CTR_REMOTE" "$w"
    { has ours-goopt "${SYSTEMS[@]}" || has go-goopt "${SYSTEMS[@]}"; } && prepare_optimized goopt "$GO_CTR_REMOTE" "$w"
  done
fi

result host_load_at_start "$(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine makes every number noisier)"
GZ_MANIFEST=$(manifest python-data gzip)
ESGZ_MANIFEST=$(manifest python-data esgz)
result image "bookworm minbase + python3 + app + data layer (rootfs.sh oci --data), $(jq '.layers | length' <<<"$GZ_MANIFEST") layers"
result image_compressed_bytes "$(jq '[.layers[].size] | add' <<<"$GZ_MANIFEST")"
UNCOMPRESSED=$(file_bytes "$WORK/oci-python-data")
result image_file_bytes "$UNCOMPRESSED"
ESGZ_BYTES=$(jq '[.layers[].size] | add' <<<"$ESGZ_MANIFEST")
result image_estargz_compressed_bytes "$ESGZ_BYTES"
ESGZ_BLOBS=()
for d in $(jq -r '.layers[].digest' <<<"$ESGZ_MANIFEST"); do ESGZ_BLOBS+=("$(blob_path "$d")"); done

# `toc_sizes LIST BLOB...` reads the TOCs of the eStargz blobs (bottom layer first) and, for the
# paths in the file LIST (relative, one a line), prints "FILES FILE_BYTES COMPRESSED_BYTES MISSING":
# a path counts in the topmost layer whose TOC has it; its compressed bytes run from its first
# chunk's gzip member to the next member of another file (or the TOC), over all its chunks.
# `toc_sizes --toc-bytes BLOB...` prints the compressed size of the TOCs.
toc_sizes() {
  python3 - "$@" <<'PY'
import gzip, io, json, sys, tarfile
args = sys.argv[1:]
toc_only = args[0] == "--toc-bytes"
blobs = args[1:]
layers, toc_total = [], 0
for path in blobs:
    with open(path, "rb") as f:
        f.seek(-51, 2)
        footer = f.read(51)
        toc_off = int(footer[16:32], 16)  # gzip header (10) + XLEN (2) + SI1 SI2 LEN (4)
        assert footer[32:38] == b"STARGZ", path
        f.seek(toc_off)
        member = f.read()[:-51]
        size = f.tell()
    toc_total += size - toc_off
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member))) as t:
        toc = json.load(t.extractfile("stargz.index.json"))
    entries = [e for e in toc["entries"]]
    def has_data(e):
        return e.get("type") in ("reg", "chunk") and e.get("size", 0) > 0 and "offset" in e
    offsets = sorted({e["offset"] for e in entries if has_data(e)})
    nxt = {o: (offsets[i + 1] if i + 1 < len(offsets) else toc_off) for i, o in enumerate(offsets)}
    def norm(n):
        return (n[2:] if n.startswith("./") else n).lstrip("/")
    files, links, cur = {}, {}, None
    for e in entries:
        name, kind = norm(e["name"]), e.get("type")
        cost = nxt[e["offset"]] - e["offset"] if has_data(e) else 0
        if kind == "reg":
            files[name] = [e.get("size", 0), cost]
            cur = name
        elif kind == "chunk" and cur is not None:
            files[cur][1] += cost
        elif kind == "hardlink":
            links[name] = norm(e["linkName"])
    layers.append((files, links))
if toc_only:
    print(toc_total)
    sys.exit(0)
n = fb = cb = missing = 0
for p in sorted({l.strip() for l in open(args[0]) if l.strip()}):
    for files, links in reversed(layers):
        q = links.get(p, p)
        if q in files:
            n += 1; fb += files[q][0]; cb += files[q][1]
            break
    else:
        missing += 1
print(n, fb, cb, missing)
PY
}
result image_estargz_toc_bytes "$(toc_sizes --toc-bytes "${ESGZ_BLOBS[@]}")"

# ---- which files each workload reads (atime trace on the unpacked gzip image) ----
# Overlayfs opens the lower files with O_NOATIME, so the trace uses containerd's `native`
# snapshotter instead: a container's rootfs is a plain directory (a copy of the layers), whose
# files get atime 0 before the workload starts; relatime then stamps every file it opens, execs
# or maps.
declare -A READ_CBYTES TRACE_RUN
trace_reads() {
  local ref=$ADDR/bench/python-data:gzip w t0 t1 id snap cmd out
  start_containerd trace
  ctr --address "$CTRD_SOCK" image pull --snapshotter native --plain-http "$ref" >/dev/null
  for w in "${WORKLOADS[@]}"; do
    id=trace-$w
    read -r -a cmd <<<"${WCMD[$w]}"
    ctr --address "$CTRD_SOCK" container create --snapshotter native "$ref" "$id" -- "${cmd[@]}" >/dev/null
    # `mounts` prints the bind mount of the container's snapshot: its source is the directory.
    snap=$(ctr --address "$CTRD_SOCK" snapshots --snapshotter native mounts /mnt "$id" | awk '{ print $4 }')
    [ -d "$snap" ] || die "no native snapshot directory for $id ($snap)"
    find "$snap" -type f -exec touch -a -d @0 {} +
    drop_caches
    t0=$(now)
    if ! out=$(timeout "$STEP_TIMEOUT" ctr --address "$CTRD_SOCK" task start "$id" 2>&1) \
        || ! [[ $(echo "$out" | tr -d '\r' | tail -n1) =~ ${WEXPECT[$w]} ]]; then
      log "trace of $w failed: $(echo "$out" | tail -n 3)"
      ctr --address "$CTRD_SOCK" container rm "$id" >/dev/null 2>&1 || true
      continue
    fi
    t1=$(now)
    TRACE_RUN[$w]=$(elapsed "$t0" "$t1")
    find "$snap" -type f -printf '%A@\t%P\n' | awk -F'\t' '$1 + 0 > 0 { print $2 }' >"$WORK/read-$w.txt"
    if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS"; cp "$WORK/read-$w.txt" "$LOGS/read-$w.txt"; fi
    ctr --address "$CTRD_SOCK" task rm "$id" >/dev/null 2>&1 || true
    ctr --address "$CTRD_SOCK" container rm "$id" >/dev/null
    local n fb cb missing
    read -r n fb cb missing < <(toc_sizes "$WORK/read-$w.txt" "${ESGZ_BLOBS[@]}")
    READ_CBYTES[$w]=$cb
    result "${w}_command" "${WCMD[$w]}"
    result "${w}_read_files" "$n"
    result "${w}_read_file_bytes" "$fb"
    result "${w}_read_compressed_bytes" "$cb"
    [ "$missing" = 0 ] || result "${w}_read_files_not_in_toc" "$missing"
    result "${w}_local_run_seconds_traced" "${TRACE_RUN[$w]}"
  done
  stop_containerd
  rm -rf "$WORK/trace"
}
trace_reads

# ---- the matrix ----
OURS_OK=0; GO_OK=0
# Whether SYSTEMS has a system of daemon PREFIX (ours|go).
uses() { local s; for s in "${SYSTEMS[@]}"; do [[ $s == "$1" || $s == "$1"-* ]] && return 0; done; return 1; }
if uses ours; then
  if [ -x "$DAEMON" ] && [ -x "$CTR_REMOTE" ]; then OURS_OK=1; result ours_binaries "$DAEMON $CTR_REMOTE"
  else result ours_lazy_seconds "not available: $DAEMON or $CTR_REMOTE not built (make release)"; fi
fi
if uses go; then
  find_go_daemon
  if [ -n "$GO_DAEMON" ] && [ -x "$GO_DAEMON" ]; then GO_OK=1; result go_binaries "$GO_DAEMON $GO_CTR_REMOTE"
  else result go_lazy_seconds "not available: no Go containerd-stargz-grpc (scripts/go-daemon.sh: $(tail -n 2 "$WORK/go-daemon.log" 2>/dev/null | tr '\n' ' '))"; fi
fi

# Per cell "W|LKEY|S": run times, failure, and the last run's requests and bytes.
declare -A TIMES FAIL REQS REQS_ALL FETCHED REMOTE LOCALRUN PULLT
cell_failed() { [ -n "${FAIL[$1]:-}" ]; }

# One lazy run of workload W with system S (one of LAZY_SYSTEMS) and variant V: fresh daemon,
# containerd and cache. Sets T, and REQ/REQ_ALL/BYTES_RUN of pull + run; with settle=1 also
# RSS/CACHE_DISK/TOTAL. The image is V's eStargz conversion, or for an *opt system V's
# optimization for W.
lazy_run() {
  local s=$1 w=$2 v=$3 do_settle=$4 daemon rpull dir sock pid mark before t0 t1
  local extra=""
  if [[ $s == ours* ]]; then daemon=$DAEMON; rpull=$CTR_REMOTE; extra=${DAEMON_TOML:-}
  else daemon=$GO_DAEMON; rpull=$GO_CTR_REMOTE; fi
  local tag=esgz
  case $s in *-opt) tag=opt-$w ;; *-goopt) tag=goopt-$w ;; *-zstd) tag=zstd ;; esac
  dir=$WORK/lazy-$s; rm -rf "$dir" "$WORK/lazy-$s-ctrd"
  local rc=0
  start_lazy "$daemon" "$dir" "lazy-$s-ctrd" "$extra" || rc=1
  pid=$DAEMON_PID; sock=$CTRD_SOCK
  if [ "$rc" = 0 ]; then
    local ref=$ADDR/bench/$v:$tag
    drop_caches
    mark=$(req_mark); before=$(served)
    t0=$(now)
    if ! timeout "$STEP_TIMEOUT" "$rpull" --address "$sock" image rpull --plain-http "$ref" >"$dir/pull.out" 2>&1; then
      { echo "rpull failed: "; tail -n 3 "$dir/pull.out"; } | tr '\n' ' ' >"$WORK/why"; rc=1
    elif ! run_workload "$sock" "$ref" stargz "$w"; then
      rc=1
    else
      t1=$(now)
      T=$(elapsed "$t0" "$t1")
      BYTES_RUN=$(( $(served) - before ))
      REQ=$(req_since "$mark"); REQ_ALL=$(ALL=1 req_since "$mark")
      # Layers served lazily (Go logs remote-snapshot-prepared only at debug level).
      NREMOTE=$(grep -F "$dir/root" /proc/self/mountinfo | grep -c ' - fuse' || true)
      if [ "$do_settle" = 1 ]; then
        settle
        TOTAL=$(( $(served) - before ))
        RSS=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo "n/a")
        CACHE_DISK=$(du -sb "$dir/root/stargz" 2>/dev/null | cut -f1 || echo 0)
      fi
      if ! kill -0 "$pid" 2>/dev/null; then echo "daemon exited during the run" >"$WORK/why"; rc=1; fi
    fi
  fi
  [ "$rc" = 0 ] || echo " (daemon log: $(daemon_complaints "$dir"))" >>"$WORK/why"
  # Done with this pair: SIGINT makes the daemon unmount everything.
  stop_lazy "$dir"
  if [ -n "${LOGS:-}" ]; then
    mkdir -p "$LOGS"
    LOG_SEQ=$(( ${LOG_SEQ:-0} + 1 ))
    cp "$dir/daemon.log" "$LOGS/${w}_${LKEY}_${s}_${LOG_SEQ}.log" 2>/dev/null || true
  fi
  grep -qF "$dir/" /proc/self/mountinfo || rm -rf "$dir" "$WORK/lazy-$s-ctrd"
  return "$rc"
}

# One run of the full system on the current link: pull once, then every workload. Fills TIMES etc.
full_run() {
  local ref=$ADDR/bench/python-data:gzip mark before t0 t1 p w c reason=""
  start_containerd full
  drop_caches
  mark=$(req_mark); before=$(served)
  t0=$(now)
  if ! timeout "$STEP_TIMEOUT" ctr --address "$CTRD_SOCK" image pull --plain-http "$ref" >"$WORK/full.out" 2>&1; then
    reason="pull failed: $(tail -n 3 "$WORK/full.out" | tr '\n' ' ')"
  else
    t1=$(now); p=$(elapsed "$t0" "$t1")
    local req req_all bytes
    bytes=$(( $(served) - before )); req=$(req_since "$mark"); req_all=$(ALL=1 req_since "$mark")
  fi
  for w in "${WORKLOADS[@]}"; do
    c="$w|$LKEY|full"
    cell_failed "$c" && continue
    if [ -n "$reason" ]; then FAIL[$c]=$reason; continue; fi
    drop_caches
    t0=$(now)
    if ! run_workload "$CTRD_SOCK" "$ref" overlayfs "$w"; then FAIL[$c]=$(cat "$WORK/why"); continue; fi
    t1=$(now)
    TIMES[$c]="${TIMES[$c]:-} $(add "$p" "$(elapsed "$t0" "$t1")")"
    LOCALRUN[$c]="${LOCALRUN[$c]:-} $(elapsed "$t0" "$t1")"
    PULLT[$c]="${PULLT[$c]:-} $p"
    REQS[$c]=$req; REQS_ALL[$c]=$req_all; FETCHED[$c]=$bytes
  done
  stop_containerd
  rm -rf "$WORK/full"
}

declare -A RSSV CACHEV TOTALV
for l in "${LINKS[@]}"; do
  link_up "$l"
  rtt=$(curl -s -o /dev/null -o /dev/null -w '%{time_starttransfer}\n' "http://$ADDR/v2/" "http://$ADDR/v2/" | tail -n1)
  result "link_${LKEY}" "rate $LRATE, one-way delay ${LDELAY} ms; measured /v2/ round trip on an open connection ${rtt}s"
  for r in $(seq 1 "$RUNS"); do
    log "link $l, run $r of $RUNS"
    has full "${SYSTEMS[@]}" && full_run
    for w in "${WORKLOADS[@]}"; do
      for s in "${LAZY_SYSTEMS[@]}"; do
        has "$s" "${SYSTEMS[@]}" || continue
        [[ $s == ours* ]] && [ "$OURS_OK" = 0 ] && continue
        [[ $s == go* ]] && [ "$GO_OK" = 0 ] && continue
        c="$w|$LKEY|$s"
        cell_failed "$c" && continue
        st=0; [ "$w $l" = "$RSS_CELL" ] && [ "$r" = "$RUNS" ] && has "$s" ours go ours-zstd go-zstd && st=1
        if lazy_run "$s" "$w" python-data "$st"; then
          TIMES[$c]="${TIMES[$c]:-} $T"
          REQS[$c]=$REQ; REQS_ALL[$c]=$REQ_ALL; FETCHED[$c]=$BYTES_RUN; REMOTE[$c]=$NREMOTE
          if [ "$st" = 1 ]; then RSSV[$s]=$RSS; CACHEV[$s]=$CACHE_DISK; TOTALV[$s]=$TOTAL; fi
          log "$w $l $s run $r: ${T}s, $REQ blob requests, $BYTES_RUN bytes"
        else
          FAIL[$c]=$(cat "$WORK/why")
          log "$w $l $s run $r failed: ${FAIL[$c]}"
        fi
      done
    done
  done
  # The big image's memory check (BIG=1): one run per daemon on the RSS cell's link.
  if [ "$BIG" = 1 ] && [ "$l" = "${RSS_CELL#* }" ]; then
    for s in ours go; do
      has "$s" "${SYSTEMS[@]}" || continue
      [ "$s" = ours ] && [ "$OURS_OK" = 0 ] && continue
      [ "$s" = go ] && [ "$GO_OK" = 0 ] && continue
      if lazy_run "$s" "${RSS_CELL%% *}" python-data-big 1; then
        RSSV[$s-big]=$RSS; CACHEV[$s-big]=$CACHE_DISK; TOTALV[$s-big]=$TOTAL
        result "${s}_lazy_big_seconds" "$T"
      else
        result "${s}_lazy_big_seconds" "failed: $(cat "$WORK/why")"
      fi
    done
  fi
  "$NETLINK" down "$LINK" >/dev/null 2>&1 || true
done

# ---- results ----
declare -A MED
for l in "${LINKS[@]}"; do
  parse_link "$l"
  for w in "${WORKLOADS[@]}"; do
    for s in full "${LAZY_SYSTEMS[@]}"; do
      c="$w|$LKEY|$s"; k="${w}_${LKEY}_${s//-/_}"
      has "$s" "${SYSTEMS[@]}" || continue
      if cell_failed "$c"; then result "${k}_seconds" "failed: ${FAIL[$c]}"; continue; fi
      [ -n "${TIMES[$c]:-}" ] || continue
      read -r -a ts <<<"${TIMES[$c]}"
      MED[$c]=$(median "${ts[@]}")
      result "${k}_seconds" "${MED[$c]}"
      result "${k}_seconds_runs" "${ts[*]}"
      if [ "$s" = full ]; then
        read -r -a ps <<<"${PULLT[$c]}"; read -r -a rs <<<"${LOCALRUN[$c]}"
        result "${k}_pull_seconds" "$(median "${ps[@]}")"
        result "${k}_run_seconds" "$(median "${rs[@]}")"
      else
        result "${k}_fuse_mounts" "${REMOTE[$c]}"
      fi
      result "${k}_blob_requests" "${REQS[$c]}"
      result "${k}_all_requests" "${REQS_ALL[$c]}"
      result "${k}_fetched_bytes" "${FETCHED[$c]}"
    done
    for s in ours go; do
      [ -n "${MED[$w|$LKEY|$s]:-}" ] || continue
      [ -n "${MED[$w|$LKEY|go]:-}" ] && [ "$s" = ours ] && result "${w}_${LKEY}_ours_over_go" "$(ratio "${MED[$w|$LKEY|ours]}" "${MED[$w|$LKEY|go]}")"
      [ -n "${MED[$w|$LKEY|full]:-}" ] && result "${w}_${LKEY}_${s}_over_full" "$(ratio "${MED[$w|$LKEY|$s]}" "${MED[$w|$LKEY|full]}")"
    done
    # Issue 12's goals: our optimize against Go's (same daemon), our daemon against Go's on Go's image.
    if [ -n "${MED[$w|$LKEY|ours-opt]:-}" ] && [ -n "${MED[$w|$LKEY|ours-goopt]:-}" ]; then
      result "${w}_${LKEY}_ours_opt_over_ours_goopt" "$(ratio "${MED[$w|$LKEY|ours-opt]}" "${MED[$w|$LKEY|ours-goopt]}")"
    fi
    if [ -n "${MED[$w|$LKEY|ours-goopt]:-}" ] && [ -n "${MED[$w|$LKEY|go-goopt]:-}" ]; then
      result "${w}_${LKEY}_ours_goopt_over_go_goopt" "$(ratio "${MED[$w|$LKEY|ours-goopt]}" "${MED[$w|$LKEY|go-goopt]}")"
    fi
    # Issue 14: zstd:chunked against eStargz (same daemon), and our daemon against Go's on it.
    if [ -n "${MED[$w|$LKEY|ours-zstd]:-}" ] && [ -n "${MED[$w|$LKEY|ours]:-}" ]; then
      result "${w}_${LKEY}_ours_zstd_over_ours" "$(ratio "${MED[$w|$LKEY|ours-zstd]}" "${MED[$w|$LKEY|ours]}")"
    fi
    if [ -n "${MED[$w|$LKEY|ours-zstd]:-}" ] && [ -n "${MED[$w|$LKEY|go-zstd]:-}" ]; then
      result "${w}_${LKEY}_ours_zstd_over_go_zstd" "$(ratio "${MED[$w|$LKEY|ours-zstd]}" "${MED[$w|$LKEY|go-zstd]}")"
    fi
    # The physical limit of a lazy start on this link.
    local_run=""
    if [ -n "${LOCALRUN[$w|$LKEY|full]:-}" ]; then read -r -a rs <<<"${LOCALRUN[$w|$LKEY|full]}"; local_run=$(median "${rs[@]}")
    else local_run=${TRACE_RUN[$w]:-}; fi
    if [ -n "$local_run" ] && [ -n "${READ_CBYTES[$w]:-}" ]; then
      MED[$w|$LKEY|limit]=$(awk -v b="${READ_CBYTES[$w]}" -v bw="$(rate_bytes "$LRATE")" -v n="$RTTS" \
        -v d="$LDELAY" -v run="$local_run" 'BEGIN { printf "%.2f", (bw > 0 ? b / bw : 0) + n * 2 * d / 1000 + run }')
      result "${w}_${LKEY}_limit_seconds" "${MED[$w|$LKEY|limit]}"
      [ -n "${MED[$w|$LKEY|ours]:-}" ] && result "${w}_${LKEY}_ours_over_limit" "$(ratio "${MED[$w|$LKEY|ours]}" "${MED[$w|$LKEY|limit]}")"
    fi
  done
done

# issue 6's keys, from the cells that measure the same things now.
for s in ours go; do
  c="print|100mbit_10|$s"
  [ -n "${MED[$c]:-}" ] || continue
  result "${s}_lazy_seconds" "${MED[$c]}"
  [ -n "${MED[print|100mbit_10|full]:-}" ] && result "${s}_lazy_over_full_gzip" "$(ratio "${MED[$c]}" "${MED[print|100mbit_10|full]}")"
  result "${s}_lazy_fetched_bytes_until_python_exit" "${FETCHED[$c]}"
done
[ -n "${MED[print|100mbit_10|full]:-}" ] && result full_gzip_overlayfs_seconds "${MED[print|100mbit_10|full]}"
for s in ours go ours-zstd go-zstd; do
  [ -n "${RSSV[$s]:-}" ] || continue
  k=${s//-/_}
  result "${k}_lazy_peak_rss_kib" "${RSSV[$s]}"
  result "${k}_lazy_cache_disk_bytes" "${CACHEV[$s]}"
  result "${k}_lazy_cache_over_image_file_bytes" "$(ratio "${CACHEV[$s]}" "$UNCOMPRESSED")"
  result "${k}_lazy_fetched_bytes_after_background_fetch" "${TOTALV[$s]}"
  [[ $s == *-zstd ]] && continue
  result "${s}_lazy_fetched_after_background_over_estargz_bytes" "$(ratio "${TOTALV[$s]}" "$ESGZ_BYTES")"
  if [ -n "${RSSV[$s-big]:-}" ]; then
    result "${s}_lazy_big_peak_rss_kib" "${RSSV[$s-big]}"
    result "${s}_lazy_big_cache_disk_bytes" "${CACHEV[$s-big]}"
    result "${s}_peak_rss_big_over_normal" "$(ratio "${RSSV[$s-big]}" "${RSSV[$s]}")"
  fi
done
WALL=$(( $(date +%s) - START ))
result host_load_at_end "$(cut -d' ' -f1-3 /proc/loadavg)"
result matrix_wall_seconds "$WALL"

# The markdown table: one row per workload × link.
cellv() { if [ -n "${MED[$1]:-}" ]; then echo "${MED[$1]}"; elif cell_failed "$1"; then echo failed; else echo "–"; fi; }
rat() { if [ -n "${MED[$1]:-}" ] && [ -n "${MED[$2]:-}" ]; then ratio "${MED[$1]}" "${MED[$2]}"; else echo "–"; fi; }
num() { if [ -n "${MED[$1]:-}" ]; then echo "${2:-–}"; else echo "–"; fi; }
{
  if has ours "${SYSTEMS[@]}" || has go "${SYSTEMS[@]}" || has full "${SYSTEMS[@]}"; then
    echo "| workload | link | ours s | Go s | full s | ours/Go | ours/full | Go/full | ours req | Go req | ours MB | Go MB | read MB | limit s | ours/limit |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for w in "${WORKLOADS[@]}"; do
      for l in "${LINKS[@]}"; do
        parse_link "$l"; b="$w|$LKEY"
        echo "| $w | $l | $(cellv "$b|ours") | $(cellv "$b|go") | $(cellv "$b|full") | $(rat "$b|ours" "$b|go") | $(rat "$b|ours" "$b|full") | $(rat "$b|go" "$b|full") | $(num "$b|ours" "${REQS[$b|ours]:-}") | $(num "$b|go" "${REQS[$b|go]:-}") | $(num "$b|ours" "$(mb "${FETCHED[$b|ours]:-}")") | $(num "$b|go" "$(mb "${FETCHED[$b|go]:-}")") | $(mb "${READ_CBYTES[$w]:-}") | $(cellv "$b|limit") | $(rat "$b|ours" "$b|limit") |"
      done
    done
    echo
    echo "Medians of $RUNS fresh pulls each, seconds from pull start to the workload's exit; the whole matrix took $((WALL / 60)) min $((WALL % 60)) s."
    echo "full = one \`ctr image pull\` of the gzip image per run and link + the workload's own \`ctr run\`."
    echo "req = blob requests (GET/HEAD) the registry answered during pull + run; MB = bytes it sent (Go's daemon fetches in the background meanwhile)."
    echo "read MB = compressed bytes of the files the workload reads; limit = read MB ÷ rate + $RTTS RTT + the \`ctr run\` time on the local image."
  fi
  if wants_opt; then
    echo
    echo "Optimized images (each optimized for its workload): ours-opt = our daemon on the image optimized by our ctr-remote; ours-goopt = our daemon on Go's optimization; go-goopt = Go's daemon on Go's optimization."
    echo
    echo "| workload | link | ours-opt s | ours-goopt s | go-goopt s | ours-opt/ours-goopt | ours-goopt/go-goopt | ours-opt req | ours-goopt req | go-goopt req | ours-opt MB | ours-goopt MB | go-goopt MB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for w in "${WORKLOADS[@]}"; do
      for l in "${LINKS[@]}"; do
        parse_link "$l"; b="$w|$LKEY"
        echo "| $w | $l | $(cellv "$b|ours-opt") | $(cellv "$b|ours-goopt") | $(cellv "$b|go-goopt") | $(rat "$b|ours-opt" "$b|ours-goopt") | $(rat "$b|ours-goopt" "$b|go-goopt") | $(num "$b|ours-opt" "${REQS[$b|ours-opt]:-}") | $(num "$b|ours-goopt" "${REQS[$b|ours-goopt]:-}") | $(num "$b|go-goopt" "${REQS[$b|go-goopt]:-}") | $(num "$b|ours-opt" "$(mb "${FETCHED[$b|ours-opt]:-}")") | $(num "$b|ours-goopt" "$(mb "${FETCHED[$b|ours-goopt]:-}")") | $(num "$b|go-goopt" "$(mb "${FETCHED[$b|go-goopt]:-}")") |"
      done
    done
  fi
  if has ours-zstd "${SYSTEMS[@]}" || has go-zstd "${SYSTEMS[@]}"; then
    echo
    echo "zstd:chunked (Go's \`convert --zstdchunked --oci\` of the same tree, not optimized): ours-zstd = our daemon, go-zstd = Go's; ours = our daemon on the eStargz image."
    echo
    echo "| workload | link | ours-zstd s | ours s | go-zstd s | ours-zstd/ours | ours-zstd/go-zstd | ours-zstd req | ours req | go-zstd req | ours-zstd MB | ours MB | go-zstd MB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for w in "${WORKLOADS[@]}"; do
      for l in "${LINKS[@]}"; do
        parse_link "$l"; b="$w|$LKEY"
        echo "| $w | $l | $(cellv "$b|ours-zstd") | $(cellv "$b|ours") | $(cellv "$b|go-zstd") | $(rat "$b|ours-zstd" "$b|ours") | $(rat "$b|ours-zstd" "$b|go-zstd") | $(num "$b|ours-zstd" "${REQS[$b|ours-zstd]:-}") | $(num "$b|ours" "${REQS[$b|ours]:-}") | $(num "$b|go-zstd" "${REQS[$b|go-zstd]:-}") | $(num "$b|ours-zstd" "$(mb "${FETCHED[$b|ours-zstd]:-}")") | $(num "$b|ours" "$(mb "${FETCHED[$b|ours]:-}")") | $(num "$b|go-zstd" "$(mb "${FETCHED[$b|go-zstd]:-}")") |"
      done
    done
  fi
  for c in "${!FAIL[@]}"; do echo "- failed ${c//|/ }: ${FAIL[$c]}"; done | sort
} >"$WORK/table.md"

mkdir -p "$(dirname "$OUT")"
{
  echo "# bench-pull $(date -u +%FT%TZ): cold-start matrix, pull start -> end of the workload in a container"
  echo "# workloads: ${WORKLOADS[*]}; links: ${LINKS[*]}; systems: ${SYSTEMS[*]}; RUNS=$RUNS"
  echo "# registry in a netns behind tbf RATE + delay-proxy DELAY_MS each way (scripts/netlink.sh); image:"
  echo "# bookworm minbase + python3 + app + data layers (scripts/rootfs.sh oci --data); eStargz by Go"
  echo "# ctr-remote convert (no optimization). See the header of scripts/bench-pull.sh for every key."
  echo "# Goals (issue 6): ours_lazy_over_full_gzip <= 0.25, peak RSS < 24 MiB and flat (big/normal ~1),"
  echo "# cache disk <= 1.1x the uncompressed bytes fetched."
  printf '%s\n' "${RESULTS[@]}"
  echo
  cat "$WORK/table.md"
} >"$OUT"
cp "$WORK/table.md" "$TABLE"
cat "$WORK/table.md" >&2
log "wrote $OUT and $TABLE"
