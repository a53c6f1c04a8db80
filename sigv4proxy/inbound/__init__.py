"""The inbound adapters: one port, two protocols, each request handed to the exchange.

Owns nothing itself; see `listener` (one port: HTTP/1.1 or h2c by the preface), `h1` (aiohttp's
request in, `h1_response` bytes out, `h1_splice` bodies taken off the socket) and `h2` (inbound
streams from `h2server`/`h2stream`). May import leaves, wire, io, compat and the exchange only.
"""
