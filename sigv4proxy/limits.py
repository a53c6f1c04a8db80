"""Size limits and buffer sizes that several layers must agree on, in one place.

Owns: the numbers themselves and why each is what it is. Must never: import anything of ours.
"""

# A request body whose declared length is at most this is read whole and handed on as bytes: the
# upstream sends head and body in one write (HEADERS and DATA over HTTP/2), with no upload task,
# and can replay it on a refused stream or a stale connection. Larger or chunked bodies stream,
# and only those are taken off the client's socket (splice).
SMALL_BODY = 64 * 1024

# Inbound HTTP/1.1 parser limits. A header line over MAX_HEADER_FIELD is 431; the request line has
# a different limit so that the parser's LineTooLong tells the two apart (by its limit).
MAX_HEADER_FIELD = 16 * 1024
MAX_REQUEST_LINE = MAX_HEADER_FIELD + 1024
# More header fields than this in one request head (or its trailers) is 431 (aiohttp's default).
MAX_HEADERS = 128

# A header list (names + values + 32 per field, RFC 9113 §6.5.2) or HTTP/1.1 response head larger
# than this is refused, both ways and for both protocols (h2's default).
MAX_HEADER_LIST = 64 * 1024

# Buffered request DATA frames are joined into one chunk for the upstream up to this (one write
# instead of one per 16 KiB frame, for a copy of bytes that are in cache anyway).
READ_COALESCE = 64 * 1024
