"""The `hpack` library's internals, used here and nowhere else: its copy of the static table
(RFC 7541 Appendix A) and its Huffman decoder (Appendix B), for the proxy's own HPACK codecs
(`wire.hpack_decode`, `wire.h2_wire`, `inbound.h2_hpack`), which `hpack` itself stays the oracle
for in the tests.

Owns: `STATIC_TABLE` (name, value pairs, index 1 first) and `decode_huffman` (bytes in, bytes out;
`hpack.HPACKDecodingError` on a bad string), as `hpack.table` and `hpack.huffman_table` define
them. Must never: be imported for anything but these, or import anything of ours outside `compat`.
"""

from __future__ import annotations

from sigv4proxy.compat.versions import HPACK as SUPPORTED

SUPPORTED.check()  # before hpack loads: the code below was written and tested for this range only

from hpack.huffman_table import decode_huffman  # noqa: E402
from hpack.table import HeaderTable  # noqa: E402

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE

__all__ = ["STATIC_TABLE", "decode_huffman"]
