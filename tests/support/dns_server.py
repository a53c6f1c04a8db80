"""A tiny authoritative DNS server over UDP for tests that must control what a name resolves to.

Owns: answering A queries from a JSON answers file read afresh for every query (so a test changes
an answer by rewriting the file), with TTL 0: {"name": "192.0.2.1"} answers that address,
{"name": "SERVFAIL"} a server failure, a name not in the file NXDOMAIN; other query types for a
known name get an empty answer (NODATA). Each query is appended to a log file as "TYPE name".
Must never: listen anywhere but the address it is given (tests run it on a namespace's loopback).

    python dns_server.py --listen 127.0.0.1:53 --answers answers.json --log queries.log
prints "dns listening" once bound; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import socket
import struct
import sys

QTYPES = {1: "A", 28: "AAAA"}
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3


def parse_question(query: bytes) -> tuple[int, int, str, int, bytes]:
    """(id, flags, lower-case name, qtype, the question section as received)."""
    ident, flags = struct.unpack("!HH", query[:4])
    offset, labels = 12, []
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1:offset + 1 + length].decode("ascii"))
        offset += 1 + length
    qtype = struct.unpack("!H", query[offset + 1:offset + 3])[0]
    return ident, flags, ".".join(labels).lower(), qtype, query[12:offset + 5]


def answer(query: bytes, answers: dict[str, str]) -> bytes:
    ident, flags, name, qtype, question = parse_question(query)
    value = answers.get(name)
    records = b""
    if value is None:
        rcode = NXDOMAIN
    elif value == "SERVFAIL":
        rcode = SERVFAIL
    else:
        rcode = NOERROR
        if qtype == 1:  # a pointer to the name in the question, class IN, TTL 0
            records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(value)
    # QR, AA, the client's RD, RA, and the rcode; one question, one or no answer.
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    return struct.pack("!HHHHHH", ident, reply_flags, 1, 1 if records else 0, 0, 0) + question + records


def serve(listen: str, answers_path: pathlib.Path, log_path: pathlib.Path) -> None:
    host, _, port = listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("dns listening", flush=True)
    with open(log_path, "a", buffering=1) as log:
        while True:
            query, peer = sock.recvfrom(512)
            try:
                _, _, name, qtype, _ = parse_question(query)
                reply = answer(query, json.loads(answers_path.read_text()))
            except (IndexError, UnicodeDecodeError, struct.error, ValueError):
                continue  # not a query we understand: no answer, as for a lost packet
            log.write(f"{QTYPES.get(qtype, qtype)} {name}\n")
            sock.sendto(reply, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--answers", type=pathlib.Path, required=True)
    parser.add_argument("--log", type=pathlib.Path, required=True)
    args = parser.parse_args()
    serve(args.listen, args.answers, args.log)


if __name__ == "__main__":
    main()
