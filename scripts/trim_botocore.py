"""Cut botocore's service models down to what the credential chain uses (run in the image's
builder stage, on the venv's botocore: 29 MB of models become about 1 MB).

Owns: the list of models that the providers of botocore's default chain and our AssumeRole
create clients for. Must never: remove a model one of them needs; tests/test_image.py resolves
every provider of the chain inside the built image to prove this list (a botocore upgrade that
adds a provider with a new client fails there, not on a user's first deploy).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

# sts: AssumeRole (ours and profiles'), AssumeRoleWithWebIdentity (IRSA); sso and sso-oidc: SSO
# profiles and their token refresh; signin: `aws login` sessions' refresh.
KEEP_SERVICES = frozenset({"sts", "sso", "sso-oidc", "signin"})


def trim(data: pathlib.Path) -> tuple[int, int]:
    """Removes every service directory not kept (top-level files, such as endpoints.json and
    partitions.json, stay); returns (services kept, services removed)."""
    kept = removed = 0
    for entry in sorted(data.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name in KEEP_SERVICES:
            kept += 1
        else:
            shutil.rmtree(entry)
            removed += 1
    return kept, removed


def main() -> int:
    import botocore

    data = pathlib.Path(botocore.__file__).parent / "data"
    kept, removed = trim(data)
    if kept != len(KEEP_SERVICES):
        print(f"trim_botocore: only {kept} of {sorted(KEEP_SERVICES)} found in {data}", file=sys.stderr)
        return 1
    print(f"trim_botocore: kept {kept} service models, removed {removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
