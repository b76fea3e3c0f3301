#!/usr/bin/env bash
# Runs the fs read benchmark (root + /dev/fuse needed) and prints bench-results/fs_read.txt.
# FS_BENCH_MIB overrides the file size (default 1024).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench --bench fs_read
cat bench-results/fs_read.txt
