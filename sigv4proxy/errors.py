"""The typed errors of the proxy, each with the HTTP status it becomes.

Owns: the error hierarchy and its status codes. The request handler is the only place that turns
these into responses. Messages are short, fixed reasons: never put a secret, a signature, a
session token or a header value in one.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy answers with. `kind` is a bounded metric label."""

    status: int = 500
    kind: str = "internal"
    # The client connection cannot carry another request after this answer (HTTP/1.1).
    closes_connection: bool = False

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.kind)
        self.reason = reason or self.kind


# --- the client's fault (4xx) ---
class BadRequest(ProxyError):
    status, kind = 400, "bad_request"


class MalformedRequest(BadRequest):
    """A request HTTP/2 calls malformed (RFC 9113 §8.1.1): refused on its own stream only, with a
    400 while the stream can still be answered, else RST_STREAM(PROTOCOL_ERROR)."""

    status, kind = 400, "malformed_request"


class HostNotAllowed(ProxyError):
    status, kind = 403, "host_not_allowed"


class MethodNotSupported(ProxyError):
    status, kind = 405, "method_not_supported"


class PayloadTooLarge(ProxyError):
    status, kind = 413, "payload_too_large"


class RequestTimeout(ProxyError):
    """The client stopped sending its request body part-way (the rest may still come: it must
    never be read as the next request)."""

    status, kind = 408, "request_timeout"
    closes_connection = True


class HeadersTooLarge(ProxyError):
    status, kind = 431, "headers_too_large"


# --- ours or upstream's (5xx) ---
class Overloaded(ProxyError):
    status, kind = 503, "overloaded"


class CredentialsUnavailable(ProxyError):
    """No unexpired credentials: fail closed, never forward unsigned."""

    status, kind = 503, "credentials_unavailable"


class UpstreamError(ProxyError):
    status, kind = 502, "upstream"


class UpstreamConnectError(UpstreamError):
    status, kind = 502, "upstream_connect"


class UpstreamDnsError(UpstreamConnectError):
    """The upstream host name did not resolve (it is looked up afresh for each new connection)."""

    status, kind = 502, "upstream_dns"


class UpstreamProtocolError(UpstreamError):
    status, kind = 502, "upstream_protocol"


class UpstreamReset(UpstreamError):
    status, kind = 502, "upstream_reset"


class UnansweredReset(UpstreamReset):
    """A connection that had answered before closed or reset under a request before any byte of
    its answer arrived: most likely the upstream's idle close racing our reuse (the request may
    still have reached it). The pool retries it once on a new connection when the method is
    idempotent and the body can be replayed; otherwise it is the 502 it always was."""


class UpstreamTimeout(UpstreamError):
    status, kind = 504, "upstream_timeout"


class RetryableStreamError(UpstreamError):
    """The peer never processed the stream (REFUSED_STREAM, or above GOAWAY's last_stream_id).

    The pool retries these on another connection; they only escape when retries run out.
    """

    status, kind = 502, "upstream_refused"

    def __init__(self, reason: str = "", retry_reason: str = "refused_stream") -> None:
        super().__init__(reason)
        self.retry_reason = retry_reason  # the label of sigv4proxy_upstream_retries_total
