"""original_destination(): sockaddr decoding, direct loopback connections, and real iptables
REDIRECTs inside a throwaway network namespace (root + ip + iptables; skipped with a reason
otherwise)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys

import pytest

from sigv4proxy.io.original_dst import original_destination, parse_sockaddr_in, parse_sockaddr_in6
from support.netns import have_netns_support, netns, run_in_netns


# --- decoding the kernel's sockaddr bytes (built here by hand, not by the code under test) ---

def _sockaddr_in(addr: bytes, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + addr + bytes(8)


def _sockaddr_in6(addr: bytes, port: int, family: int = socket.AF_INET6) -> bytes:
    return struct.pack("=H", family) + struct.pack("!HI", port, 0) + addr + struct.pack("=I", 0)


def test_parse_sockaddr_in():
    assert parse_sockaddr_in(_sockaddr_in(bytes([169, 254, 171, 5]), 80)) == ("169.254.171.5", 80)
    assert parse_sockaddr_in(_sockaddr_in(bytes([10, 0, 0, 1]), 65535)) == ("10.0.0.1", 65535)


def test_parse_sockaddr_in6():
    addr = bytes(15) + b"\x01"
    assert parse_sockaddr_in6(_sockaddr_in6(addr, 443)) == ("::1", 443)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00", _sockaddr_in(bytes(4), 80, family=socket.AF_INET6)])
def test_parse_sockaddr_in_rejects_garbage(raw):
    assert parse_sockaddr_in(raw) is None


def test_parse_sockaddr_in6_rejects_wrong_family_and_short_input():
    assert parse_sockaddr_in6(_sockaddr_in6(bytes(16), 80, family=socket.AF_INET)) is None
    assert parse_sockaddr_in6(b"\x0a\x00\x00\x50") is None


# --- real sockets in this namespace: nothing is redirected, so the answer is None ---

async def _accepted_original(host: str) -> tuple[object, tuple]:
    """Connect to a loopback asyncio server; return original_destination() of the accepted socket."""
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        if not result.done():
            result.set_result(original_destination(writer.get_extra_info("socket")))
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        try:
            return await asyncio.wait_for(result, 5), (host, port)
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_direct_ipv4_loopback_connection_is_not_redirected():
    original, _ = await _accepted_original("127.0.0.1")
    assert original is None


async def test_direct_ipv6_loopback_connection_is_not_redirected():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python build")
    try:
        socket.socket(socket.AF_INET6).close()
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"::1 not available: {exc}")
    original, _ = await _accepted_original("::1")
    assert original is None


def test_non_tcp_and_closed_sockets_give_none():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        assert original_destination(udp) is None
    closed = socket.socket()
    closed.close()
    assert original_destination(closed) is None
    with socket.socket(socket.AF_UNIX) as unix:
        assert original_destination(unix) is None


def test_listening_socket_gives_none():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert original_destination(listener) is None


# --- real REDIRECTs inside a network namespace ---

# Runs inside the namespace: servers on ephemeral ports, REDIRECT rules pointing at them, one
# connection per case; prints one JSON object. Every wait is bounded.
IN_NAMESPACE = r"""
import asyncio, json, socket, subprocess, sys
from sigv4proxy.io.original_dst import original_destination

def nat(tool, *rule):
    subprocess.run([tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", *rule], check=True, timeout=20)

async def start_server(server_host, dual_stack):
    got = asyncio.get_running_loop().create_future()
    async def handle(reader, writer):
        if not got.done():
            got.set_result(original_destination(writer.get_extra_info("socket")))
        writer.close()
    if dual_stack:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        server = await asyncio.start_server(handle, sock=sock)
    else:
        server = await asyncio.start_server(handle, server_host, 0)
    return server.sockets[0].getsockname()[1], server, got

async def case(server_host, connect_host, connect_port, rule_tool=None, rule_dst=None, dual_stack=False):
    port, server, got = await start_server(server_host, dual_stack)
    try:
        if rule_tool:
            nat(rule_tool, "-d", rule_dst, "--dport", str(connect_port), "-j", "REDIRECT",
                "--to-ports", str(port))
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(connect_host, connect_port if rule_tool else port), 5)
        try:
            value = await asyncio.wait_for(got, 5)
        finally:
            writer.close()
        return {"original": list(value) if value else None, "proxy_port": port}
    finally:
        server.close()
        await server.wait_closed()

async def main():
    return {
        "redirected_v4": await case("127.0.0.1", "169.254.171.5", 80, "iptables", "169.254.171.5"),
        "direct_v4": await case("127.0.0.1", "127.0.0.1", None),
        "redirected_v6": await case("::1", "::1", 80, "ip6tables", "::1"),
        "direct_v6": await case("::1", "::1", None),
        "redirected_v4_on_dual_stack": await case(None, "169.254.171.5", 81, "iptables",
                                                  "169.254.171.5", dual_stack=True),
    }

print(json.dumps(asyncio.run(asyncio.wait_for(main(), 30))))
"""


@pytest.fixture(scope="module")
def namespace_results() -> dict:
    ok, reason = have_netns_support()
    if not ok:
        pytest.skip(f"network-namespace test skipped: {reason}")
    with netns("origdst") as ns:
        # The Lattice-range address lives only inside this namespace, on its loopback.
        setup = run_in_netns(ns, ["ip", "addr", "add", "169.254.171.5/32", "dev", "lo"])
        assert setup.returncode == 0, setup.stderr
        result = run_in_netns(ns, [sys.executable, "-c", IN_NAMESPACE], timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def test_redirected_ipv4_connection_reports_the_original_destination(namespace_results):
    assert namespace_results["redirected_v4"]["original"] == ["169.254.171.5", 80]


def test_direct_ipv4_connection_in_namespace_is_none(namespace_results):
    assert namespace_results["direct_v4"]["original"] is None


def test_redirected_ipv6_connection_reports_the_original_destination(namespace_results):
    # REDIRECT ::1:80 -> ::1:<proxy port>: the original port 80 differs from the accepted one.
    assert namespace_results["redirected_v6"]["original"] == ["::1", 80]
    assert namespace_results["redirected_v6"]["proxy_port"] != 80


def test_direct_ipv6_connection_in_namespace_is_none(namespace_results):
    assert namespace_results["direct_v6"]["original"] is None


def test_redirected_ipv4_on_a_dual_stack_listener(namespace_results):
    assert namespace_results["redirected_v4_on_dual_stack"]["original"] == ["169.254.171.5", 81]
