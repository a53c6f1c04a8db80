"""A bare TCP relay: the floor of one extra loopback hop, for `make bench` as a `--peer`.

No HTTP, no signing, no event loop: two blocking threads per connection copy bytes each way
through a 1 MiB buffer (at c1 this adds less latency here than a splice(2) relay did). What it
adds over direct-to-upstream is what any proxy must add by being a second TCP hop; the rest of
a proxy's added latency is its own.

    python benchmarks/bare_relay.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:80

    make bench BENCH_ARGS="--peer 'python benchmarks/bare_relay.py --listen 127.0.0.1:{port} \
        --upstream {upstream_host}:{upstream_port}' --peer-name bare-hop"
"""

from __future__ import annotations

import argparse
import socket
import threading

BUFFER = 1 << 20


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copies `src` to `dst` until `src` ends, then half-closes `dst`."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    try:
        while n := src.recv_into(buffer):
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _serve(client: socket.socket, upstream_address: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(upstream_address, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    with client, upstream:
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=_address, help="HOST:PORT to accept on")
    parser.add_argument("--upstream", required=True, type=_address, help="HOST:PORT to relay to")
    args = parser.parse_args(argv)
    family = socket.AF_INET6 if ":" in args.listen[0] else socket.AF_INET
    with socket.create_server(args.listen, family=family, backlog=1024) as server:
        while True:  # until the harness stops the process
            client, _ = server.accept()
            threading.Thread(target=_serve, args=(client, args.upstream), daemon=True).start()


if __name__ == "__main__":
    main()
