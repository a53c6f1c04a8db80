"""Receiving HTTP/2 header blocks: HEADERS (padding and priority stripped) and CONTINUATION
frames assembled into one block (RFC 9113 §6.2, §6.10), for both lean endpoints.

Owns: the frame rules of a header block (not on stream 0, padding and priority lengths,
CONTINUATION only on the stream whose block is open, the flood guard on the block's size) and
the assembly state. Must never: decode HPACK or judge the fields (the endpoint's
`_on_header_block` does), or know which side of the connection it is on beyond the word
`peer` in its reasons and the code a too-large block ends the connection with.
"""

from __future__ import annotations

from typing import Any

from sigv4proxy.wire import h2_wire as w


class HeaderBlockReader:
    """The header-block half of a frame reader: `_on_headers` and `_on_continuation` call the
    endpoint's `_on_header_block(stream_id, block, end_stream)` once per whole block; the reader
    checks `header_stream` to refuse any other frame while a block is open."""

    def __init__(self, endpoint: Any, peer: str, max_header_block: int, block_too_large: int) -> None:
        self.endpoint = endpoint  # the connection the frames are read for (its hooks, its state)
        self.peer = peer  # "client" or "upstream": who sent it, in the reasons
        self.max_header_block = max_header_block  # encoded block across CONTINUATION (flood guard)
        self.block_too_large = block_too_large  # the GOAWAY code past the flood guard
        self.header_stream = 0  # nonzero while a header block awaits CONTINUATION
        self.header_parts: list[bytes] = []
        self.header_size = 0
        self.header_end_stream = False

    def _on_headers(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent HEADERS on stream 0")
        if flags & w.FLAG_PADDED:
            if start == stop:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a truncated HEADERS frame")
            pad = data[start]
            start += 1
            if pad > stop - start:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent bad HEADERS padding")
            stop -= pad
        if flags & w.FLAG_PRIORITY:  # priority signals are ignored (RFC 9113 §5.3.2)
            start += 5
            if start > stop:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a truncated HEADERS frame")
        block = data[start:stop]
        end_stream = bool(flags & w.FLAG_END_STREAM)
        if flags & w.FLAG_END_HEADERS:
            self.endpoint._on_header_block(stream_id, block, end_stream)
        else:
            self.header_stream = stream_id
            self.header_parts = [block]
            self.header_size = len(block)
            self.header_end_stream = end_stream

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not self.header_stream or stream_id != self.header_stream:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent an unexpected CONTINUATION")
        self.header_parts.append(payload)
        self.header_size += len(payload)
        if self.header_size > self.max_header_block:
            raise w.ProtocolViolation(self.block_too_large, f"{self.peer} header block too large")
        if flags & w.FLAG_END_HEADERS:
            block = b"".join(self.header_parts)
            self.header_stream = 0
            self.header_parts = []
            self.endpoint._on_header_block(stream_id, block, self.header_end_stream)
