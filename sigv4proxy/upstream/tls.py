"""Client TLS contexts for upstream connections.

Owns: building the `ssl.SSLContext` (trust roots, verification, ALPN offer). Must never: disable
verification unless asked to explicitly, or log anything about certificates' private material.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence


def make_client_ssl_context(
    ca_bundle: str | None = None, verify: bool = True, alpn: Sequence[str] = ("h2", "http/1.1")
) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, hostname + chain verification on unless `verify=False`.

    `ca_bundle` replaces the system trust store (a PEM file); ALPN offers `alpn` in order.
    """
    if ca_bundle is not None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_bundle)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    # RFC 7540 9.2.2: h2 over TLS 1.2 forbids renegotiation and weak ciphers; the default
    # context already restricts to AEAD suites on current OpenSSL.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context
