"""One observation for both inbound protocols: the same requests sent over HTTP/1.1 and over h2c
through one proxy must leave access-log lines with the same fields and values (only what is
the connection's own may differ: protocol, client port, times) and move the request metrics by
the same amounts. The simulator upstream recomputes every signature from the bytes it got, so a
200 here is also a verified request."""

from __future__ import annotations

import asyncio
import logging

import pytest

from grpc_support.h2client import H2TestClient
from support.polling import eventually
from support.proxy import LATTICE_HOST, running_proxy

# A request's own, not the protocol's: these may differ between two sends of the same request.
CONNECTION_FIELDS = {"protocol", "sourceIpPort", "startTime", "duration", "requestToTargetDuration"}
LOG_FIELDS = ("startTime", "hostHeader", "requestMethod", "requestPath", "protocol", "responseCode", "duration",
              "requestToTargetDuration", "sourceIpPort", "userAgent", "bytesSent", "failureReason", "route",
              "upstreamProtocol")

# method, path, host, body: a signed GET (its query string must stay out of the log), a signed
# upload, a host the proxy may not sign for, and a method without a body.
REQUESTS = (
    ("GET", "/obs/get?token=t", LATTICE_HOST, b""),
    ("POST", "/obs/post", LATTICE_HOST, b"x" * 3000),
    ("GET", "/obs/denied", "not-allowed.example", b""),
    ("DELETE", "/obs/delete", LATTICE_HOST, b""),
)


async def _over_http1(port: int) -> list[int]:
    statuses = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for method, path, host, body in REQUESTS:
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: obs-test\r\n"
            if body or method == "POST":
                head += f"Content-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            status_line = await asyncio.wait_for(reader.readline(), 10)
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                assert name.lower() != "transfer-encoding", "the simulator answers with a length"
            await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    return statuses


async def _over_h2c(port: int) -> list[int]:
    statuses = []
    async with H2TestClient("127.0.0.1", port) as client:
        for method, path, host, body in REQUESTS:
            headers = [("user-agent", "obs-test")]
            if body or method == "POST":
                headers.append(("content-length", str(len(body))))
            sid = client.request(method, path, host, headers, body=body or None)
            record = await client.wait(sid)
            assert record.ended
            statuses.append(record.status)
    return statuses


def _request_metrics(app) -> dict:
    app.metrics.flush()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in app.metrics.registry.collect() for s in family.samples
            if s.name.startswith(("sigv4proxy_request_duration_seconds_count", "sigv4proxy_errors",
                                  "sigv4proxy_upstream_duration_seconds_count",
                                  "sigv4proxy_signing_duration_seconds_count"))
            and not s.name.endswith("_created")}


def _delta(before: dict, after: dict) -> dict:
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


@pytest.mark.parametrize("upstream_protocol", ["http1", "h2"])
async def test_both_inbound_protocols_log_and_count_a_request_alike(sim, caplog, upstream_protocol):
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=upstream_protocol,
                             access_log=True) as proxy:
        with caplog.at_level(logging.INFO, logger="sigv4proxy.access"):
            lines = {}
            deltas = {}
            statuses = {}
            for name, send in (("HTTP/1.1", _over_http1), ("HTTP/2", _over_h2c)):
                caplog.clear()
                before = _request_metrics(proxy)
                statuses[name] = await send(proxy.port)
                assert await eventually(
                    lambda: len([r for r in caplog.records if r.name == "sigv4proxy.access"]) == len(REQUESTS))
                deltas[name] = _delta(before, _request_metrics(proxy))
                lines[name] = [{field: getattr(r, field) for field in LOG_FIELDS}
                               for r in caplog.records if r.name == "sigv4proxy.access"]
    assert statuses["HTTP/1.1"] == statuses["HTTP/2"]
    assert statuses["HTTP/1.1"] == [200, 200, 403, 200]  # verified by the simulator; refused by the proxy
    for name, records in lines.items():
        assert {r["protocol"] for r in records} == {name}
        assert all(isinstance(r["duration"], float) and r["sourceIpPort"].startswith("127.0.0.1:") for r in records)
    own = [[{k: v for k, v in r.items() if k not in CONNECTION_FIELDS} for r in lines[name]] for name in lines]
    assert own[0] == own[1]
    assert own[0][0]["bytesSent"] not in ("-", 0) and own[0][0]["upstreamProtocol"] != "-"
    assert own[0][2]["failureReason"] == "host_not_allowed" and own[0][2]["upstreamProtocol"] == "-"
    # every request counted once, under the same labels, whichever way it came in
    assert deltas["HTTP/1.1"] == deltas["HTTP/2"]
    counted = sum(v for (name, _), v in deltas["HTTP/2"].items() if name == "sigv4proxy_request_duration_seconds_count")
    assert counted == len(REQUESTS)
