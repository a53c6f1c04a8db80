"""Write backpressure shared by an upstream connection's writers (`connection_core`).

Over TLS (`SerialWriteFlow`), writers waiting on a paused transport get past a resume one at a
time, so a resume lets one chunk into the write buffer rather than one per waiting stream; plain
connections (`WriteFlow`) wake every waiter. Both bound every wait, and a failure reaches all."""

from __future__ import annotations

import asyncio

import pytest

from sigv4proxy.errors import UpstreamReset, UpstreamTimeout
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.connection_core import ConnectionCore, SerialWriteFlow, WriteFlow


class _Writers:
    """`n` writers on one flow; each writes once it gets past `drain` and, like a transport whose
    buffer went over its high-water mark, pauses the flow again if `pause_after_write`."""

    def __init__(self, flow: WriteFlow, n: int, pause_after_write: bool) -> None:
        self.flow = flow
        self.wrote: list[int] = []
        self.pause_after_write = pause_after_write
        self.tasks = [asyncio.ensure_future(self._write(i)) for i in range(n)]

    async def _write(self, i: int) -> None:
        await self.flow.drain(5)
        self.wrote.append(i)
        if self.pause_after_write:
            self.flow.pause()

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


async def test_serial_flow_lets_one_waiter_write_per_resume_while_each_write_pauses_again():
    flow = SerialWriteFlow()
    flow.pause()
    writers = _Writers(flow, 5, pause_after_write=True)
    await writers.settle()
    assert writers.wrote == []
    for turn in range(1, 6):
        flow.resume()
        await writers.settle()
        assert writers.wrote == list(range(turn))  # one more each resume, in arrival order
    await asyncio.gather(*writers.tasks)


async def test_serial_flow_passes_every_waiter_in_order_while_writes_do_not_pause():
    flow = SerialWriteFlow()
    flow.pause()
    writers = _Writers(flow, 5, pause_after_write=False)
    await writers.settle()
    flow.resume()
    await asyncio.wait_for(asyncio.gather(*writers.tasks), 5)
    assert writers.wrote == [0, 1, 2, 3, 4]
    # A newcomer while no one waits is not held up.
    await asyncio.wait_for(flow.drain(5), 0.1)


async def test_plain_flow_wakes_every_waiter_at_a_resume():
    flow = WriteFlow()
    flow.pause()
    writers = _Writers(flow, 5, pause_after_write=True)
    await writers.settle()
    flow.resume()
    await asyncio.wait_for(asyncio.gather(*writers.tasks), 5)
    assert sorted(writers.wrote) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("flow_class", [WriteFlow, SerialWriteFlow])
async def test_a_wait_with_no_resume_times_out_and_later_waiters_still_get_their_turn(flow_class):
    flow = flow_class()
    flow.pause()
    with pytest.raises(UpstreamTimeout, match="stopped reading"):
        await flow.drain(0.05)  # its future stays queued, timed out
    writers = _Writers(flow, 2, pause_after_write=False)
    await writers.settle()
    flow.resume()
    await asyncio.wait_for(asyncio.gather(*writers.tasks), 5)
    assert writers.wrote == [0, 1]


@pytest.mark.parametrize("flow_class", [WriteFlow, SerialWriteFlow])
async def test_a_failure_reaches_every_waiter_and_every_later_drain(flow_class):
    flow = flow_class()
    flow.pause()
    writers = _Writers(flow, 3, pause_after_write=False)
    await writers.settle()
    flow.fail(UpstreamReset("upstream connection lost"))
    results = await asyncio.gather(*writers.tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamReset) for r in results)
    with pytest.raises(UpstreamReset):
        await flow.drain(5)


async def test_tls_connections_write_serially_and_cleartext_ones_do_not():
    def noop(_conn) -> None:
        return None

    tls = ConnectionCore(Origin("https", "127.0.0.1", 443), Timeouts(), noop)
    plain = ConnectionCore(Origin("http", "127.0.0.1", 80), Timeouts(), noop)
    assert type(tls._flow) is SerialWriteFlow
    assert type(plain._flow) is WriteFlow
