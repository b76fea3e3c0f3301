#!/usr/bin/env bash
# Realistic test images: a Debian bookworm minbase rootfs with python3, cached between runs.
#
#   scripts/rootfs.sh tar [OUT.tar]       build (once) and print the path of the cached rootfs tar;
#                                         with OUT.tar, also copy it there
#   scripts/rootfs.sh dir DIR             extract the rootfs into DIR
#   scripts/rootfs.sh layers DIR [--data] [--big]
#                                         write the image's layer tars into DIR:
#                                         1-base.tar (system without the python stdlib),
#                                         2-python.tar (usr/lib/python3.*), 3-app.tar (/app: main.py and
#                                         the benchmark workloads of scripts/testbed-app/, imports.py
#                                         and tools.sh);
#                                         --data adds 4-data.tar: /data/large.bin, 64 MiB of the
#                                         rootfs's own binaries and libraries concatenated (compresses
#                                         like real content, to ~26 MB), and /data/large.sha256 for
#                                         `sha256sum -c` (the "large" workload of bench-pull.sh);
#                                         --big adds 5-bulk.tar (a copy of /usr under /opt/bulk), which
#                                         makes the image about twice as big (issue 6's flat-RSS check)
#   scripts/rootfs.sh oci DIR [--data] [--big]
#                                         an OCI image layout (gzip layers, tag "latest") in DIR
#   scripts/rootfs.sh image DIR TAR...    an OCI image layout in DIR from any layer tars (in that
#                                         order, gzip-compressed; config runs python3 /app/main.py)
#   scripts/rootfs.sh push OCIDIR HOST:PORT/REPO:TAG
#                                         push a layout to a plain-http registry with skopeo
#
# The rootfs is `debootstrap --variant=minbase --include=python3 bookworm` from the Debian mirror
# configured in /etc/apt (about 2 minutes the first time). Every tar holds the parent-directory
# entries of what it contains (Go's `ctr-remote image optimize` rejects layers without them), uses
# numeric owners and no "./" prefix, like the layers docker produces. Cached artefacts live in
# $STARGZ_TESTBED_CACHE (default /var/cache/stargz-testbed); concurrent callers serialise on a lock,
# so parallel tests build the cache once. Delete the directory to rebuild. Cached OCI layouts are
# named after a hash of scripts/testbed-app/ and of the layer recipe's revision, so editing a
# workload rebuilds them.
set -euo pipefail

CACHE=${STARGZ_TESTBED_CACHE:-/var/cache/stargz-testbed}
ROOTFS_TAR=$CACHE/rootfs-bookworm-python.tar
SUITE=bookworm
APP_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/testbed-app
# Bump when build_layers makes different layers from the same inputs.
LAYERS_REV=2
LARGE_BYTES=$((64 << 20))

die() { echo "rootfs.sh: $*" >&2; exit 1; }
log() { echo "rootfs.sh: $*" >&2; }

# Temporary directories of this run, removed on exit whatever happens.
TMPS=()
cleanup() { if [ ${#TMPS[@]} -gt 0 ]; then rm -rf "${TMPS[@]}"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# The mirror apt already uses (deb822 or one-line sources), so no other host is contacted.
debian_mirror() {
  local m
  m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '{print $2}' | grep -E 'debian/?$' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# Runs "$@" holding the cache lock (flock on fd 9).
with_lock() {
  mkdir -p "$CACHE"
  ( trap cleanup EXIT; flock 9; "$@" ) 9>"$CACHE/.lock"
}

# Tars the entries NAMES... of ROOT (recursively) into OUT, adding the entries of every parent
# directory first. Names are relative, without "./".
tar_with_parents() {
  local root=$1 out=$2; shift 2
  local parents=() n p
  for n in "$@"; do
    p=$(dirname "$n")
    while [ "$p" != "." ]; do parents+=("$p"); p=$(dirname "$p"); done
  done
  local uniq=()
  if [ ${#parents[@]} -gt 0 ]; then mapfile -t uniq < <(printf '%s\n' "${parents[@]}" | sort -u); fi
  tar -C "$root" --format=gnu --numeric-owner --sort=name --xattrs --xattrs-include='*' -cf "$out" \
    --no-recursion "${uniq[@]}" --recursion "$@"
}

build_rootfs_tar() {
  [ -s "$ROOTFS_TAR" ] && return 0
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  local mirror work
  mirror=$(debian_mirror)
  work=$(mktemp -d "$CACHE/build.XXXXXX"); TMPS+=("$work")
  log "debootstrap $SUITE from $mirror (about 2 minutes, cached in $ROOTFS_TAR)"
  debootstrap --variant=minbase --include=python3 "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  # What a container image does not carry: device nodes, apt caches and lists, logs of the build.
  rm -rf "$work/root"/dev/* "$work/root"/proc/* "$work/root"/sys/* "$work/root"/run/* \
    "$work/root"/var/cache/apt/*.bin "$work/root"/var/cache/apt/archives/*.deb \
    "$work/root"/var/lib/apt/lists/* "$work/root"/var/log/* "$work/root"/tmp/*
  local top=()
  mapfile -t top < <(cd "$work/root" && ls -A)
  tar_with_parents "$work/root" "$work/rootfs.tar" "${top[@]}"
  mv "$work/rootfs.tar" "$ROOTFS_TAR"
  log "cached $ROOTFS_TAR ($(du -h "$ROOTFS_TAR" | cut -f1))"
}

ensure_rootfs() { with_lock build_rootfs_tar; }

# The layer tars of the image (see header) in OUT; data=1 adds the data layer, big=1 the bulk one.
build_layers() {
  local out=$1 data=$2 big=$3 work py
  mkdir -p "$out"
  work=$(mktemp -d); TMPS+=("$work")
  mkdir "$work/root"
  tar -C "$work/root" --numeric-owner --xattrs --xattrs-include='*' -xf "$ROOTFS_TAR"
  py=$(cd "$work/root" && ls -d usr/lib/python3.* | head -n1)
  [ -n "$py" ] || die "no python stdlib in the rootfs"
  local top=()
  mapfile -t top < <(cd "$work/root" && ls -A)
  tar -C "$work/root" --format=gnu --numeric-owner --sort=name --xattrs --xattrs-include='*' \
    --anchored --exclude="$py" -cf "$out/1-base.tar" "${top[@]}"
  tar_with_parents "$work/root" "$out/2-python.tar" "$py"
  mkdir -p "$work/app/app"
  cat >"$work/app/app/main.py" <<'PY'
# A small app whose imports read a realistic spread of the stdlib.
import json, http.client, email.parser, urllib.request, logging, argparse, sqlite3, decimal
print(json.dumps({"ok": True, "modules": 8}))
PY
  install -m 0644 "$APP_SRC/imports.py" "$work/app/app/imports.py"
  install -m 0755 "$APP_SRC/tools.sh" "$work/app/app/tools.sh"
  tar_with_parents "$work/app" "$out/3-app.tar" app
  if [ "$data" = 1 ]; then
    # Real binaries and libraries in a fixed order (not random bytes): deterministic for a given
    # rootfs, and it compresses like the content of real images.
    mkdir -p "$work/data/data"
    (cd "$work/root" && find usr/lib/x86_64-linux-gnu usr/bin -type f -print0 | LC_ALL=C sort -z \
      | xargs -0 cat) >"$work/data/data/large.bin"
    [ "$(stat -c %s "$work/data/data/large.bin")" -ge "$LARGE_BYTES" ] || die "rootfs too small for large.bin"
    truncate -s "$LARGE_BYTES" "$work/data/data/large.bin"
    (cd "$work/data" && sha256sum data/large.bin | sed 's#  data/#  /data/#') >"$work/data/data/large.sha256"
    tar_with_parents "$work/data" "$out/4-data.tar" data
  fi
  if [ "$big" = 1 ]; then
    mkdir -p "$work/bulk/opt/bulk"
    cp -a "$work/root/usr" "$work/bulk/opt/bulk/"
    tar_with_parents "$work/bulk" "$out/5-bulk.tar" opt/bulk
  fi
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# An OCI image layout in OUT from the layer tars in LAYERS (sorted by name), gzip-compressed.
build_oci() {
  local layers=$1 out=$2 l gz d diff size cfg manifest
  rm -rf "$out"; mkdir -p "$out/blobs/sha256"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
  local descs="[]" diffs="[]"
  for l in "$layers"/*.tar; do
    gz="$out/layer.tmp"
    gzip -n -6 -c "$l" >"$gz"
    d=$(sha256_of "$gz"); diff=$(sha256_of "$l"); size=$(stat -c %s "$gz")
    mv "$gz" "$out/blobs/sha256/$d"
    descs=$(jq -c --arg d "sha256:$d" --argjson s "$size" \
      '. + [{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":$d,"size":$s}]' <<<"$descs")
    diffs=$(jq -c --arg d "sha256:$diff" '. + [$d]' <<<"$diffs")
  done
  cfg=$(jq -cn --argjson diffs "$diffs" '{
    architecture:"amd64", os:"linux",
    config:{Env:["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            Cmd:["python3","/app/main.py"], WorkingDir:"/"},
    rootfs:{type:"layers", diff_ids:$diffs}}')
  printf '%s' "$cfg" >"$out/config.tmp"
  d=$(sha256_of "$out/config.tmp"); size=$(stat -c %s "$out/config.tmp")
  mv "$out/config.tmp" "$out/blobs/sha256/$d"
  manifest=$(jq -cn --arg d "sha256:$d" --argjson s "$size" --argjson layers "$descs" '{
    schemaVersion:2, mediaType:"application/vnd.oci.image.manifest.v1+json",
    config:{mediaType:"application/vnd.oci.image.config.v1+json", digest:$d, size:$s},
    layers:$layers}')
  printf '%s' "$manifest" >"$out/manifest.tmp"
  d=$(sha256_of "$out/manifest.tmp"); size=$(stat -c %s "$out/manifest.tmp")
  mv "$out/manifest.tmp" "$out/blobs/sha256/$d"
  jq -cn --arg d "sha256:$d" --argjson s "$size" '{schemaVersion:2, manifests:[
    {mediaType:"application/vnd.oci.image.manifest.v1+json", digest:$d, size:$s,
     annotations:{"org.opencontainers.image.ref.name":"latest"}}]}' >"$out/index.json"
}

# Version of the layer recipe: LAYERS_REV and the workload files, hashed.
recipe_id() {
  { echo "$LAYERS_REV"; cat "$APP_SRC/imports.py" "$APP_SRC/tools.sh"; } | sha256sum | cut -c1-12
}

# Path of the cached OCI layout of a variant ("python", "python-data", "python-big", "python-data-big").
cached_oci_dir() { echo "$CACHE/oci-$1-$(recipe_id)"; }

build_cached_oci() {
  local variant=$1 data=$2 big=$3 dir
  dir=$(cached_oci_dir "$variant")
  [ -s "$dir/index.json" ] && return 0
  local work
  work=$(mktemp -d "$CACHE/oci.XXXXXX"); TMPS+=("$work")
  log "building OCI layout $dir"
  build_layers "$work/layers" "$data" "$big"
  build_oci "$work/layers" "$work/oci"
  rm -rf "$dir"; mv "$work/oci" "$dir"
}

# Parses [--data] [--big] into DATA and BIG (0/1) and VARIANT (the cache name).
parse_flags() {
  DATA=0; BIG=0
  local f
  for f in "$@"; do
    case "$f" in
      --data) DATA=1 ;;
      --big) BIG=1 ;;
      *) die "unknown flag '$f' (--data, --big)" ;;
    esac
  done
  VARIANT=python
  if [ "$DATA" = 1 ]; then VARIANT=$VARIANT-data; fi
  if [ "$BIG" = 1 ]; then VARIANT=$VARIANT-big; fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  tar)
    ensure_rootfs
    if [ -n "${1:-}" ]; then cp "$ROOTFS_TAR" "$1"; fi
    echo "$ROOTFS_TAR" ;;
  dir)
    [ -n "${1:-}" ] || die "usage: rootfs.sh dir DIR"
    ensure_rootfs; mkdir -p "$1"
    tar -C "$1" --numeric-owner --xattrs --xattrs-include='*' -xf "$ROOTFS_TAR"
    echo "$1" ;;
  layers)
    [ -n "${1:-}" ] || die "usage: rootfs.sh layers DIR [--data] [--big]"
    out=$1; shift; parse_flags "$@"
    ensure_rootfs; build_layers "$out" "$DATA" "$BIG"; ls "$out"/*.tar ;;
  oci)
    [ -n "${1:-}" ] || die "usage: rootfs.sh oci DIR [--data] [--big]"
    out=$1; shift; parse_flags "$@"
    ensure_rootfs
    with_lock build_cached_oci "$VARIANT" "$DATA" "$BIG"
    rm -rf "$out"; mkdir -p "$(dirname "$out")"; cp -a "$(cached_oci_dir "$VARIANT")" "$out"
    echo "$out" ;;
  image)
    [ $# -ge 2 ] || die "usage: rootfs.sh image DIR TAR..."
    out=$1; shift
    work=$(mktemp -d); TMPS+=("$work")
    i=0
    for t in "$@"; do
      [ -f "$t" ] || die "no layer tar $t"
      i=$((i + 1)); ln -s "$(realpath "$t")" "$work/$(printf '%04d' "$i").tar"
    done
    build_oci "$work" "$out"
    echo "$out" ;;
  push)
    [ -n "${1:-}" ] && [ -n "${2:-}" ] || die "usage: rootfs.sh push OCIDIR HOST:PORT/REPO:TAG"
    skopeo copy --quiet --dest-tls-verify=false "oci:$1:latest" "docker://$2" ;;
  *)
    sed -n '2,33p' "$0" >&2; exit 2 ;;
esac
