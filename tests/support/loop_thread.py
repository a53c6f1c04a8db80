"""An event loop in a daemon thread, for tests that drive servers on it with blocking sockets
(Hypothesis examples are synchronous): subclasses set things up in `start` on that loop, and
register their teardown on `self.stack`, which closes on exit before the loop stops."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.stack = contextlib.AsyncExitStack()

    def run(self, coro, timeout: float = 20):
        """Runs `coro` on the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        self.run(self.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
