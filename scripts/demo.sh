#!/usr/bin/env bash
# Lazy-pull demo (run by `make demo` as root after `make deps release`; needs no internet).
#
#   1. start a local docker-registry, our containerd-stargz-grpc daemon and a containerd 1.6
#      with `proxy_plugins.stargz` pointing at it, all in a temp dir;
#   2. build a small image from host binaries (sh, coreutils, python3 + stdlib if present),
#      push it, convert it to eStargz with `ctr-remote image convert --estargz --oci`, push that;
#   3. forget every local copy, `ctr-remote image rpull` the eStargz image, `ctr run` a command;
#   4. print how much the registry served versus the image size.
# Everything is cleaned up on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
CTR_REMOTE=$BIN/ctr-remote
DAEMON=$BIN/containerd-stargz-grpc
WORK=$(mktemp -d /tmp/stargz-demo.XXXXXX)
PIDS=()

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

cleanup() {
	local rc=$?
	set +e
	if [ -S "$WORK/containerd/containerd.sock" ]; then
		for t in $(command ctr -a "$WORK/containerd/containerd.sock" tasks ls -q 2>/dev/null); do
			command ctr -a "$WORK/containerd/containerd.sock" tasks kill -s KILL "$t" >/dev/null 2>&1
			command ctr -a "$WORK/containerd/containerd.sock" tasks delete "$t" >/dev/null 2>&1
		done
	fi
	# Stop in reverse order; SIGINT lets our daemon unmount its layers.
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		kill -INT "${PIDS[i]}" 2>/dev/null
		for _ in $(seq 50); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "${PIDS[i]}" 2>/dev/null
		wait "${PIDS[i]}" 2>/dev/null
	done
	grep -o " $WORK[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
	rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in docker-registry containerd ctr runc skopeo ss tar gzip sha256sum jq; do
	command -v "$tool" >/dev/null || die "missing $tool (run: make deps)"
done
[ -x "$CTR_REMOTE" ] && [ -x "$DAEMON" ] || die "missing $BIN binaries (run: make release)"
[ "$(id -u)" = 0 ] || die "must run as root"

free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		[ -z "$(ss -Hltn "sport = :$p")" ] && { echo "$p"; return; }
	done
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
	local t=$1 what=$2; shift 2
	for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
	die "timed out waiting for $what"
}

# ---------------------------------------------------------------- services
say "starting registry, stargz daemon and containerd in $WORK"
PORT=$(free_port)
REG=127.0.0.1:$PORT
mkdir -p "$WORK/registry" "$WORK/containerd" "$WORK/stargz/root"
cat >"$WORK/registry.yml" <<YML
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $WORK/registry/data}, delete: {enabled: true}}
http: {addr: $REG}
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
wait_for 20 registry curl -fsS "http://$REG/v2/"

SOCK=$WORK/containerd/containerd.sock
SGZ_SOCK=$WORK/stargz/stargz.sock
"$DAEMON" --root "$WORK/stargz/root" --address "$SGZ_SOCK" --log-level debug >"$WORK/stargz.log" 2>&1 &
PIDS+=($!)
DAEMON_PID=$!

cat >"$WORK/containerd.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$SGZ_SOCK"
[proxy_plugins.stargz.exports]
  root = "$WORK/stargz/root/"
TOML
containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
PIDS+=($!)
wait_for 30 containerd ctr -a "$SOCK" version

ctr() { command ctr -a "$SOCK" "$@"; }
stargz_ready() {
	ctr snapshots --snapshotter stargz prepare demo-ready-probe "" >/dev/null 2>&1 &&
		ctr snapshots --snapshotter stargz rm demo-ready-probe >/dev/null 2>&1
}
SNAPSHOTTER=stargz
for _ in $(seq 100); do stargz_ready && break; kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
if ! stargz_ready; then
	echo "NOTE: our containerd-stargz-grpc daemon is not serving snapshots yet:"
	sed 's/^/    /' "$WORK/stargz.log" | tail -n 5
	echo "      The demo continues with containerd's overlayfs snapshotter: a NORMAL (full) pull, not a lazy one."
	SNAPSHOTTER=overlayfs
fi

# ---------------------------------------------------------------- demo image
say "building a demo image from host binaries"
RF=$WORK/rootfs
copy_with_libs() { # copy_with_libs LAYERDIR FILE...
	local dst=$1; shift
	local f lib
	for f in "$@"; do
		[ -e "$f" ] || continue
		mkdir -p "$dst$(dirname "$f")"
		cp -aL "$f" "$dst$f"
		for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
			[ -e "$dst$lib" ] && continue
			mkdir -p "$dst$(dirname "$lib")"
			cp -aL "$lib" "$dst$lib"
		done
	done
}
mkdir -p "$RF/base/etc" "$RF/base/tmp" "$RF/base/proc" "$RF/base/sys" "$RF/base/dev" "$RF/base/root"
chmod 1777 "$RF/base/tmp"
echo 'root:x:0:0:root:/root:/bin/sh' >"$RF/base/etc/passwd"
echo 'root:x:0:' >"$RF/base/etc/group"
copy_with_libs "$RF/base" /bin/sh /bin/ls /bin/cat /bin/echo /usr/bin/env /usr/bin/du /usr/bin/wc /usr/bin/head
PY=""
if [ -x /usr/bin/python3 ]; then
	PY=$(readlink -f /usr/bin/python3)
	PYVER=$(basename "$PY")
	copy_with_libs "$RF/python" "$PY"
	ln -sf "$PYVER" "$RF/python/usr/bin/python3"
	if [ -d "/usr/lib/$PYVER" ]; then
		mkdir -p "$RF/python/usr/lib"
		tar -C /usr/lib --exclude='__pycache__' --exclude="$PYVER/test" --exclude="$PYVER/idlelib" \
			--exclude="$PYVER/tkinter" --exclude="$PYVER/site-packages" --exclude="$PYVER/dist-packages" \
			-cf - "$PYVER" | tar -C "$RF/python/usr/lib" -xf -
	fi
else
	echo "NOTE: no /usr/bin/python3 on this host; the image gets a generated data tree instead."
	mkdir -p "$RF/python/usr/share/demo"
	for i in $(seq 200); do head -c 65536 /dev/urandom | base64 >"$RF/python/usr/share/demo/file$i.txt"; done
fi
mkdir -p "$RF/app/app"
printf 'print("hello from a lazily pulled image")\n' >"$RF/app/app/hello.py"

# OCI image layout with one gzip layer per directory, pushed with skopeo.
OCI=$WORK/oci
mkdir -p "$OCI/blobs/sha256"
echo '{"imageLayoutVersion":"1.0.0"}' >"$OCI/oci-layout"
put_blob() { # put_blob FILE -> prints "sha256:<hex> <size>"
	local h; h=$(sha256sum "$1" | cut -d' ' -f1)
	mv "$1" "$OCI/blobs/sha256/$h"
	echo "sha256:$h $(stat -c %s "$OCI/blobs/sha256/$h")"
}
LAYERS_JSON="[]"; DIFFS_JSON="[]"
for l in base python app; do
	tar -C "$RF/$l" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$WORK/$l.tar" .
	diff="sha256:$(sha256sum "$WORK/$l.tar" | cut -d' ' -f1)"
	gzip -n -6 "$WORK/$l.tar"
	read -r dg sz < <(put_blob "$WORK/$l.tar.gz")
	LAYERS_JSON=$(jq -c --arg d "$dg" --argjson s "$sz" '. + [{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":$d,"size":$s}]' <<<"$LAYERS_JSON")
	DIFFS_JSON=$(jq -c --arg d "$diff" '. + [$d]' <<<"$DIFFS_JSON")
done
jq -n --argjson diffs "$DIFFS_JSON" '{architecture:"amd64",os:"linux",
	config:{Env:["PATH=/usr/local/bin:/usr/bin:/bin"],Cmd:["/bin/sh"],WorkingDir:"/"},
	rootfs:{type:"layers",diff_ids:$diffs}}' \
	| jq --arg a "$(dpkg --print-architecture 2>/dev/null || echo amd64)" '.architecture=$a' >"$WORK/config.json"
read -r CFG CFGSZ < <(put_blob "$WORK/config.json")
jq -n --arg c "$CFG" --argjson cs "$CFGSZ" --argjson layers "$LAYERS_JSON" '{schemaVersion:2,
	mediaType:"application/vnd.oci.image.manifest.v1+json",
	config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$c,size:$cs},layers:$layers}' >"$WORK/manifest.json"
read -r MAN MANSZ < <(put_blob "$WORK/manifest.json")
jq -n --arg m "$MAN" --argjson ms "$MANSZ" '{schemaVersion:2,manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",
	digest:$m,size:$ms,annotations:{"org.opencontainers.image.ref.name":"plain"}}]}' >"$OCI/index.json"
skopeo copy --quiet --insecure-policy --dest-tls-verify=false "oci:$OCI:plain" "docker://$REG/demo:plain"
PLAIN_SIZE=$(jq '[.[].size] | add' <<<"$LAYERS_JSON")
echo "demo:plain — 3 gzip layers, $((PLAIN_SIZE / 1024)) KiB compressed, $(du -sk "$RF" | cut -f1) KiB unpacked"

# ---------------------------------------------------------------- convert to eStargz
say "converting to eStargz with ctr-remote image convert --estargz --oci"
ctr images pull --plain-http "$REG/demo:plain" >/dev/null
if "$CTR_REMOTE" -a "$SOCK" image convert --estargz --oci "$REG/demo:plain" "$REG/demo:esgz"; then
	CONVERTER="our ctr-remote"
else
	echo "NOTE: our 'ctr-remote image convert' failed (see above); converting with Go's /usr/bin/ctr-remote instead."
	/usr/bin/ctr-remote -a "$SOCK" image convert --estargz --oci "$REG/demo:plain" "$REG/demo:esgz" >/dev/null
	CONVERTER="Go's ctr-remote"
fi
ctr images push --plain-http "$REG/demo:esgz" >/dev/null
echo "converted by $CONVERTER and pushed $REG/demo:esgz"

say "removing every local copy"
ctr images rm --sync "$REG/demo:plain" "$REG/demo:esgz" >/dev/null
echo "content left in containerd: $(ctr content ls -q | wc -l) blobs"

# ---------------------------------------------------------------- lazy pull + run
ESGZ_MANIFEST=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/demo/manifests/esgz")
ESGZ_SIZE=$(jq '[.layers[].size] | add' <<<"$ESGZ_MANIFEST")
LOG_MARK=$(wc -l <"$WORK/registry.log")
say "ctr-remote image rpull --plain-http $REG/demo:esgz   (snapshotter: $SNAPSHOTTER)"
T0=$(date +%s.%N)
"$CTR_REMOTE" -a "$SOCK" image rpull --plain-http --snapshotter "$SNAPSHOTTER" "$REG/demo:esgz"
T1=$(date +%s.%N)
if [ -n "$PY" ]; then
	CMD=(python3 -c 'import sys; print("hello from a lazily pulled image, python", sys.version.split()[0])')
else
	CMD=(/bin/cat /etc/passwd)
fi
say "ctr run --snapshotter $SNAPSHOTTER $REG/demo:esgz ${CMD[*]}"
ctr run --rm --snapshotter "$SNAPSHOTTER" "$REG/demo:esgz" "demo-$$" "${CMD[@]}"
T2=$(date +%s.%N)

# ---------------------------------------------------------------- report
say "what was fetched"
# docker-registry's access log: "... \"GET /v2/.../blobs/sha256:... HTTP/1.1\" STATUS BYTES ..."
FETCHED=$(tail -n +"$((LOG_MARK + 1))" "$WORK/registry.log" \
	| grep -E '"GET /v2/[^"]*/blobs/' | awk '{for (i = 1; i < NF; i++) if ($i ~ /HTTP\/1\.[01]"$/) { s += $(i + 2); break } } END { print s + 0 }')
awk -v a="$T0" -v b="$T1" -v c="$T2" 'BEGIN { printf "rpull took %.2fs, run took %.2fs\n", b - a, c - b }'
echo "eStargz image layers: $ESGZ_SIZE bytes; blob bytes the registry served during rpull+run: $FETCHED bytes ($(( FETCHED * 100 / (ESGZ_SIZE > 0 ? ESGZ_SIZE : 1) ))%)"
echo "  (what the snapshotter fetched for the lazy layers: their TOCs at rpull, then the files the"
echo "   container read, their read-ahead and any prefetch; rpull's own line above counts only"
echo "   layers it downloaded in full)"
if [ "$SNAPSHOTTER" = stargz ]; then
	remote=$(grep -c 'remote-snapshot-prepared.*true' "$WORK/stargz.log" || true)
	echo "layers mounted lazily by our daemon (remote-snapshot-prepared=true): $remote"
	if [ "$remote" = 0 ]; then
		echo "NOTE: no layer was prepared remotely: this run was a full (fallback) pull, not a lazy one."
		if grep -q 'remote-snapshot-prepared' "$WORK/stargz.log"; then
			echo "      The daemon said why:"
			grep 'remote-snapshot-prepared' "$WORK/stargz.log" | tail -n 3 | sed 's/^/    /'
		else
			echo "      The daemon made no remote-snapshot attempt (lazy layers are not enabled in this build)."
		fi
	fi
else
	echo "NOTE: this was a full pull through overlayfs (our daemon was not serving), so everything was fetched."
fi
