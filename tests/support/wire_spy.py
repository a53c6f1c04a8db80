"""Seeing what a connection wrote: a transport wrapper that records each write, and the HTTP/2
frames in a recorded chunk of bytes."""

from __future__ import annotations

from typing import Any, Iterator


class RecordingTransport:
    """Wraps a real transport; every write or writelines call becomes one entry in `writes`."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.writes: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._real.write(data)

    def writelines(self, parts: list) -> None:
        self.writes.append(b"".join(parts))
        self._real.writelines(parts)


def split_frames(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(frame type, flags, stream id, payload) of each HTTP/2 frame whose 9-byte header is in
    `data`, in order (the last payload may be cut short)."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        yield (data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
               data[pos + 9:pos + 9 + length])
        pos += 9 + length


def frames_in(data: bytes) -> list[tuple[int, int]]:
    """(frame type, stream id) of each whole HTTP/2 frame in `data`, in order."""
    return [(kind, stream) for kind, _, stream, _ in split_frames(data)]
