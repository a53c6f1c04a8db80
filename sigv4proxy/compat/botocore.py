"""botocore's internals, used here and nowhere else: its optional awscrt kept out, and the refresh
schedule of credentials it has just fetched taken over.

Owns: `keep_awscrt_unloaded` (botocore imports awscrt whenever it is installed, to offer CRT
signing and checksums; a None entry in `sys.modules` makes its guarded import fail as if awscrt
were absent), `stop_refreshing` and `expiry` (botocore's `RefreshableCredentials` keeps its
expiry and refresh windows in private attributes and has no public accessor). botocore itself is
imported only by the functions that need it, in the process that resolves credentials. Must
never: import botocore at module level (a serving process imports this module and never
botocore), or import anything of ours outside `compat`.
"""

from __future__ import annotations

import sys
from typing import Any

from sigv4proxy.compat.versions import BOTOCORE as SUPPORTED

SUPPORTED.check()  # the code below was written and tested for this range only


def keep_awscrt_unloaded() -> None:
    """Before botocore loads: it never imports awscrt (RSS for code the proxy never calls: it
    signs by itself; docs/performance.md). A process that already loaded awscrt (a test run) keeps it."""
    sys.modules.setdefault("awscrt", None)  # type: ignore[arg-type]


def stop_refreshing(credentials: Any) -> None:
    """Credentials botocore fetched just now are not fetched again inside
    `get_frozen_credentials()` because they fall in its 15/10-minute refresh windows (until they
    have truly expired): the caller owns the schedule."""
    from botocore.credentials import RefreshableCredentials

    if isinstance(credentials, RefreshableCredentials):
        credentials._advisory_refresh_timeout = 0
        credentials._mandatory_refresh_timeout = 0


def expiry(credentials: Any) -> float | None:
    """When `credentials` expire (a Unix time), None for credentials that do not."""
    expiry_time = getattr(credentials, "_expiry_time", None)
    return expiry_time.timestamp() if expiry_time is not None else None
