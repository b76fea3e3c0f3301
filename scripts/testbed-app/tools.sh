#!/bin/sh
# Cold-start workload "tools" of scripts/bench-pull.sh: runs many different binaries and the
# libraries they load (coreutils, util-linux, grep/sed/mawk, perl with modules, dpkg and apt,
# tar/gzip, find/xargs, diffutils, e2fsprogs, python3's pydoc). Output goes to /tmp; the last line
# is the count of steps, the same on every run.
set -eu
t=$(mktemp -d)
n=0
step() { "$@" >>"$t/out" 2>&1 || { echo "tools: failed ($?): $*"; exit 1; }; n=$((n + 1)); }
step ls -la /usr/lib/x86_64-linux-gnu
step sort -u /etc/passwd
step wc -l /var/lib/dpkg/status
step cut -d: -f1,7 /etc/passwd
step tr a-z A-Z </etc/os-release
step head -c 4096 /usr/bin/bash
step tail -n 20 /var/lib/dpkg/status
step md5sum /etc/login.defs
step sha1sum /etc/bash.bashrc
step b2sum /etc/nsswitch.conf
step base64 /etc/hostname
step od -A x -t x1z -N 64 /bin/ls
step stat /etc /usr /var
step du -s /usr/share/doc
step date -u -d @0
step seq 1 100
step factor 1234567890
step numfmt --to=iec 1073741824
step expr 6 \* 7
step printf '%s\n' a b c
step id root
step uname -a
step getent passwd root
step getconf PAGESIZE
step ldd /usr/bin/python3.11
step locale -a
step iconv -f latin1 -t utf-8 /etc/login.defs
step grep -c Package /var/lib/dpkg/status
step sed -n 's/^Package: //p' /var/lib/dpkg/status
step mawk -F: '{ n++ } END { print n }' /etc/passwd
step perl -MPOSIX -MFcntl -MFile::Spec -MFile::Basename -MGetopt::Long -MList::Util=sum -MScalar::Util=blessed -MText::ParseWords -MIO::Handle -MCwd -MFile::Temp -MFile::Path -MIPC::Open3 -MText::Wrap -MSocket -e 'print sum(1..10), " ", POSIX::floor(2.5), " ", getcwd(), "\n"'
step perl -MDebconf::Db -MDebconf::Template -MDebconf::Question -e 'print "debconf\n"'
step debconf-show debconf
# shellcheck disable=SC2016 # dpkg-query's format, not the shell's
step dpkg-query -W -f '${Package} ${Version}\n'
step dpkg -L coreutils
step dpkg -S /usr/bin/perl
step apt-config dump
step apt-cache policy
step apt-cache showpkg apt
step apt-mark showmanual
step tar -czf "$t/etc.tgz" -C / etc
step tar -tzvf "$t/etc.tgz"
step gzip -dc "$t/etc.tgz"
step find /usr/share/zoneinfo -type f -name 'E*' -print
step sh -c 'find /etc -maxdepth 1 -type f -print0 | xargs -0 cat | wc -c'
step sh -c 'diff -u /etc/passwd /etc/group; [ $? -eq 1 ]'
step cmp -s /etc/passwd /etc/passwd
step zdump -v UTC
step namei -l /usr/bin/python3
step findmnt --real
step blkid -V
step env PAGER=cat pydoc3 shutil
echo "tools: $n steps"
rm -rf "$t"
