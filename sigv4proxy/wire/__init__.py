"""Pure codecs: HTTP/1.1 response parsing, HTTP/2 frames and HPACK, flow-control fairness. Bytes in,
events or bytes out; no I/O.
"""
