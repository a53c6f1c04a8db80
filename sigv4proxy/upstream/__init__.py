"""Upstream connections: pooled HTTP/2 and HTTP/1.1 clients. Knows nothing about AWS.

Owns: connecting (TCP, TLS with SNI/ALPN), multiplexing, flow control, GOAWAY/REFUSED_STREAM
retries, timeouts. Must never: import anything about signing, credentials or routing, or change
a header it was given (the bytes it is handed are the bytes that were signed).
"""
