"""The `h2` library's internals, used here and nowhere else: its connection state machine kept open
after GOAWAY, the proxy's HPACK coder in its encoder/decoder slots, and a server connection that
leaves a malformed request a stream error (RFC 9113 §8.1.1) instead of the connection error h2
makes of it.

`keep_streams_after_goaway`: h2 moves to CLOSED once a GOAWAY is sent or received and then refuses
every frame, so streams still open (at or below last_stream_id) could never finish. The
connection gets a transition table that keeps frames flowing after GOAWAY; new streams stay
refused (a client cannot send HEADERS for a new stream; the server refuses them itself).

`ServerConnection`: with its own header validation off, h2 still judges three things about a
request and raises ProtocolError from `receive_data` when they fail, which ends the whole
connection with GOAWAY and every stream on it: content-length (a value that is not a number, two
that disagree, DATA that does not add up to it), a `:status` in a request head (h2 takes the block
for an informational response) and trailers without END_STREAM. The connection takes those
decisions away from h2: h2 decodes every header block as before (HPACK is connection state) but
acts on it without content-length and `:status`, which drive nothing else in its state machine
for a request; the event still carries the whole block, for the caller to judge; and trailers
without END_STREAM are passed to h2 as ending the stream (so that h2 keeps the stream's state
consistent), announced first by an `UnendedTrailers` event on which the server resets the stream.

Owns: those adaptations (h2 internals: `H2ConnectionStateMachine._transitions`,
`H2Connection._receive_frame`, the `state_machine` of h2's streams, the `encoder`/`decoder`
slots). Must never: judge a field itself, skip decoding a block, keep h2 from raising anything RFC
9113 calls a connection error (HPACK, frame sizes, stream ids, flow control, CONTINUATION out of
place), or import anything of ours outside `compat`.
"""

from __future__ import annotations

from sigv4proxy.compat.versions import H2 as SUPPORTED

SUPPORTED.check()  # before h2 loads: the code below was written and tested for this range only

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
from h2.connection import ConnectionInputs, ConnectionState  # noqa: E402
from h2.stream import StreamState  # noqa: E402
from hyperframe.frame import HeadersFrame  # noqa: E402

# Frames either side still exchanges on the streams open at GOAWAY; besides these, a server sends
# response heads and trailers, and a client receives ALTSVC (a frame only servers send).
_AFTER_GOAWAY = (
    ConnectionInputs.RECV_HEADERS,
    ConnectionInputs.RECV_DATA,
    ConnectionInputs.RECV_WINDOW_UPDATE,
    ConnectionInputs.RECV_PING,
    ConnectionInputs.RECV_SETTINGS,
    ConnectionInputs.RECV_RST_STREAM,
    ConnectionInputs.RECV_PRIORITY,
    ConnectionInputs.SEND_DATA,
    ConnectionInputs.SEND_WINDOW_UPDATE,
    ConnectionInputs.SEND_RST_STREAM,
    ConnectionInputs.SEND_PING,
    ConnectionInputs.SEND_SETTINGS,
)
_TRANSITIONS = {
    client_side: {
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{(ConnectionState.CLOSED, i): (None, ConnectionState.CLOSED) for i in _AFTER_GOAWAY + extra},
    }
    for client_side, extra in (
        (True, (ConnectionInputs.RECV_ALTERNATIVE_SERVICE,)),
        (False, (ConnectionInputs.SEND_HEADERS,)),
    )
}


def keep_streams_after_goaway(conn: h2.connection.H2Connection) -> None:
    """Lets the streams open at a GOAWAY (sent or received) on `conn` finish."""
    conn.state_machine._transitions = _TRANSITIONS[conn.config.client_side]


_H2_MUST_NOT_SEE = frozenset({b"content-length", b":status"})
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # the request head is in, more to come
_HEAD_EVENTS = (h2.events.RequestReceived, h2.events.TrailersReceived)


class UnendedTrailers:
    """A trailer block arrived without END_STREAM on `stream_id` (RFC 9113 §8.1: malformed)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _RequestBlockDecoder:
    """In h2's decoder slot, around the proxy's decoder (`hpack.Decoder`'s interface): hands h2 a
    block without the fields it must not act on, keeping the whole of it."""

    __slots__ = ("decoder", "whole")

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.whole: list[tuple[bytes, bytes]] | None = None  # the last block, if h2 got less

    # h2 sets these from the SETTINGS it sent once they are acknowledged
    @property
    def max_header_list_size(self) -> int:
        return self.decoder.max_header_list_size

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self.decoder.max_header_list_size = value

    @property
    def max_allowed_table_size(self) -> int:
        return self.decoder.max_allowed_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self.decoder.max_allowed_table_size = value

    def decode(self, block: bytes, raw: bool = False) -> list[tuple[bytes, bytes]]:
        fields = self.decoder.decode(block, raw)
        for name, _ in fields:
            if name in _H2_MUST_NOT_SEE:
                self.whole = fields
                return [field for field in fields if field[0] not in _H2_MUST_NOT_SEE]
        return fields


class ServerConnection(h2.connection.H2Connection):
    """h2's server connection with `encoder` and `decoder` (hpack.Encoder's and hpack.Decoder's
    interfaces) in its slots, whose header events carry every decoded field, unvalidated, and that
    never ends the connection over a request's content-length, `:status` or unended trailers."""

    def __init__(self, config: h2.config.H2Configuration, *, encoder, decoder) -> None:
        super().__init__(config=config)
        self.encoder = encoder
        self.decoder = _RequestBlockDecoder(decoder)  # type: ignore[assignment]

    def _receive_frame(self, frame):
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
