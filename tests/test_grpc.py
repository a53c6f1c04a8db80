"""gRPC through the proxy, end to end on loopback: a real grpcio client with a plaintext (h2c)
channel → proxy (signs) → verifying upstream (checks SigV4 with the simulator's independent
verifier, then forwards frame for frame) → a real grpcio server."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from grpc_support.echo_service import EchoService
from grpc_support.h2client import H2TestClient
from grpc_support.verifying_upstream import VerifyingForwarder
from sigv4proxy.sim.identities import IdentityStore
from support.h2_peers import H2Script, H2TestServer
from support.polling import eventually
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy, write_identities

CHANNEL_OPTIONS = [("grpc.default_authority", LATTICE_HOST), ("grpc.enable_http_proxy", 0),
                   ("grpc.enable_retries", 0)]


@pytest.fixture
async def chain(tmp_path):
    """(echo service, verifying forwarder) in front of which a proxy gets started per test."""
    identities = IdentityStore.load(str(write_identities(tmp_path)))
    async with EchoService() as service, VerifyingForwarder(service.port, identities) as forwarder:
        yield service, forwarder


def via(forwarder, **extra):
    return dict(upstream=f"http://127.0.0.1:{forwarder.port}", upstream_protocol="h2", **extra)


def channel(proxy):
    return grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=CHANNEL_OPTIONS)


@pytest.mark.parametrize("implementation", ["lean", "h2"])
async def test_unary_call_is_signed_verified_and_answered(chain, implementation):
    service, forwarder = chain
    async with running_proxy(**via(forwarder, h2_implementation=implementation)) as proxy, channel(proxy) as ch:
        reply = await ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10)
    assert reply == b"echo:hello"
    [stream] = forwarder.streams
    assert stream.failure is None and stream.principal == PRINCIPAL
    assert stream.path == "/test.Echo/Unary"
    assert stream.header("te") == "trailers"  # kept on the wire for the gRPC server...
    signed = stream.header("authorization").split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "te" not in signed and "host" in signed  # ...and never signed
    assert stream.header("content-type") == "application/grpc"
    assert stream.response_ended


async def test_unsigned_call_is_refused_by_the_verifying_upstream(chain):
    # Guards the oracle: without the proxy the same call fails verification, so the
    # verified calls above were really checked.
    service, forwarder = chain
    async with grpc.aio.insecure_channel(f"127.0.0.1:{forwarder.port}", options=CHANNEL_OPTIONS) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert forwarder.streams[0].failure == "AccessDeniedException"
    assert service.metadata == []


async def test_bidi_streaming_fifty_messages_each_way_outlives_first_byte_timeout(chain):
    service, forwarder = chain
    # The stream lives well past the first-byte timeout; only gaps would be cut.
    async with running_proxy(**via(forwarder, first_byte_timeout=0.3, read_timeout=5)) as proxy, \
            channel(proxy) as ch:
        started = time.monotonic()
        call = ch.stream_stream("/test.Echo/Bidi")(timeout=20)
        replies = []
        for i in range(50):
            await call.write(b"msg-%d" % i)
            replies.append(await call.read())
            await asyncio.sleep(0.015)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        elapsed = time.monotonic() - started
    assert replies == [b"re:msg-%d" % i for i in range(50)]
    assert elapsed > 0.3
    [stream] = forwarder.streams
    assert stream.principal == PRINCIPAL and stream.response_ended and not stream.reset_by_proxy


async def test_deadline_propagates_and_expires(chain):
    service, forwarder = chain
    async with running_proxy(**via(forwarder)) as proxy, channel(proxy) as ch:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Slow")(b"x", timeout=0.6)
        elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 4  # the server sleeps 5 s: the deadline, not the server, ended it
    [stream] = forwarder.streams
    timeout = stream.header("grpc-timeout")
    assert timeout is not None and timeout[-1] in "HMSmun"  # passed through, unsigned
    [remaining] = service.deadlines
    assert remaining is not None and 0 < remaining <= 0.7  # the server saw the client's 0.6 s deadline (grpc-timeout unit rounding)


async def test_client_cancellation_cancels_the_upstream_stream(chain):
    service, forwarder = chain
    async with running_proxy(**via(forwarder)) as proxy, channel(proxy) as ch:
        call = ch.stream_stream("/test.Echo/Hang")(timeout=20)
        await call.write(b"start")
        await asyncio.wait_for(service.hang_started.wait(), 10)
        call.cancel()
        await asyncio.wait_for(service.cancelled.wait(), 10)  # reached the real server
        assert await call.code() == grpc.StatusCode.CANCELLED
        # The proxy's in-flight count returns to zero.
        assert await eventually(lambda: proxy.exchange.inflight == 0, timeout=2)
    [stream] = forwarder.streams
    assert stream.reset_by_proxy  # the proxy sent RST_STREAM upstream


async def test_server_error_status_and_message_reach_the_client(chain):
    service, forwarder = chain
    async with running_proxy(**via(forwarder)) as proxy, channel(proxy) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Fail")(b"widget-7", timeout=10)
        # and the channel still works afterwards
        assert await ch.unary_unary("/test.Echo/Unary")(b"again", timeout=10) == b"echo:again"
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing: widget-7"


@pytest.mark.parametrize("implementation", ["lean", "h2"])  # both upstream HTTP/2 clients
async def test_request_and_response_trailers_pass_through(chain, implementation):
    service, forwarder = chain
    message = b"trailing"
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    async with running_proxy(**via(forwarder, h2_implementation=implementation)) as proxy, H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("POST", "/test.Echo/Unary", LATTICE_HOST,
                             [("content-type", "application/grpc"), ("te", "trailers")], end_stream=False)
        # Message and trailers in one write: the server may answer a unary call as soon as it
        # has the message, and the upload's remainder is then legitimately cancelled.
        client.h2.send_data(sid, framed)
        client.send_trailers(sid, [("x-request-checksum", "abc123")])
        record = await client.wait(sid)
    assert record.status == 200 and record.ended
    assert bytes(record.body) == b"\x00" + (5 + len(message)).to_bytes(4, "big") + b"echo:" + message
    assert record.trailer(b"grpc-status") == b"0"
    [stream] = forwarder.streams
    assert stream.request_trailers == [("x-request-checksum", "abc123")]


@pytest.mark.parametrize("case, code, kind", [
    ("host", grpc.StatusCode.PERMISSION_DENIED, "host_not_allowed"),
    ("credentials", grpc.StatusCode.UNAVAILABLE, "credentials_unavailable"),
    ("stall", grpc.StatusCode.DEADLINE_EXCEEDED, "upstream_timeout"),
    ("dead", grpc.StatusCode.UNAVAILABLE, "upstream_connect"),
])
async def test_proxy_errors_become_grpc_statuses(chain, case, code, kind):
    from sigv4proxy.aws.credentials import CredentialStore

    service, forwarder = chain
    options = list(CHANNEL_OPTIONS)
    extra: dict = {}
    credentials = None
    async with H2TestServer(H2Script(stall=True)) as stalled:
        upstream = via(forwarder)
        if case == "host":
            options[0] = ("grpc.default_authority", "example.com")
        elif case == "credentials":
            class Broken:
                def fetch(self):
                    raise RuntimeError("endpoint down")
            credentials = CredentialStore(Broken())
        elif case == "stall":
            upstream = dict(upstream=f"http://127.0.0.1:{stalled.port}", upstream_protocol="h2")
            extra = dict(first_byte_timeout=0.3)
        else:  # a loopback port with nothing listening
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dead_port = s.getsockname()[1]
            upstream = dict(upstream=f"http://127.0.0.1:{dead_port}", upstream_protocol="h2")
        async with running_proxy(credentials=credentials, **upstream, **extra) as proxy, \
                grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert err.value.code() == code
    assert err.value.details().startswith("sigv4proxy: ")
    metadata = dict(err.value.trailing_metadata() or ()) | dict(err.value.initial_metadata() or ())
    assert metadata.get("x-sigv4proxy-error") == kind
    assert forwarder.streams == []  # nothing unsigned or refused ever reached the upstream
