#!/bin/sh
# Install the system tools the tests need on a fresh Debian/Ubuntu machine: iptables (with
# ip6tables) and iproute2 (network-namespace tests), docker.io and mmdebstrap (the image tests: an engine, and a base
# made from Debian packages where no registry is reachable), and, given a Python ($1), its C
# headers when they are missing (the compiled build: a Debian python3.X needs python3.X-dev). Does
# nothing unless running as root with apt-get available and a tool missing; never fails the build
# (the tests then skip with a reason instead; a compiled build without headers fails to build).
PATH="$PATH:/usr/sbin:/sbin"
missing=""
if [ -n "${1:-}" ] && ! "$1" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    missing="$missing python$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev"
fi
{ command -v iptables >/dev/null 2>&1 && command -v ip6tables >/dev/null 2>&1; } || missing="$missing iptables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v mmdebstrap >/dev/null 2>&1 || missing="$missing mmdebstrap"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-deps:$missing missing and not installable here (need root + apt-get); the tests that need them will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # one word per package
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >/dev/null 2>&1; then
    echo "ci-deps: apt-get install$missing failed; the tests that need them will skip" >&2
fi
exit 0
