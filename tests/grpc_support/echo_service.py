"""A real grpcio (asyncio) server with bytes-in/bytes-out generic handlers: no protoc codegen.

Methods of `test.Echo`: `Unary` (echo), `Bidi` (echo each message, prefixed), `Slow` (sleeps
longer than any test deadline, records the deadline it saw), `Fail` (NOT_FOUND with a message),
`Hang` (bidi that waits until cancelled, records the cancellation). Must never: bind anything
but loopback, or outlive its test (`async with`).
"""

from __future__ import annotations

import asyncio

import grpc

SERVICE = "test.Echo"


class EchoService:
    def __init__(self) -> None:
        self.port = 0
        self.deadlines: list[float | None] = []  # time_remaining() seen by Slow
        self.cancelled = asyncio.Event()  # Hang was cancelled by its client
        self.hang_started = asyncio.Event()
        self.metadata: list[dict[str, str]] = []
        self._server: grpc.aio.Server | None = None

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        return b"echo:" + request

    async def bidi(self, requests, context: grpc.aio.ServicerContext):
        async for message in requests:
            yield b"re:" + message

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.deadlines.append(context.time_remaining())
        await asyncio.sleep(5)
        return b"too late"

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    async def hang(self, requests, context: grpc.aio.ServicerContext):
        self.hang_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b"never"

    async def __aenter__(self) -> EchoService:
        handlers = grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hang": grpc.stream_stream_rpc_method_handler(self.hang),
        })
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handlers,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
