#!/usr/bin/env python3
"""The in-container side of scripts/bench-warm.sh: one warm-read measure over the container's root
file system, timed inside the container (time.monotonic) so that container start-up does not count.

    python3 warm-read.py read            open and read every regular file fully, 1 MiB reads
    python3 warm-read.py stat            os.lstat every path
    python3 warm-read.py restat          the same walk twice, 2 s apart (a running container
                                         coming back to its files); only the second is timed
    python3 warm-read.py small [LIST]    open+read+close each file of LIST (/bench-small.txt):
                                         absolute paths, one a line (no tree walk)
    python3 warm-read.py list OUT        write the list for `small` to OUT: the regular files of
                                         at most 16 KiB (not timed)

The walk starts at / and stays on the root file system: directories whose st_dev differs from
/'s (/proc, /sys, /dev, ...) are skipped, and so is every other mount point (e.g. the bind mounts
of this program and of LIST). Prints `KEY VALUE` lines (files, bytes, paths, errors, first_error)
and, last, `elapsed SECONDS`.
"""
import os
import sys
import time

SMALL_MAX = 16 * 1024
BUF = bytearray(1 << 20)


def mount_points():
    """Mount points other than / (bytes), from /proc/self/mountinfo (octal escapes decoded)."""
    points = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                p = line.split()[4]
                p = p.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n")
                p = p.replace(b"\\134", b"\\")
                if p != b"/":
                    points.add(p)
    except OSError:
        pass
    return points


class Walk:
    """Iterates over (path, DirEntry) of every entry of the root file system below /."""

    def __init__(self):
        self.dev = os.lstat(b"/").st_dev
        self.skip = mount_points()
        self.errors = 0
        self.first_error = ""

    def error(self, path, e):
        self.errors += 1
        if not self.first_error:
            self.first_error = "%s: %s" % (os.fsdecode(path), e)

    def __iter__(self):
        stack = [b"/"]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError as e:
                self.error(d, e)
                continue
            with it:
                for entry in it:
                    path = entry.path
                    if path in self.skip:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            if entry.stat(follow_symlinks=False).st_dev != self.dev:
                                continue
                        except OSError as e:
                            self.error(path, e)
                            continue
                        stack.append(path)
                    yield path, entry


def read_fully(path):
    """Bytes of the file at PATH, read in 1 MiB reads until EOF."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while True:
            n = os.readv(fd, [BUF])
            if n == 0:
                return total
            total += n
    finally:
        os.close(fd)


def main():
    measure = sys.argv[1] if len(sys.argv) > 1 else ""
    if measure == "list":
        w = Walk()
        small = []
        for path, entry in w:
            if entry.is_file(follow_symlinks=False) and b"\n" not in path:
                try:
                    if entry.stat(follow_symlinks=False).st_size <= SMALL_MAX:
                        small.append(path)
                except OSError as e:
                    w.error(path, e)
        small.sort()
        with open(sys.argv[2], "wb") as f:
            f.write(b"".join(p + b"\n" for p in small))
        print("files", len(small))
        print("errors", w.errors)
        if w.first_error:
            print("first_error", w.first_error)
        return
    if measure == "small":
        with open(sys.argv[2] if len(sys.argv) > 2 else "/bench-small.txt", "rb") as f:
            paths = [l.rstrip(b"\n") for l in f if l.strip()]
    elif measure not in ("read", "stat", "restat"):
        sys.exit("usage: warm-read.py read|stat|restat|small [LIST]|list OUT")

    files = nbytes = paths_seen = errors = 0
    first_error = ""
    if measure == "restat":
        for path, _ in Walk():
            try:
                os.lstat(path)
            except OSError:
                pass
        time.sleep(2)
        measure = "stat"
    t0 = time.monotonic()
    if measure == "read":
        w = Walk()
        for path, entry in w:
            if entry.is_file(follow_symlinks=False):
                try:
                    nbytes += read_fully(path)
                    files += 1
                except OSError as e:
                    w.error(path, e)
        errors, first_error = w.errors, w.first_error
    elif measure == "stat":
        w = Walk()
        lstat = os.lstat
        for path, _ in w:
            try:
                lstat(path)
                paths_seen += 1
            except OSError as e:
                w.error(path, e)
        errors, first_error = w.errors, w.first_error
    else:
        for path in paths:
            try:
                nbytes += read_fully(path)
                files += 1
            except OSError as e:
                errors += 1
                if not first_error:
                    first_error = "%s: %s" % (os.fsdecode(path), e)
    t1 = time.monotonic()

    if measure == "stat":
        print("paths", paths_seen)
    else:
        print("files", files)
        print("bytes", nbytes)
    print("errors", errors)
    if first_error:
        print("first_error", first_error)
    print("elapsed %.6f" % (t1 - t0))


if __name__ == "__main__":
    main()
