"""The proxy's optional access log: one JSON line per request on the `sigv4proxy.access` logger.

Owns: the record layout. Field names match VPC Lattice's access log where they overlap
(startTime, hostHeader, requestMethod, requestPath, protocol, responseCode, duration,
requestToTargetDuration, sourceIpPort, userAgent, failureReason, bytesSent); `route` and
`upstreamProtocol` are ours. Must never: record a header value other than Host and User-Agent,
a query string (it may carry tokens), a signature or a credential.
"""

from __future__ import annotations

import logging
import time

access_log = logging.getLogger("sigv4proxy.access")


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def record(
    *,
    start: float,
    method: str,
    path: str,
    host: str | None,
    peer: object,
    user_agent: str | None,
    status: int,
    duration: float,
    to_target: float | None,
    route: str,
    upstream_protocol: str | None,
    bytes_sent: int | None,
    failure: str | None,
    protocol: str = "HTTP/1.1",
) -> None:
    """Emit one access-log record (durations in seconds in, milliseconds out, as Lattice logs)."""
    peer_text = "-"
    if isinstance(peer, tuple) and len(peer) >= 2:
        peer_text = f"{peer[0]}:{peer[1]}"
    access_log.info(
        "access",
        extra={
            "startTime": _iso(start),
            "hostHeader": host or "-",
            "requestMethod": method,
            "requestPath": path.partition("?")[0],
            "protocol": protocol,
            "responseCode": status,
            "duration": round(duration * 1000, 3),
            "requestToTargetDuration": round(to_target * 1000, 3) if to_target is not None else "-",
            "sourceIpPort": peer_text,
            "userAgent": user_agent or "-",
            "bytesSent": bytes_sent if bytes_sent is not None else "-",
            "failureReason": failure or "-",
            "route": route,
            "upstreamProtocol": upstream_protocol or "-",
        },
    )
