#!/usr/bin/env bash
# A slow link to a registry, on this machine only: a network namespace joined to the host by a
# veth pair in 10.203.X.0/30 (host 10.203.X.1, namespace 10.203.X.2), both veth ends limited with
# `tbf` to RATE, and inside the namespace a docker-registry on 127.0.0.1:PORT behind
# `examples/delay-proxy.rs`, which listens on 10.203.X.2:PORT and delays each direction by DELAY_MS
# (10 → 20 ms round trip; a new connection pays one extra round trip, like a TCP handshake).
# This kernel has no netem (nor fq/sfq), hence the userspace delay; see shared/REFERENCE.md.
#
#   scripts/netlink.sh up NAME RATE DELAY_MS   e.g. `up bench 100mbit 10`; prints HOST:PORT to use;
#                                              RATE `none` puts no tbf on the veth (with DELAY_MS 0:
#                                              the same path and byte counters, no emulated limit)
#   scripts/netlink.sh down NAME               remove everything `up` made (no-op if absent)
#   scripts/netlink.sh addr NAME               print HOST:PORT again
#   scripts/netlink.sh stats NAME              proxy byte counters as JSON; `upstream_to_client`
#                                              is what the registry served through the link
#   scripts/netlink.sh exec NAME CMD...        run CMD inside the namespace, where the registry is
#                                              also at 127.0.0.1:PORT without delay or rate limit
#                                              (fast pushes: `exec NAME skopeo copy ... docker://127.0.0.1:5000/x`)
#   scripts/netlink.sh list                    names that are up
#
# Environment: PORT (5000); REGISTRY_DIR (registry storage, default a directory under the state dir
# that `down` deletes; a given one is kept); UPSTREAM=HOST:PORT (start no registry, forward to
# HOST:PORT as seen from inside the namespace; UPSTREAM=host:PORT means this link's host side
# 10.203.X.1:PORT, for a server on the host bound to 0.0.0.0, e.g. a test's fault-injecting
# registry, which then sits behind the slow link); DELAY_PROXY (binary; default target/{release,debug}/examples/delay-proxy, built with
# `cargo build --release --example delay-proxy` if missing); TBF_BURST (default 8 ms of RATE).
# State lives in /run/stargz-testbed/netlink/NAME (pids, logs, stats.json).
#
# Clients speak plain http to the printed address: `ctr image pull --plain-http ADDR/repo:tag`,
# `skopeo ... --src-tls-verify=false`, and for our daemon a config entry
#   [[resolver.host."ADDR".mirrors]]  host = "ADDR"  insecure = true
# `up` is idempotent (an existing link of that NAME is replaced); a failed `up` cleans up after itself.
set -euo pipefail

STATE_ROOT=/run/stargz-testbed/netlink
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-5000}

die() { echo "netlink.sh: $*" >&2; exit 1; }
log() { echo "netlink.sh: $*" >&2; }

valid_name() { [[ $1 =~ ^[A-Za-z0-9_-]{1,40}$ ]] || die "bad NAME '$1' (letters, digits, - and _)"; }
ns_of() { echo "sgz-$1"; }

# Link state of NAME: sets IDX (the X of 10.203.X.0/30) or fails.
load() {
  local dir=$STATE_ROOT/$1
  [ -f "$dir/idx" ] || return 1
  IDX=$(cat "$dir/idx")
}

# Picks a free X under the allocation lock and records it for NAME (the caller holds the lock).
allocate() {
  local name=$1 x used
  used=$(cat "$STATE_ROOT"/*/idx 2>/dev/null || true)
  for x in $(seq 0 255); do
    grep -qx "$x" <<<"$used" && continue
    ip -o addr show | grep -q "inet 10\.203\.$x\." && continue
    ip link show "sgz$x-h" >/dev/null 2>&1 && continue
    mkdir -p "$STATE_ROOT/$name"; echo "$x" >"$STATE_ROOT/$name/idx"
    IDX=$x; return 0
  done
  die "no free 10.203.X.0/30 left"
}

delay_proxy_bin() {
  if [ -n "${DELAY_PROXY:-}" ]; then echo "$DELAY_PROXY"; return; fi
  local rel=$REPO/target/release/examples/delay-proxy dbg=$REPO/target/debug/examples/delay-proxy
  if [ -x "$rel" ] && { [ ! -x "$dbg" ] || [ "$rel" -nt "$dbg" ]; }; then echo "$rel"; return; fi
  if [ -x "$dbg" ]; then echo "$dbg"; return; fi
  log "building the delay proxy (cargo build --release --example delay-proxy)"
  (cd "$REPO" && cargo build --quiet --release --example delay-proxy) >&2
  echo "$rel"
}

# Rate in bytes/s of a tc rate like 100mbit, 1gbit, 500kbit, 10mbps.
rate_bytes() {
  local r=${1,,} n unit
  [[ $r =~ ^([0-9]+)([a-z]*)$ ]] || die "bad RATE '$1' (e.g. 100mbit)"
  n=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[2]}
  case "$unit" in
    bit|"") echo $((n / 8)) ;; kbit) echo $((n * 1000 / 8)) ;; mbit) echo $((n * 1000000 / 8)) ;;
    gbit) echo $((n * 1000000000 / 8)) ;; bps) echo "$n" ;; kbps) echo $((n * 1000)) ;;
    mbps) echo $((n * 1000000)) ;; gbps) echo $((n * 1000000000)) ;;
    *) die "bad RATE unit '$unit'" ;;
  esac
}

kill_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  local name=$1 ns dir pid
  ns=$(ns_of "$name"); dir=$STATE_ROOT/$name
  kill_pidfile "$dir/proxy.pid"
  kill_pidfile "$dir/registry.pid"
  if ip netns list | grep -qw "$ns"; then
    # Anything else still running in the namespace was started through `exec` by our caller.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  fi
  if load "$name"; then ip link del "sgz$IDX-h" 2>/dev/null || true; fi
  if [ -d "$dir" ]; then
    if [ -f "$dir/registry.dir.owned" ]; then rm -rf "$(cat "$dir/registry.dir.owned")"; fi
    rm -rf "$dir"
  fi
}

wait_ready() {
  local addr=$1 upstream_mode=$2
  for _ in $(seq 1 100); do
    if [ "$upstream_mode" = 1 ]; then
      (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null && return 0
    else
      [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$addr/v2/" || true)" = 200 ] && return 0
    fi
    sleep 0.1
  done
  return 1
}

up() {
  local name=$1 rate=$2 delay=$3 ns dir proxy host nsv addr burst upstream upstream_mode=0
  [[ $delay =~ ^[0-9]+$ ]] || die "bad DELAY_MS '$delay'"
  ns=$(ns_of "$name"); dir=$STATE_ROOT/$name
  mkdir -p "$STATE_ROOT"
  down "$name"
  local rb=0 limited=1
  if [ "$rate" = none ]; then limited=0; else rb=$(rate_bytes "$rate"); fi
  proxy=$(delay_proxy_bin); [ -x "$proxy" ] || die "delay proxy $proxy missing"
  command -v tc >/dev/null || die "tc missing (apt-get install iproute2)"
  exec 9>"$STATE_ROOT/.lock"; flock 9
  allocate "$name"
  exec 9>&-
  # From here on, any way out but the end of this function removes what was made.
  UP_NAME=$name
  trap 'if [ -n "${UP_NAME:-}" ]; then log "up failed, cleaning up"; down "$UP_NAME"; fi' EXIT
  host=sgz$IDX-h; nsv=sgz$IDX-n; addr=10.203.$IDX.2:$PORT
  burst=${TBF_BURST:-$((rb / 125))}
  [[ $burst =~ ^[0-9]+$ ]] || die "bad TBF_BURST '$burst' (bytes)"
  [ "$burst" -ge 16384 ] || burst=16384
  ip netns add "$ns"
  ip link add "$host" type veth peer name "$nsv"
  ip link set "$nsv" netns "$ns"
  ip addr add "10.203.$IDX.1/30" dev "$host"
  ip link set "$host" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "10.203.$IDX.2/30" dev "$nsv"
  ip netns exec "$ns" ip link set "$nsv" up
  if [ "$limited" = 1 ]; then
    tc qdisc add dev "$host" root tbf rate "$rate" burst "$burst" latency 50ms
    ip netns exec "$ns" tc qdisc add dev "$nsv" root tbf rate "$rate" burst "$burst" latency 50ms
  fi
  if [ -n "${UPSTREAM:-}" ]; then
    upstream=$UPSTREAM; upstream_mode=1
    [[ $upstream == host:* ]] && upstream=10.203.$IDX.1:${upstream#host:}
  else
    command -v docker-registry >/dev/null || die "docker-registry missing (apt-get install docker-registry)"
    upstream=127.0.0.1:$PORT
    local storage=${REGISTRY_DIR:-$dir/registry}
    [ -n "${REGISTRY_DIR:-}" ] || echo "$storage" >"$dir/registry.dir.owned"
    mkdir -p "$storage"
    cat >"$dir/registry.yml" <<YML
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
http:
  addr: $upstream
YML
    ip netns exec "$ns" docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/registry.pid"
  fi
  ip netns exec "$ns" "$proxy" --listen "$addr" --upstream "$upstream" --delay-ms "$delay" \
    --stats "$dir/stats.json" >"$dir/proxy.log" 2>&1 </dev/null &
  echo $! >"$dir/proxy.pid"
  printf '%s\n' "$addr" >"$dir/addr"
  printf 'rate=%s delay_ms=%s\n' "$rate" "$delay" >"$dir/params"
  if ! wait_ready "$addr" "$upstream_mode"; then
    tail -n 5 "$dir"/*.log >&2 || true
    false
  fi
  UP_NAME=""
  echo "$addr"
}

cmd=${1:-}; shift || true
case "$cmd" in
  up)   [ $# -eq 3 ] || die "usage: netlink.sh up NAME RATE DELAY_MS"; valid_name "$1"; up "$@" ;;
  down) [ $# -eq 1 ] || die "usage: netlink.sh down NAME"; valid_name "$1"; down "$1" ;;
  addr) [ $# -eq 1 ] || die "usage: netlink.sh addr NAME"; cat "$STATE_ROOT/$1/addr" ;;
  stats) [ $# -eq 1 ] || die "usage: netlink.sh stats NAME"; cat "$STATE_ROOT/$1/stats.json" 2>/dev/null \
           || echo '{"connections":0,"client_to_upstream":0,"upstream_to_client":0}' ;;
  exec) [ $# -ge 2 ] || die "usage: netlink.sh exec NAME CMD..."; valid_name "$1"; n=$1; shift
        exec ip netns exec "$(ns_of "$n")" "$@" ;;
  list) ls "$STATE_ROOT" 2>/dev/null || true ;;
  *) sed -n '2,32p' "$0" >&2; exit 2 ;;
esac
