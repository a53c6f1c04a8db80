"""`sigv4proxy call`: send one signed request with the proxy's own signer, credentials and pool.

Owns: the one-shot client a user runs to test a signed call and debug a 403 (`--explain` prints
the canonical request and string to sign, the session token redacted, and both canonical URIs
when double and single path escaping disagree). Must never: print a secret key, session token or
signing key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from sigv4proxy import config as config_mod
from sigv4proxy.errors import ProxyError

if TYPE_CHECKING:
    from sigv4proxy.aws.signing import SigV4Signer

CALL_FLAGS = (
    "region",
    "service",
    "upstream",
    "upstream_protocol",
    "ca_bundle",
    "verify_tls",
    "role_arn",
    "profile",
    "extra_signed_headers",
    "connect_timeout",
    "first_byte_timeout",
    "uri_path_escaping",
)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip().lower(), value.strip()


def _parse_url(url: str) -> SplitResult | None:
    """The split URL, or None after printing why it cannot be sent (exit status 2)."""
    # Whitespace or control characters would end up in the request line or :path as sent.
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        print("sigv4proxy call: bad URL: whitespace or control characters (percent-encode them)", file=sys.stderr)
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        print(f"sigv4proxy call: bad URL: {exc}", file=sys.stderr)
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        print("sigv4proxy call: URL must be http:// or https:// with a host", file=sys.stderr)
        return None
    return parts


def path_escaping_note(signer: SigV4Signer, path: str) -> str:
    """The canonical URI under each path escaping, and which one `signer` signs."""
    from sigv4proxy.aws.signing import canonical_uri

    uris = {
        mode: canonical_uri(path, normalize=signer.normalize_path, double_encode=mode == "double")
        for mode in config_mod.URI_PATH_ESCAPINGS
    }
    signed = "double" if signer.double_encode_path else "single"
    if uris["double"] == uris["single"]:
        return f"Canonical URI: {uris[signed]} (the same with --uri-path-escaping double or single)"
    other = "single" if signed == "double" else "double"
    return (
        f"Canonical URI with --uri-path-escaping {signed}: {uris[signed]}  <- signed\n"
        f"Canonical URI with --uri-path-escaping {other}: {uris[other]}\n"
        f"They differ for this path: if the service answers 403 (signature mismatch), try "
        f"--uri-path-escaping {other}."
    )


async def call(args: argparse.Namespace, out=sys.stdout) -> int:
    from sigv4proxy.aws.routing import Router
    from sigv4proxy.runtime.app import credentials_from_config, pool_from_config

    parts = _parse_url(args.url)
    if parts is None:
        return 2
    flags = {k: getattr(args, k) for k in CALL_FLAGS if hasattr(args, k)}
    # The user named this host explicitly, so it is allowed; the URL's scheme and port are used
    # unless --upstream overrides the origin.
    flags["allow_host"] = [parts.hostname]
    if "upstream" not in flags:
        flags["upstream"] = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    config = config_mod.from_sources(flags)
    router = Router(config)
    try:
        target = router.resolve(parts.netloc.rpartition("@")[2], parts.path or "/")
    except ProxyError as exc:  # a host the router cannot sign for (e.g. malformed)
        print(f"sigv4proxy call: bad URL: {exc.reason}", file=sys.stderr)
        return 2
    credentials = credentials_from_config(config)
    pool = pool_from_config(config)
    path = parts.path or "/"
    query = parts.query
    raw_target = path + ("?" + query if query else "")
    headers = list(args.header or [])
    body = args.data.encode() if args.data is not None else None
    if body is not None:
        headers.append(("content-length", str(len(body))))
    method = args.method or ("POST" if body is not None else "GET")
    try:
        await credentials.start()
        creds = credentials.snapshot()
        signing_headers = headers + [("host", target.authority)]
        now = time.time()
        if args.explain:
            details = target.signer.explain(method, path, query, signing_headers, creds, now)
            print(details.describe(), file=out)
            print(path_escaping_note(target.signer, path), file=out)
            print("", file=out)
        added = target.signer.sign(method, path, query, signing_headers, creds, now)
        wire = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers + added]
        started = time.perf_counter()
        response = await pool.request(
            target.origin, method.encode(), raw_target.encode("latin-1"), target.authority_bytes, wire, body
        )
        first_byte = time.perf_counter()
        chunks = []
        async for chunk in response:
            chunks.append(chunk)
        await response.aclose()
        done = time.perf_counter()
        print(f"{response.http_version} {response.status}", file=out)
        for name, value in response.headers:
            print(f"{name.decode('latin-1')}: {value.decode('latin-1')}", file=out)
        print(f"# first byte {1000 * (first_byte - started):.1f} ms, total {1000 * (done - started):.1f} ms", file=out)
        print("", file=out)
        out.write(b"".join(chunks).decode("utf-8", "replace"))
        if chunks and not chunks[-1].endswith(b"\n"):
            print("", file=out)
        return 0 if response.status < 400 else 1
    except ProxyError as exc:
        print(f"sigv4proxy call: {exc.kind}: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        await pool.aclose()
        await credentials.aclose()


def run(args: argparse.Namespace) -> int:
    from sigv4proxy.aws.credentials import quiet_third_party_loggers

    quiet_third_party_loggers()
    try:
        return asyncio.run(call(args))
    except config_mod.ConfigError as exc:
        print(f"sigv4proxy call: bad option: {exc}", file=sys.stderr)
        return 2


def register(subparsers) -> None:
    parser = subparsers.add_parser("call", help="send one signed request and print the response")
    parser.add_argument("url", metavar="URL")
    parser.add_argument("-X", "--request", dest="method", help="method (default GET, or POST with -d)")
    parser.add_argument("-H", "--header", action="append", type=_header, help="'Name: value' (repeatable)")
    parser.add_argument("-d", "--data", help="request body")
    parser.add_argument(
        "--explain", action="store_true", help="print the canonical request and string to sign (no secrets)"
    )
    config_mod.add_arguments(parser, CALL_FLAGS)
    parser.set_defaults(func=run)
