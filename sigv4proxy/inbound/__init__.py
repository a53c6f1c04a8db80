"""The inbound adapters: one port, two protocols, each request handed to the exchange.

Owns nothing itself; see `listener` (one port: HTTP/1.1 or h2c by the preface), `h1_lean` (our
protocol over llhttp) or `h1` (aiohttp's request in, the reference), both answering with
`h1_response` bytes and taking bodies off the socket with `h1_splice`, and `h2` (inbound streams
from `h2server`/`h2stream`). May import leaves, wire, io, compat and the exchange only.
"""
