"""Inbound protocols beyond aiohttp's HTTP/1.1: the preface-sniffing listener and h2c (gRPC).

Owns nothing itself; see `sniff` (one port, two protocols), `h2server` (the h2 server side) and
`h2proxy` (the request path for HTTP/2 streams).
"""
