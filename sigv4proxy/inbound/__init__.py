"""Inbound protocols beyond aiohttp's HTTP/1.1 parser: the preface-sniffing listener, h2c (gRPC),
and the HTTP/1.1 response written as our own bytes.

Owns nothing itself; see `sniff` (one port, two protocols), `h2server` (the h2 server side),
`h2proxy` (the request path for HTTP/2 streams) and `h1_response` (HTTP/1.1 response framing).
"""
