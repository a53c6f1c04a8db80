"""The constant-cost frame repr: same text as hyperframe's own, without hexlifying whole payloads."""

from __future__ import annotations

import binascii
import os

import hyperframe.frame
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, PushPromiseFrame

from sigv4proxy.compat import hyperframe as h2_frame_repr


def library_repr(data):
    """hyperframe 6.x's own `_raw_data_repr`, the oracle: hexlify everything, keep 20 digits."""
    if not data:
        return "None"
    r = binascii.hexlify(data).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 20, 16384])
def test_same_text_as_the_library_for_bytes_and_views(size):
    data = os.urandom(size)
    assert h2_frame_repr.raw_data_repr(data) == library_repr(data)
    assert h2_frame_repr.raw_data_repr(memoryview(data)) == library_repr(memoryview(data))
    assert h2_frame_repr.raw_data_repr(None) == library_repr(None)


def test_frames_print_the_same_with_it_installed(monkeypatch):
    frames = [DataFrame(1, data=os.urandom(16384), flags=["END_STREAM"]), DataFrame(3, data=b"ab"),
              HeadersFrame(5, data=b"\x82\x86\x84"), PushPromiseFrame(7, promised_stream_id=8, data=b"")]
    ours = [repr(f) for f in frames]
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", library_repr)
    assert ours == [repr(f) for f in frames]


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 16384])
@pytest.mark.parametrize("pad", [None, 0, 1, 12])
def test_data_frames_print_what_their_serialized_body_would(size, pad):
    frame = DataFrame(1, data=os.urandom(size))
    if pad is not None:
        frame.flags.add("PADDED")
        frame.pad_length = pad
    assert h2_frame_repr.data_body_repr(frame) == library_repr(frame.serialize_body())


def test_only_the_shown_bytes_are_hexlified():
    asked: list[object] = []

    class Payload(bytes):
        def __getitem__(self, key):
            asked.append(key)
            return bytes.__getitem__(self, key)

    text = h2_frame_repr.raw_data_repr(Payload(b"\x01" * 16384))
    assert text == "<hex:" + "01" * 10 + "...>" and asked == [slice(None, 10)]
    asked.clear()
    text = repr(DataFrame(1, data=Payload(b"\x02" * 16384)))  # no serialize_body() copy either
    assert text.endswith("<hex:" + "02" * 10 + "...>") and asked == [slice(None, 10)]


def test_installed_by_the_modules_that_run_h2():
    import sigv4proxy.inbound.h2server  # noqa: F401
    import sigv4proxy.upstream.http2  # noqa: F401

    assert hyperframe.frame._raw_data_repr is h2_frame_repr.raw_data_repr
    assert DataFrame._body_repr is h2_frame_repr.data_body_repr
    assert "<hex:" in repr(DataFrame(1, data=b"x" * 100))
