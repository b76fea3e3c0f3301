#!/usr/bin/env bash
# Builds Go's containerd-stargz-grpc (the reference daemon) for benchmark comparisons, from
# Debian's golang-github-containerd-stargz-snapshotter-dev (installed with golang-go if missing)
# and tools/go-stargz-grpc/main.go. Prints the binary's path; cached in target/go-stargz/.
#
#   scripts/go-daemon.sh            build if needed, print the path
#   GO_DAEMON=$(scripts/go-daemon.sh) scripts/bench-pull.sh
#
# The library's `service` package is copied next to main.go without its CRI resolver (k8s cri-api
# is not packaged in Debian); everything else is Debian's code as is, built offline in GOPATH mode.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$REPO/target/go-stargz
BIN=$OUT/containerd-stargz-grpc
LIB=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter

if [ -x "$BIN" ] && [ "$BIN" -nt "$REPO/tools/go-stargz-grpc/main.go" ]; then echo "$BIN"; exit 0; fi
if ! command -v go >/dev/null || [ ! -d "$LIB/service" ]; then
  echo "go-daemon.sh: installing golang-go golang-github-containerd-stargz-snapshotter-dev" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go golang-github-containerd-stargz-snapshotter-dev >&2
fi
src=$OUT/gopath/src/gostargzgrpc
rm -rf "$OUT/gopath"; mkdir -p "$src/svc/resolver"
cp "$REPO/tools/go-stargz-grpc/main.go" "$src/"
cp "$LIB/service/config.go" "$LIB/service/service.go" "$LIB/service/cri.go" "$src/svc/"
cp "$LIB/service/resolver/registry.go" "$src/svc/resolver/"
sed -i 's#github.com/containerd/stargz-snapshotter/service/resolver#gostargzgrpc/svc/resolver#' "$src"/svc/*.go
(cd "$src" && GOPATH=$OUT/gopath:/usr/share/gocode GO111MODULE=off GOCACHE=$OUT/cache GOFLAGS="" \
  go build -o "$BIN" .) >&2
echo "$BIN"
