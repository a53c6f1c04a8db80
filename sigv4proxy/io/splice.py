"""Moving a request body from the client's socket to the upstream's inside the kernel.

Linux splice(2) through a pipe: the bytes never enter the process, so a large upload costs a few
system calls per socket buffer instead of a copy in, a parse, a copy out and the Python between.
Used for an HTTP/1.1 body of declared length going to a cleartext upstream: moved whole into an
HTTP/1.1 socket (`move_body`), or cut into HTTP/2 DATA frames each put together in the pipe
(`FrameSource`). TLS needs the bytes in the process: there `ReadSource` reads the rest straight
off the client's socket, one copy, with no parser or stream buffer between.

Owns: the per-process pipe free list, the move loop, the frame source and the read source. Must
never: take more than it was asked to from the source (what follows a body on the client's socket
is the next request), block the event loop, or put a pipe that may still hold bytes back in the
free list.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys

if sys.platform != "win32":  # pipe sizes and FIONREAD (splice itself is Linux-only)
    import fcntl
    import termios

from sigv4proxy.errors import BadRequest, Overloaded, RequestTimeout, UpstreamReset, UpstreamTimeout

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")
# What a pipe holds between the two sockets: enough to take a whole receive buffer while the
# upstream's send buffer is full. Kernel memory (page references), not the process's.
PIPE_SIZE = 256 * 1024
# One read of a body for TLS: smaller reads were slower, larger ones no faster and used more memory
# per worker (measured: docs/performance.md).
READ_SIZE = 128 * 1024
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_FREE_LIMIT = 64  # idle pipes kept for reuse (two descriptors each)
_free: list[tuple[int, int, int]] = []

SHORT_BODY = "request body shorter than its Content-Length"
CLIENT_STALLED = "request body stalled: nothing arrived for --read-timeout"


def cleartext_fd(transport) -> int:
    """The socket descriptor under `transport` if bytes may be spliced into or out of it (a
    cleartext TCP socket: TLS needs them in the process), else -1. Still the transport's own."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return -1
    return sock.fileno()


def _take_pipe() -> tuple[int, int, int]:
    """(read end, write end, capacity): an empty pipe, non-blocking both ends."""
    if _free:
        return _free.pop()

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the user's pipe-page allowance: the default size still works
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size


def _give_back(pipe: tuple[int, int, int], empty: bool) -> None:
    if empty and len(_free) < _FREE_LIMIT:
        _free.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


async def _ready(loop: asyncio.AbstractEventLoop, read_fd: int | None, write_fd: int | None, timeout: float) -> bool:
    """Waits until `read_fd` is readable or `write_fd` writable; False after `timeout`."""
    waiter = loop.create_future()

    def wake(ready: bool = True) -> None:
        if not waiter.done():
            waiter.set_result(ready)

    if read_fd is not None:
        loop.add_reader(read_fd, wake)
    if write_fd is not None:
        loop.add_writer(write_fd, wake)
    timer = loop.call_later(timeout, wake, False)
    try:
        return await waiter
    finally:
        timer.cancel()
        if read_fd is not None:
            loop.remove_reader(read_fd)
        if write_fd is not None:
            loop.remove_writer(write_fd)


class Taken:
    """What a move has taken from its source so far: after a failure, the rest of the body is
    still in the client's socket."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_devnull = -1


def discard_target() -> int:
    """A descriptor that takes any splice at once (/dev/null), opened once per process."""
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _devnull


async def wait_writable(fd: int, timeout: float) -> bool:
    """Waits until socket `fd` (not a transport's own descriptor) is writable; False after
    `timeout`."""
    return await _ready(asyncio.get_running_loop(), None, fd, timeout)


def _upstream_gone(exc: OSError) -> UpstreamReset:
    return UpstreamReset(
        f"upstream connection lost while sending the body ({errno.errorcode.get(exc.errno or 0, 'error')})"
    )


async def move_body(
    src: int, dst: int, prefix: bytes, count: int, *, src_timeout: float, dst_timeout: float, taken: Taken | None = None
) -> None:
    """Writes `prefix`, then exactly `count` bytes taken from socket `src`, to socket `dst`
    (`taken`, if given, counts the bytes taken from `src` as they go).

    Typed errors: the client closing early is BadRequest, the client silent for `src_timeout`
    RequestTimeout, the upstream not taking bytes for `dst_timeout` UpstreamTimeout, the upstream
    socket failing UpstreamReset, no descriptors left Overloaded. Both sockets stay open and
    owned by their transports.
    """
    loop = asyncio.get_running_loop()
    owned: list[int] = []  # our duplicates: the event loop refuses to watch a transport's own
    try:
        if count:
            src = os.dup(src)
            owned.append(src)
        dst = os.dup(dst)
        owned.append(dst)
        pipe = _take_pipe()
    except OSError:
        for fd in owned:
            os.close(fd)
        raise Overloaded("out of file descriptors") from None
    r, w, capacity = pipe
    queued = 0  # bytes in the pipe
    try:
        view = memoryview(prefix)
        while view:
            try:
                view = view[os.write(dst, view) :]
            except BlockingIOError:
                if not await _ready(loop, None, dst, dst_timeout):
                    raise UpstreamTimeout("upstream stopped reading") from None
            except OSError as exc:
                raise _upstream_gone(exc) from None
        left = count
        since_wait = 0  # bytes moved since the loop last ran anything else
        while left or queued:
            if since_wait >= capacity:  # a fast client and upstream: let other requests run too
                since_wait = 0
                await asyncio.sleep(0)
            moved = False
            if left and queued < capacity:
                try:
                    n = os.splice(src, w, min(left, capacity - queued), flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError:
                    raise BadRequest(SHORT_BODY) from None  # the client's socket failed
                else:
                    if not n:
                        raise BadRequest(SHORT_BODY)
                    if taken is not None:
                        taken.count += n
                    left -= n
                    queued += n
                    moved = True
            if queued:
                try:
                    n = os.splice(r, dst, queued, flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _upstream_gone(exc) from None
                else:
                    queued -= n
                    since_wait += n
                    moved = True
            if moved:
                continue
            since_wait = 0
            want_src = src if left and queued < capacity else None
            want_dst = dst if queued else None
            # Bytes waiting for the upstream make its silence the failure; otherwise the client's.
            if not await _ready(loop, want_src, want_dst, dst_timeout if want_dst is not None else src_timeout):
                if want_dst is not None:
                    raise UpstreamTimeout("upstream stopped reading")
                raise RequestTimeout(CLIENT_STALLED)
    finally:
        _give_back(pipe, queued == 0)
        for fd in owned:
            os.close(fd)


def _readable_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder, signed=True)


class FrameSource:
    """The rest of a request body in the client's socket, sent as HTTP/2 DATA frames each put
    together in a pipe (the 9-byte frame header written in, the payload spliced in behind it)
    and moved out whole: no body byte enters the process. Owns `src` (a descriptor of its own
    for the client's socket) and its pipe until `release()`."""

    __slots__ = ("left", "finisher", "_src", "_pipe", "_queued", "_timeout", "_loop")

    def __init__(self, src: int, left: int, src_timeout: float) -> None:
        self.left = left  # body bytes still in the client's socket
        self._src = src
        self._pipe = _take_pipe()
        self._queued = 0  # bytes of the current frame still in the pipe
        self._timeout = src_timeout
        self._loop = asyncio.get_running_loop()
        self.finisher: asyncio.Future[None] | None = None  # writing a part-written frame's rest

    @property
    def max_payload(self) -> int:
        return self._pipe[2] - 9  # the pipe holds a whole frame, header included

    async def wait_data(self) -> int:
        """Bytes of the body waiting in the client's socket (at least 1), waiting up to the
        client timeout for some."""
        while True:
            available = _readable_bytes(self._src)
            if available:
                return min(available, self.left)
            if not await _ready(self._loop, self._src, None, self._timeout):
                raise RequestTimeout(CLIENT_STALLED)
            if not _readable_bytes(self._src):  # readable and empty: the client closed or failed
                raise BadRequest(SHORT_BODY)

    async def assemble(self, header: bytes, size: int) -> None:
        """Puts a frame in the pipe: `header`, then the next `size` body bytes (at most what
        `wait_data` reported, so they are there)."""
        r, w, capacity = self._pipe
        if size + len(header) > capacity:
            raise ValueError("frame larger than the pipe")
        os.write(w, header)
        self._queued = len(header)
        while size:
            try:
                n = os.splice(self._src, w, size, flags=_FLAGS)
            except BlockingIOError:
                n = None
            except OSError:
                raise BadRequest(SHORT_BODY) from None
            if n == 0:
                raise BadRequest(SHORT_BODY)
            if n is None:
                if not await _ready(self._loop, self._src, None, self._timeout):
                    raise RequestTimeout(CLIENT_STALLED)
                continue
            size -= n
            self.left -= n
            self._queued += n

    def emit(self, dst: int) -> bool:
        """Moves what is left of the current frame to socket `dst` (never blocking): True once
        it is all out. A failure of `dst` is UpstreamReset."""
        try:
            self._queued -= os.splice(self._pipe[0], dst, self._queued, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _upstream_gone(exc) from None
        return not self._queued

    def release(self) -> int:
        """Gives the pipe back (dropped if a frame is left in it; once the finisher is done with
        it, if one runs); returns `src`, now the caller's to close."""
        finisher = self.finisher
        if finisher is not None and not finisher.done():
            finisher.add_done_callback(lambda _: _give_back(self._pipe, not self._queued))
        else:
            _give_back(self._pipe, not self._queued)
        return self._src


class ReadSource:
    """The rest of a request body in the client's socket, for an upstream that needs the bytes
    (TLS): read straight into the process, never past the body. Owns `src` (a descriptor of its
    own for the client's socket) until `release()`."""

    __slots__ = ("left", "_src", "_timeout", "_loop")

    def __init__(self, src: int, left: int, src_timeout: float) -> None:
        self.left = left  # body bytes still in the client's socket
        self._src = src
        self._timeout = src_timeout
        self._loop = asyncio.get_running_loop()

    async def read(self) -> bytes:
        """The next part of the body (at most READ_SIZE bytes, at least one), waiting up to the
        client timeout for it. A client that closes first is BadRequest, a silent one
        RequestTimeout."""
        while True:
            try:
                data = os.read(self._src, min(READ_SIZE, self.left))
            except BlockingIOError:
                if not await _ready(self._loop, self._src, None, self._timeout):
                    raise RequestTimeout(CLIENT_STALLED) from None
                continue
            except OSError:
                raise BadRequest(SHORT_BODY) from None
            if not data:
                raise BadRequest(SHORT_BODY)
            self.left -= len(data)
            return data

    def release(self) -> int:
        """Returns `src`, now the caller's to close."""
        return self._src
