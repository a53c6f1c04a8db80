"""How a serving process imports aiohttp: without the client trust it never uses.

Owns: `import_without_client_trust`. aiohttp builds two client TLS contexts when it is imported,
each parsing the system CA bundle: a large share of a worker's start (docs/performance.md). The proxy never uses
aiohttp's client (upstream TLS has its own contexts, sigv4proxy.upstream.tls), so a serving
process imports aiohttp with CA loading switched off for that moment: those two contexts are left
with no trust anchor and still require verification, so any use of them fails closed. Apart from
`compat.aiohttp` because it must run before aiohttp is first imported, which that module does.
Must never: leave `ssl` patched, touch an aiohttp already imported, or import anything of ours
outside `compat`.
"""

from __future__ import annotations

import sys

from sigv4proxy.compat.versions import AIOHTTP as SUPPORTED

SUPPORTED.check()  # the code below was written and tested for this range only


def import_without_client_trust() -> None:
    """Imports aiohttp as described above; a process that already imported it (a test run) keeps
    it as it is."""
    if "aiohttp" in sys.modules:
        return
    import ssl

    shadowed = "set_default_verify_paths" in vars(ssl.SSLContext)
    saved = vars(ssl.SSLContext).get("set_default_verify_paths")
    ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
    try:
        import aiohttp  # noqa: F401
    finally:
        if shadowed:
            ssl.SSLContext.set_default_verify_paths = saved  # type: ignore[method-assign,assignment]
        else:
            del ssl.SSLContext.set_default_verify_paths
