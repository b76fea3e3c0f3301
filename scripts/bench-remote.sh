#!/bin/sh
# Runs the remote blob-reader benchmark; results in bench-results/remote_read.txt.
# Needs docker-registry and curl (make deps) and ~3.5 GiB free under ${BENCH_TMP:-/tmp}.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench --bench remote_read
