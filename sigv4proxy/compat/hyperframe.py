"""A constant-cost `repr()` for hyperframe frames, installed wherever the `h2` library is used.

Owns: replacements for `hyperframe.frame._raw_data_repr` and `DataFrame._body_repr`. h2 builds
`repr(frame)` for every frame it receives, for a trace log line that is off (the argument is
computed before the logger drops it); hyperframe re-serializes a DATA frame's body (a copy of the
payload) and hexlifies all of it only to keep its first 20 hex digits: a cost that grows with
every DATA payload (docs/performance.md). The replacements read only
the 10 bytes they show; their output is identical. Must never: change what a frame's repr says,
or touch anything in h2 beyond these two functions, or import anything of ours outside `compat`.
"""

from __future__ import annotations

import binascii

from sigv4proxy.compat.versions import HYPERFRAME as SUPPORTED

SUPPORTED.check()  # before hyperframe loads: the code below was written and tested for this range only

import hyperframe.frame  # noqa: E402

_SHOWN = 10  # bytes: hyperframe keeps 20 hex digits and marks the rest with "..."


def _hex(head: bytes | memoryview, size: int) -> str:
    """hyperframe's text for `size` bytes starting with `head` (at least its first _SHOWN)."""
    if not size:
        return "None"
    shown = binascii.hexlify(head[:_SHOWN]).decode("ascii")
    return "<hex:" + (shown + "..." if size > _SHOWN else shown) + ">"


def raw_data_repr(data: bytes | memoryview | None) -> str:
    return _hex(data[:_SHOWN], len(data)) if data else "None"


def data_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    """What `_raw_data_repr(frame.serialize_body())` says, without building the body: the pad
    length byte (if PADDED), the data, then pad_length zero bytes."""
    padding_data = frame.serialize_padding_data()
    head = padding_data + bytes(frame.data[:_SHOWN]) + b"\0" * min(frame.pad_length, _SHOWN)
    return _hex(head, len(padding_data) + len(frame.data) + frame.pad_length)


def install() -> None:
    """Idempotent; the frames look `_raw_data_repr` up in their module."""
    hyperframe.frame._raw_data_repr = raw_data_repr
    hyperframe.frame.DataFrame._body_repr = data_body_repr  # type: ignore[method-assign,assignment]


install()
