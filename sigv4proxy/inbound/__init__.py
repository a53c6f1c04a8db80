"""The inbound adapters: one port, two protocols, each request handed to the exchange.

Owns nothing itself; see `listener` (one port: HTTP/1.1 or h2c by the preface), `h1_lean` (our
protocol over llhttp) or `h1` (aiohttp's request in, the reference), both answering with
`h1_response` bytes and taking bodies off the socket with `h1_splice`, and `h2` (inbound streams
(`h2stream`) from `h2server_lean`, our own frames, or `h2server`, the `h2` library, both on
`h2server_core`). May import leaves, wire, io, compat and the exchange only.
"""
