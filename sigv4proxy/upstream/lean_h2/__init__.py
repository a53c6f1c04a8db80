"""The lean HTTP/2 client: our own framing and HPACK on the hot path, without the `h2` library.

Owns: one HTTP/2 client connection as one unit: `connection.LeanH2Connection` (the connection's
protocol state, every frame read and written, flow control, spliced DATA) and `stream` (a
stream's record, its response body as the caller reads it, and its upload), on top of the stream
and connection states and error mapping in `upstream.h2_common` that the `h2`-library client
(`upstream.http2`, the reference and test oracle, `--h2-implementation h2`) shares. The wire
codecs stay pure in `sigv4proxy.wire` (`h2_wire`, `hpack_decode`). Must never: behave toward the
pool otherwise than the reference client does (the same errors, retries and states: the same
tests run against both).
"""

from sigv4proxy.upstream.lean_h2.connection import LeanH2Connection

__all__ = ["LeanH2Connection"]
