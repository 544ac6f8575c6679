"""Line timing: the RTU t3.5 silence and per-unit gaps, measured at a real server."""

from __future__ import annotations

import itertools
import os
import tty
from functools import partial
from itertools import pairwise

import pytest
import trio

from fieldbus.master import ModbusMaster
from fieldbus.ports import RtuPort, TcpPort
from fieldbus.registers import Table
from fieldbus.server import ModbusServer, SparseStore


def store() -> SparseStore:
    s = SparseStore({Table.HOLDING: [range(0, 10)]}, writable={Table.HOLDING: [range(0, 10)]})
    s.put(Table.HOLDING, 0, list(range(10)))
    return s


class Timeline:
    def __init__(self) -> None:
        self.requests: list[tuple[int, float]] = []
        self.replies: list[tuple[int, float]] = []

    def server(self) -> ModbusServer:
        return ModbusServer(
            {1: store(), 2: store()},
            on_request=lambda unit, _: self.requests.append((unit, trio.current_time())),
            on_reply=lambda unit: self.replies.append((unit, trio.current_time())),
        )


@pytest.mark.parametrize("baud", [9600, 19200, 115200])
async def test_rtu_keeps_t35_silence_after_every_reply(baud: int) -> None:
    timeline = Timeline()
    server = timeline.server()
    master_fd, slave_fd = os.openpty()
    tty.setraw(master_fd)
    tty.setraw(slave_fd)
    port = RtuPort(os.ttyname(slave_fd), baud=baud)
    try:
        async with trio.open_nursery() as nursery:
            stream = trio.lowlevel.FdStream(os.dup(master_fd))
            nursery.start_soon(partial(server.serve_stream, stream, rtu=True))
            async with ModbusMaster.for_port(port) as master:
                for i in range(20):
                    await master.read_holding_registers(1 + i % 2, 0, 4)
            nursery.cancel_scope.cancel()
    finally:
        os.close(master_fd)
        os.close(slave_fd)
    assert len(timeline.requests) == 20
    silences = [
        request_t - reply_t
        for (_, reply_t), (_, request_t) in zip(
            timeline.replies, timeline.requests[1:], strict=False
        )
    ]
    # t3.5: 3.5 characters of 10 bits at 9600 and 19200 baud; 1.75 ms above
    # 19200 (Modbus over Serial Line V1.02, 2.5.1.1).
    expected = port.frame_gap
    assert expected == pytest.approx(
        {9600: 3.5 * 10 / 9600, 19200: 3.5 * 10 / 19200, 115200: 0.00175}[baud]
    )
    assert min(silences) >= expected


async def test_a_slow_units_gap_holds_back_only_that_unit() -> None:
    timeline = Timeline()
    server = timeline.server()
    done: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        async with ModbusMaster.for_port(TcpPort("127.0.0.1", port)) as master:
            master.set_unit_gap(1, 0.1)
            start = trio.current_time()

            async def poll(unit: int, times: int) -> None:
                for _ in range(times):
                    await master.read_holding_registers(unit, 0, 2)
                done[unit] = trio.current_time() - start

            async with trio.open_nursery() as pollers:
                pollers.start_soon(poll, 1, 3)
                pollers.start_soon(poll, 2, 20)
        nursery.cancel_scope.cancel()
    times = [t for unit, t in timeline.requests if unit == 1]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.1
    assert done[1] >= 0.2
    # Unit 2 shares the connection but is never made to wait for unit 1's gap.
    assert done[2] < 0.1
    with pytest.raises(ValueError, match="-1"):
        ModbusMaster.for_port("tcp://127.0.0.1:1").set_unit_gap(1, -1)


async def test_a_write_goes_before_reads_waiting_for_the_same_units_gap() -> None:
    timeline = Timeline()
    server = timeline.server()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        async with ModbusMaster.for_port(TcpPort("127.0.0.1", port)) as master:
            master.set_unit_gap(1, 0.1)

            async def poller() -> None:
                while True:
                    await master.read_holding_registers(1, 0, 2)

            for _ in range(6):
                nursery.start_soon(poller)
            await trio.sleep(0.35)
            asked = trio.current_time()
            await master.write_register(1, 0, 7)
            waited = trio.current_time() - asked
            nursery.cancel_scope.cancel()
    # At most one gap (plus the exchange), however many readers were queued.
    assert waited < 0.1 + 0.05
    times = [t for unit, t in timeline.requests if unit == 1]
    assert min(b - a for a, b in pairwise(times)) >= 0.1
