# Shared helpers of the container benchmarks (scripts/bench-pull.sh, scripts/bench-warm.sh), sourced
# by them: `source "$REPO/scripts/lib-bench.sh"`. Not a benchmark itself (scripts/bench.sh runs every
# scripts/bench-*.sh, hence the name).
#
# The sourcing script sets, before calling anything here:
#   REPO (the checkout), BENCH_NAME (prefix of log lines), START ($(date +%s) at start),
#   CACHE ($STARGZ_TESTBED_CACHE), GO_CTR_REMOTE (Go's ctr-remote, converts to eStargz),
#   SETTLE_TIMEOUT (s), LINK (netlink.sh name of its registry link), NETLINK (scripts/netlink.sh),
#   and after `make_work PREFIX`: WORK (its work dir), PIDS (processes to stop on exit, in reverse
#   order) and SOCKS ("PID SOCKET" of each containerd, for removing containers on exit).
# Functions set globals rather than print them where the caller's shell must see the change
# (PIDS, SOCKS: a $(...) subshell would lose it): start_containerd sets CTRD_PID/CTRD_SOCK,
# start_lazy DAEMON_PID too, link_up ADDR (and parse_link LRATE/LDELAY/LKEY).

log() { echo "${BENCH_NAME:-bench} [+$(( $(date +%s) - START ))s]: $*" >&2; }
die() { log "$*"; exit 1; }
has() { local x=$1; shift; local y; for y in "$@"; do [ "$x" = "$y" ] && return 0; done; return 1; }

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { printf "%.2f", (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a + b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mb() { awk -v a="$1" 'BEGIN { if (a == "") print "n/a"; else printf "%.1f", a / 1e6 }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

RESULTS=()
result() { RESULTS+=("$1 = $2"); log "$1 = $2"; }

# Dies unless every tool the benchmarks drive is installed (and Go's ctr-remote, which converts).
require_tools() {
  local t
  for t in containerd ctr runc docker-registry skopeo tc ip curl jq python3 "$@"; do
    command -v "$t" >/dev/null || die "$t missing: run 'make deps'"
  done
  [ -x "$GO_CTR_REMOTE" ] || die "Go ctr-remote ($GO_CTR_REMOTE) is needed to convert to eStargz: apt-get install stargz-snapshotter"
}

# The link's delay proxy, optimised (netlink.sh would otherwise take whichever build exists):
# DELAY_PROXY as given, or built with cargo; exported for netlink.sh. `use_delay_proxy any` takes
# an existing release build as it is (for benchmarks whose numbers do not go through the link).
use_delay_proxy() {
  if [ -z "${DELAY_PROXY:-}" ] && [ "${1:-}" = any ] && [ -x "$REPO/target/release/examples/delay-proxy" ]; then
    DELAY_PROXY=$REPO/target/release/examples/delay-proxy
  fi
  if [ -z "${DELAY_PROXY:-}" ]; then
    (cd "$REPO" && cargo build --quiet --release --example delay-proxy) || die "cannot build the delay proxy"
    DELAY_PROXY=$REPO/target/release/examples/delay-proxy
  fi
  export DELAY_PROXY
}

# Creates the work dir /var/tmp/PREFIX.XXXXXX (WORK) and installs the clean-up on exit.
make_work() {
  WORK=$(mktemp -d "/var/tmp/$1.XXXXXX")
  PIDS=()
  SOCKS=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

stop_pid() {
  local pid=$1 sig=${2:-TERM} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# Kills and removes the tasks and containers of the containerd at SOCK (if it still runs).
clear_containers() {
  local cpid=$1 s=$2 t c
  kill -0 "$cpid" 2>/dev/null || return 0
  # ctr waits forever for a containerd that is gone: only ask live ones, with a time limit.
  for t in $(timeout 20 ctr --address "$s" tasks ls -q 2>/dev/null); do
    timeout 20 ctr --address "$s" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; sleep 0.2
    timeout 20 ctr --address "$s" tasks rm -f "$t" >/dev/null 2>&1
  done
  for c in $(timeout 20 ctr --address "$s" containers ls -q 2>/dev/null); do
    timeout 20 ctr --address "$s" containers rm "$c" >/dev/null 2>&1
  done
  return 0
}

# On exit: containers, then containerds and daemons (SIGINT: the daemons unmount), shims, mounts
# under the work dir, the link, the work dir (kept with KEEP=1).
cleanup() {
  set +e
  local i pid m entry
  for entry in "${SOCKS[@]}"; do clear_containers "${entry%% *}" "${entry#* }"; done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}" INT; done
  # Shims of our containerds carry our work dir in their command line.
  for pid in $(grep -l -s -F "$WORK" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    [ "$pid" != $$ ] && stop_pid "$pid"
  done
  for m in $(awk '{print $5}' /proc/self/mountinfo | grep -F "$WORK" | sort -r); do umount -l "$m" 2>/dev/null; done
  "$NETLINK" down "$LINK" >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

# Bytes the registry has sent through the link so far (delay-proxy counter).
served() { "$NETLINK" stats "$LINK" | jq -r .upstream_to_client; }

# Waits until the registry has served nothing new for SETTLE_QUIET (5) s: the background fetch is
# done (or stalled after SETTLE_TIMEOUT s; compare the bytes fetched with the image size).
settle() {
  local last cur quiet=0 waited=0
  last=$(served)
  while [ "$quiet" -lt "${SETTLE_QUIET:-5}" ] && [ "$waited" -lt "$SETTLE_TIMEOUT" ]; do
    sleep 1; waited=$((waited + 1)); cur=$(served)
    if [ "$cur" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; last=$cur; fi
  done
}

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
stop_containerd() { clear_containers "$CTRD_PID" "$CTRD_SOCK"; stop_pid "$CTRD_PID"; }

# `start_lazy BIN DIR CTRD_NAME [EXTRA_TOML]` starts the stargz daemon BIN (ours or Go's) with its
# socket, root, config and log (daemon.log) in DIR, configured with the registry mirror of the
# current link (ADDR, plain http) and EXTRA_TOML, then containerd CTRD_NAME with it as the proxy
# snapshotter `stargz`, and waits until the daemon serves snapshots. Sets DAEMON_PID, CTRD_PID and
# CTRD_SOCK; non-zero with the reason in $WORK/why if the daemon does not serve.
start_lazy() {
  local bin=$1 dir=$2 name=$3 extra=${4:-} dsock i
  mkdir -p "$dir"
  dsock=$dir/stargz.sock
  cat >"$dir/stargz.toml" <<TOML
[[resolver.host."$ADDR".mirrors]]
host = "$ADDR"
insecure = true
$extra
TOML
  "$bin" --address "$dsock" --root "$dir/root" --config "$dir/stargz.toml" --log-level "${LOG_LEVEL:-info}" \
    >"$dir/daemon.log" 2>&1 </dev/null &
  DAEMON_PID=$!; PIDS+=("$DAEMON_PID")
  start_containerd "$name" "[proxy_plugins.stargz]
  type = \"snapshot\"
  address = \"$dsock\"
[proxy_plugins.stargz.exports]
  root = \"$dir/root/\""
  for i in $(seq 1 200); do
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    if timeout 10 ctr --address "$CTRD_SOCK" snapshots --snapshotter stargz prepare probe-$$ >/dev/null 2>&1; then
      timeout 10 ctr --address "$CTRD_SOCK" snapshots --snapshotter stargz rm probe-$$ >/dev/null 2>&1
      return 0
    fi
    sleep 0.1
  done
  echo "daemon did not serve: $(tail -n 3 "$dir/daemon.log" | tr '\n' ' ')" >"$WORK/why"
  return 1
}
# `stop_lazy DIR` stops start_lazy's containerd and daemon (SIGINT: it unmounts its layers) and
# waits up to 5 s for the mounts under DIR to go.
stop_lazy() {
  local dir=$1 i
  stop_containerd; stop_pid "$DAEMON_PID" INT
  for i in $(seq 1 50); do grep -qF "$dir/" /proc/self/mountinfo || break; sleep 0.1; done
}
# The daemon log's last lines above info level (for a failure's reason).
daemon_complaints() {
  { grep -v -i '"level":"\(debug\|info\)"\|level=info' "$1/daemon.log" || true; } | tail -n 2 | cut -c1-300 | tr '\n' ' '
}

# ---- the registry link and the images ----
# "100mbit/10" → rate and one-way delay; "loopback" → none/0. LKEY is the link's name in keys.
parse_link() {
  case "$1" in
    loopback) LRATE=none; LDELAY=0; LKEY=loopback ;;
    */*) LRATE=${1%/*}; LDELAY=${1#*/}; LKEY=${LRATE}_${LDELAY}
         [[ $LDELAY =~ ^[0-9]+$ ]] || die "bad link '$1' (RATE/DELAY_MS or loopback)" ;;
    *) die "bad link '$1' (RATE/DELAY_MS or loopback)" ;;
  esac
}
# Brings the registry link up as LINK (storage in $WORK/registry, shared by every link); sets ADDR.
link_up() {
  parse_link "$1"
  mkdir -p "$WORK/registry"
  ADDR=$(REGISTRY_DIR=$WORK/registry "$NETLINK" up "$LINK" "$LRATE" "$LDELAY")
}

# Manifest of IMAGE:TAG in the registry, asked inside the namespace (no delay).
manifest() {
  "$NETLINK" exec "$LINK" curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' "http://127.0.0.1:5000/v2/bench/$1/manifests/$2"
}
# Path of blob DIGEST in the registry's storage.
blob_path() { local h=${1#sha256:}; echo "$WORK/registry/docker/registry/v2/blobs/sha256/${h:0:2}/$h/data"; }

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

# Pushes the cached image layout CACHED to the registry as bench/NAME (repo:tag); fails if there
# is none.
push_cached() {
  local cached=$1 name=$2
  [ -s "$cached/index.json" ] || return 1
  "$NETLINK" exec "$LINK" skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
    "oci:$cached:latest" "docker://127.0.0.1:5000/bench/$name"
  log "image bench/$name from the cache $cached"
}
# Keeps bench/NAME from the registry as the image layout CACHED.
store_cached() {
  local name=$1 cached=$2
  mkdir -p "$CACHE"; rm -rf "$cached.tmp"
  "$NETLINK" exec "$LINK" skopeo copy --quiet --preserve-digests --src-tls-verify=false \
    "docker://127.0.0.1:5000/bench/$name" "oci:$cached.tmp:latest"
  rm -rf "$cached"; mv "$cached.tmp" "$cached"
}

# Pushes VARIANT (python-data or python-data-big) as bench/VARIANT:gzip and its eStargz conversion
# as :esgz; the conversion comes from the cache when this gzip image and Go's ctr-remote were seen.
# The gzip layout stays in $WORK/oci-VARIANT.
prepare_image() {
  local v=$1 flags=(--data) gz_digest
  [ "$v" = python-data-big ] && flags+=(--big)
  "$REPO/scripts/rootfs.sh" oci "$WORK/oci-$v" "${flags[@]}" >/dev/null
  "$NETLINK" exec "$LINK" skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/oci-$v:latest" \
    "docker://127.0.0.1:5000/bench/$v:gzip"
  gz_digest=$(jq -r '.manifests[0].digest' "$WORK/oci-$v/index.json")
  prepare_conversion "$v" "$gz_digest" esgz --estargz
}
# Pushes bench/VARIANT:TAG, Go's `image convert FLAG --oci` of bench/VARIANT:gzip, from the
# cache when this gzip image and Go's ctr-remote were seen.
prepare_conversion() {
  local v=$1 gz_digest=$2 tag=$3 flag=$4 key cached prefix=esgz
  [ "$tag" = esgz ] || prefix=$tag
  key=$( { echo "$gz_digest"; sha256sum <"$GO_CTR_REMOTE"; } | sha256sum | cut -c1-16)
  cached=$CACHE/$prefix-$v-$key
  push_cached "$cached" "$v:$tag" && return 0
  # Set-up, not measured: this containerd is on the host, so the conversion crosses the (unlimited) link.
  local t0; t0=$(now)
  start_containerd "conv-$v"
  ctr --address "$CTRD_SOCK" image pull --plain-http "$ADDR/bench/$v:gzip" >/dev/null
  "$GO_CTR_REMOTE" --address "$CTRD_SOCK" image convert "$flag" --oci \
    "$ADDR/bench/$v:gzip" "$ADDR/bench/$v:$tag" >/dev/null
  ctr --address "$CTRD_SOCK" image push --plain-http "$ADDR/bench/$v:$tag" >/dev/null
  stop_containerd
  rm -rf "$WORK/conv-$v"
  store_cached "$v:$tag" "$cached"
  log "converted bench/$v with $flag in $(elapsed "$t0" "$(now)") s (cached in $cached)"
}

# GO_DAEMON as given (empty: none), else built by scripts/go-daemon.sh ("" if that fails, its
# output in $WORK/go-daemon.log).
find_go_daemon() {
  if [ -z "${GO_DAEMON+set}" ]; then
    GO_DAEMON=$("$REPO/scripts/go-daemon.sh" 2>"$WORK/go-daemon.log") || GO_DAEMON=""
  fi
}
