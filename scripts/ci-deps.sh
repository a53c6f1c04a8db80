#!/bin/sh
# Install the system tools the network-namespace tests need (iptables and ip6tables, both in
# Debian's iptables package; iproute2) on a fresh Debian/Ubuntu CI machine. Does nothing unless
# running as root with apt-get available and a tool missing; never fails the build (the tests
# then skip with a reason instead).
PATH="$PATH:/usr/sbin:/sbin"
if command -v iptables >/dev/null 2>&1 && command -v ip6tables >/dev/null 2>&1 \
        && command -v ip >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-deps: iptables/ip6tables/iproute2 missing and not installable here (need root + apt-get); namespace tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends iptables iproute2; } >/dev/null 2>&1; then
    echo "ci-deps: apt-get install iptables iproute2 failed; namespace tests will skip" >&2
fi
exit 0
