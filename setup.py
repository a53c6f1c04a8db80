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
# inbound HTTP/1.1 server and its response writer, the pool, the upstream vocabulary (`Response`,
# and the event wait the HTTP/2 streams subclass in Python, which it allows), the connections'
# shared core (subclassed in Python by the HTTP/2 connections, allowed too) and the HTTP/1.1
# client, metrics. What compiling asks of them: no async generators (iterator classes instead), no
# __slots__ on a class a compiled one inherits, and no test of an attribute read again after an
# await (a compiled read keeps the narrowed type). Left pure, with the reason: the lean HTTP/2
# endpoints and the frame reader (mixins: multiple inheritance), `h1_answer` (the aiohttp adapter
# subclasses it beside aiohttp's own class), `h2stream` and `upstream.body` (base classes
# of pure ones: mypyc refuses interpreted subclasses unless a class allows them),
# `upstream.h2_common` (an Enum with its own __init__), the inbound HTTP/2 adapter (async
# generators; compiled, it measured no cheaper), and the aiohttp and `h2` reference adapters.
COMPILED = [
    "sigv4proxy/aws/routing.py",
    "sigv4proxy/aws/signing.py",
    "sigv4proxy/aws/sigv4a.py",
    "sigv4proxy/exchange/exchange.py",
    "sigv4proxy/exchange/prepare.py",
    "sigv4proxy/fields.py",
    "sigv4proxy/inbound/h1_lean.py",
    "sigv4proxy/inbound/h1_response.py",
    "sigv4proxy/inbound/h2_hpack.py",
    "sigv4proxy/observe/metrics.py",
    "sigv4proxy/upstream/base.py",
    "sigv4proxy/upstream/connection_core.py",
    "sigv4proxy/upstream/http1.py",
    "sigv4proxy/upstream/pool.py",
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
