"""The optional compiled build: with SIGV4PROXY_COMPILE=1, the hot modules below are compiled to C
extensions with mypyc (the same source, fully typed; pyproject.toml holds everything else). Without
it the package is pure Python, the reference both builds pass the same tests as. `make test` runs
the suite on the compiled build (newest releases) and on pure Python (lowest releases); `make bench`
and the image run compiled. Needs mypy (the dev extra's), setuptools >= 77 and a C compiler with
Python's headers.
"""

import os

from setuptools import setup

# The request path's modules: signing (SigV4A's signer subclasses SigV4's, so both), routing and
# request preparation, header judgement, the HTTP/1.1 and HPACK codecs, the exchange, the lean
# inbound HTTP/1.1 server and its response writer, the lean inbound HTTP/2 server with its shared
# core and streams and the HTTP/2 adapter, the pool, the upstream vocabulary (`Response`, and the
# event wait the HTTP/2 streams subclass in Python, which it allows), the connections' shared
# core and the HTTP/2 clients' shared states (subclassed in Python by the `h2`-library client,
# allowed too; so is the inbound servers' core, by the `h2` reference server), the HTTP/1.1
# client, the lean HTTP/2 client with its stream, the HTTP/2 frame reader and header-block reader
# (objects the lean endpoints hold, not mixins), metrics. What compiling asks of them: no async
# generators (iterator classes instead), no __slots__ on a class a compiled one inherits, no Enum
# with an __init__ of its own, one base class (no mixins, no asyncio.Protocol), a field that may
# be an hpack NeverIndexedHeaderTuple held as an object, and no test of an attribute read again
# after an await (a compiled read keeps the narrowed type). Left pure, with the reason:
# `h1_answer` (the aiohttp adapter subclasses it beside aiohttp's own class), `upstream.body` (a
# base class of pure ones: mypyc refuses interpreted subclasses unless a class allows them), and
# the aiohttp and `h2` reference adapters.
COMPILED = [
    "sigv4proxy/aws/routing.py",
    "sigv4proxy/aws/signing.py",
    "sigv4proxy/aws/sigv4a.py",
    "sigv4proxy/exchange/exchange.py",
    "sigv4proxy/exchange/prepare.py",
    "sigv4proxy/fields.py",
    "sigv4proxy/inbound/h1_lean.py",
    "sigv4proxy/inbound/h2.py",
    "sigv4proxy/inbound/h1_response.py",
    "sigv4proxy/inbound/h2_hpack.py",
    "sigv4proxy/inbound/h2server_core.py",
    "sigv4proxy/inbound/h2server_lean.py",
    "sigv4proxy/inbound/h2stream.py",
    "sigv4proxy/observe/metrics.py",
    "sigv4proxy/upstream/base.py",
    "sigv4proxy/upstream/connection_core.py",
    "sigv4proxy/upstream/h2_common.py",
    "sigv4proxy/upstream/http1.py",
    "sigv4proxy/upstream/lean_h2/connection.py",
    "sigv4proxy/upstream/lean_h2/stream.py",
    "sigv4proxy/upstream/pool.py",
    "sigv4proxy/wire/h2_frame_reader.py",
    "sigv4proxy/wire/h2_header_blocks.py",
    "sigv4proxy/wire/h2_window.py",
    "sigv4proxy/wire/h2_wire.py",
    "sigv4proxy/wire/hpack_decode.py",
    "sigv4proxy/wire/http1_parse.py",
]


def _extensions() -> list:
    if os.environ.get("SIGV4PROXY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # group_name keeps mypyc's shared runtime inside the package (not a top-level module). The
    # lint of the type-check is `make test`'s: a `type: ignore` that another release of a
    # dependency makes unneeded does not stop a build.
    return mypycify(
        ["--no-warn-unused-ignores", *COMPILED], opt_level="3", debug_level="0", group_name="sigv4proxy._compiled"
    )


setup(ext_modules=_extensions())
