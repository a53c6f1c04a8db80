"""Which header names the proxy owns: one list, read by the request path and by config checks.

Owns: the hop-by-hop set (RFC 9110 §7.6.1 plus proxy-only names), the signing headers only the
proxy may set, and what follows from them. Must never: import anything of the proxy (config and
the request path both read it).
"""

# RFC 9110 §7.6.1 hop-by-hop headers, plus proxy-only ones; never forwarded as received in either
# direction. `expect: 100-continue` and `te: trailers` are passed on by the request path itself
# (the proxy takes part in both); `Trailer` is end-to-end (RFC 9110 §6.6.2) and passes.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "transfer-encoding", "upgrade", "http2-settings", "expect",
    }
)
# The proxy is the only signer: whatever the client sent for these is dropped.
SIGNING_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256", "x-amz-region-set"}
)
DROP_REQUEST = HOP_BY_HOP | SIGNING_HEADERS | {"host"}
# Response fields not passed on as received: hop-by-hop, and the length the framing decides.
DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
# What --add-header may not set: all of the above, and the framing the proxy computes itself.
NOT_ADDABLE = DROP_REQUEST | {"content-length"}
