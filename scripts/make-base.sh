#!/bin/sh
# Make the image's base where no image registry is reachable: a Debian bookworm root filesystem
# with python3 (and its venv module, which the Dockerfile's builder stage uses) and CA
# certificates, made from Debian's packages with mmdebstrap and imported into the local engine.
#   sh scripts/make-base.sh [TAG]      (default sigv4proxy-base:bookworm; MIRROR overrides the mirror)
# Then: docker build --build-arg PYTHON_IMAGE=TAG . (`make image` does both when it must).
# Does nothing when TAG exists already. Needs root, mmdebstrap and a running engine.
set -eu
TAG="${1:-sigv4proxy-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org}"
DOCKER="${DOCKER:-docker}"
if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base: $TAG exists"
    exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || { echo "make-base: mmdebstrap missing (apt-get install mmdebstrap)" >&2; exit 1; }
work="$(mktemp -d)"
rootfs="$work/rootfs.tar"
trap 'rm -rf "$work"' EXIT
# merged-usr hook: /usr merged without the usrmerge package (which would pull in perl, 45 MB).
# No recommends, docs, man pages or translations; apt's lists are dropped (the Dockerfile fetches
# its own).
mmdebstrap --quiet --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,python3-venv,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$rootfs" \
    "deb $MIRROR/debian bookworm main" \
    "deb $MIRROR/debian bookworm-updates main" \
    "deb $MIRROR/debian-security bookworm-security main" >"$work/log" 2>&1 \
    || { tail -n 40 "$work/log" >&2; echo "make-base: mmdebstrap failed" >&2; exit 1; }
# An imported image has no environment: give it what the official python images set.
"$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$rootfs" "$TAG" >/dev/null
echo "make-base: imported $TAG ($(du -m "$rootfs" | cut -f1) MB root filesystem)"
