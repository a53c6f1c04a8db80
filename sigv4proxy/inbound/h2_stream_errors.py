"""The `h2` library's server connection, with a malformed request left a stream error (RFC 9113
§8.1.1) instead of the connection error h2 makes of it.

With its own header validation off, h2 still judges three things about a request and raises
ProtocolError from `receive_data` when they fail, which ends the whole connection with GOAWAY and
every stream on it: content-length (a value that is not a number, two that disagree, DATA that
does not add up to it), a `:status` in a request head (h2 takes the block for an informational
response) and trailers without END_STREAM. `ServerH2Connection` takes those decisions away from h2:
h2 decodes every header block as before (HPACK is connection state) but acts on it without
content-length and `:status`, which drive nothing else in its state machine for a request; the
event still carries the whole block, for `fields.request_head` to judge; and trailers without
END_STREAM are passed to h2 as ending the stream (so that h2 keeps the stream's state consistent),
announced first by an `UnendedTrailers` event on which the server resets the stream.

Owns: that adaptation and nothing else. Must never: judge a field itself, skip decoding a block, or
keep h2 from raising anything RFC 9113 calls a connection error (HPACK, frame sizes, stream ids,
flow control, CONTINUATION out of place). Uses h2 internals (`H2Connection._receive_frame`, the
`state_machine` of h2's streams), as of h2 4.x.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.stream import StreamState
from hyperframe.frame import HeadersFrame

from sigv4proxy.inbound.h2_hpack import H2HeaderDecoder

_H2_MUST_NOT_SEE = frozenset({b"content-length", b":status"})
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # the request head is in, more to come
_HEAD_EVENTS = (h2.events.RequestReceived, h2.events.TrailersReceived)


class UnendedTrailers:
    """A trailer block arrived without END_STREAM on `stream_id` (RFC 9113 §8.1: malformed)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _RequestBlockDecoder(H2HeaderDecoder):
    """Hands h2 a block without the fields it must not act on, keeping the whole of it."""

    __slots__ = ("whole",)

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self.whole: list[tuple[bytes, bytes]] | None = None  # the last block, if h2 got less

    def decode(self, block: bytes, raw: bool = False) -> list[tuple[bytes, bytes]]:
        fields = super().decode(block, raw)
        for name, _ in fields:
            if name in _H2_MUST_NOT_SEE:
                self.whole = fields
                return [field for field in fields if field[0] not in _H2_MUST_NOT_SEE]
        return fields


class ServerH2Connection(h2.connection.H2Connection):
    """h2's server connection whose header events carry every decoded field, unvalidated, and that
    never ends the connection over a request's content-length, `:status` or unended trailers."""

    def __init__(self, config: h2.config.H2Configuration, max_header_list_size: int) -> None:
        super().__init__(config=config)
        self.decoder = _RequestBlockDecoder(max_header_list_size)  # type: ignore[assignment]

    def _receive_frame(self, frame):  # type: ignore[no-untyped-def]
        if frame.__class__ is not HeadersFrame:
            return super()._receive_frame(frame)
        unended = "END_STREAM" not in frame.flags and self._expects_trailers(frame.stream_id)
        if unended:
            frame.flags.add("END_STREAM")
        decoder = self.decoder
        decoder.whole = None
        events = super()._receive_frame(frame)
        whole = decoder.whole
        if whole is not None:
            for event in events:
                if isinstance(event, _HEAD_EVENTS):
                    event.headers = whole
        if unended:
            events.insert(0, UnendedTrailers(frame.stream_id))
        return events

    def _expects_trailers(self, stream_id: int) -> bool:
        """A HEADERS frame on this stream is trailers: its request head arrived, it has not ended
        (a server never receives informational heads)."""
        stream = self.streams.get(stream_id)
        return stream is not None and stream.state_machine.state in _RECEIVING
