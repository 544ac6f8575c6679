"""The master's waits on trio's real clock without a cancel scope per request.

On Modbus TCP the reply deadline is kept by a timer descriptor next to the
socket (``fieldbus.timer.ReadyOrDeadline``, ``TcpLink.exchange_by``); the RTU
silence is slept on one (``Timer.sleep_until``). These tests run on the real
clock, against the project's own Modbus server on real sockets and ptys, and
check what the cancel scope used to guarantee: a silent device times out at its
own deadline, never before, and never as late as an earlier, longer one; a
dead or closed connection is reported, not waited on; cancellation from
outside still works; and under a virtual clock the same requests keep exact
virtual times (the timer is not used there).
"""

from __future__ import annotations

import os
import socket
import tty
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
)

from fieldbus.errors import Disconnected, ModbusTimeout
from fieldbus.links import TcpLink
from fieldbus.master import ModbusMaster
from fieldbus.ports import RtuPort, TcpPort
from fieldbus.registers import Table
from fieldbus.server import ModbusServer, SparseStore
from fieldbus.timer import MAX_LEAD, ReadyOrDeadline, Timer, on_real_clock

#: Unit 1 answers, unit 2 is silent.
ANSWERING, SILENT = 1, 2


def store() -> SparseStore:
    s = SparseStore({Table.HOLDING: [range(0, 10)]})
    s.put(Table.HOLDING, 0, list(range(100, 110)))
    return s


def server() -> ModbusServer:
    return ModbusServer(
        {ANSWERING: store(), SILENT: store()}, responding=lambda unit: unit != SILENT
    )


@asynccontextmanager
async def tcp_master(**settings: float) -> AsyncIterator[ModbusMaster]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server().serve_tcp, "127.0.0.1", 0)
        master = ModbusMaster(TcpLink(TcpPort("127.0.0.1", port)), retries=0, **settings)
        async with master:
            yield master
        nursery.cancel_scope.cancel()


async def test_the_real_clock_is_told_apart_from_a_virtual_one() -> None:
    assert on_real_clock()
    async with tcp_master() as master:
        assert await master.read_holding_registers(ANSWERING, 0, 2) == [100, 101]
        # The path under test: a timer next to the socket.
        assert isinstance(master.link, TcpLink)
        assert master.link.waits_by_deadline


async def test_execute_still_takes_pymodbus_requests() -> None:
    # pymodbus stays out of the station; a caller that has it can still hand
    # the master its request PDUs and get pymodbus's decoding of the reply.
    async with tcp_master() as master:
        reply = await master.execute(ANSWERING, ReadHoldingRegistersRequest(address=1, count=3))
        assert isinstance(reply, ReadHoldingRegistersResponse)
        assert list(reply.registers) == [101, 102, 103]


async def test_a_silent_device_times_out_at_its_deadline_not_before() -> None:
    async with tcp_master(timeout=0.2) as master:
        start = trio.current_time()
        with pytest.raises(ModbusTimeout, match=r"no reply from unit 2 within 0\.2 s"):
            await master.read_holding_registers(SILENT, 0, 2)
        elapsed = trio.current_time() - start
        assert 0.2 <= elapsed < 0.2 + 0.5
        # The expired timer does not cut the next request short.
        assert await master.read_holding_registers(ANSWERING, 0, 3) == [100, 101, 102]
        assert master.stats.timeouts == 1
        assert master.stats.replies == 1


async def test_a_shorter_deadline_after_a_longer_one_is_kept() -> None:
    # The timer stays armed for the first request's deadline (now + 2 s) once
    # its reply is in; the silent unit's own 0.1 s must re-arm it earlier.
    async with tcp_master(timeout=2.0) as master:
        master.configure_unit(SILENT, timeout=0.1)
        assert await master.read_holding_registers(ANSWERING, 0, 1) == [100]
        start = trio.current_time()
        with pytest.raises(ModbusTimeout, match=r"within 0\.1 s"):
            await master.read_holding_registers(SILENT, 0, 1)
        elapsed = trio.current_time() - start
        assert 0.1 <= elapsed < 1.0


async def test_back_to_back_requests_share_one_arming_and_each_keeps_its_deadline() -> None:
    async with tcp_master(timeout=0.15) as master:
        for _ in range(200):
            assert await master.read_holding_registers(ANSWERING, 2, 2) == [102, 103]
        start = trio.current_time()
        with pytest.raises(ModbusTimeout):
            await master.read_holding_registers(SILENT, 0, 1)
        assert 0.15 <= trio.current_time() - start < 0.15 + 0.5


async def test_a_reply_in_two_pieces_is_put_together() -> None:
    async def device(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(12)
        # Transaction id of the request; unit 1; function 3; 2 registers.
        reply = request[:2] + bytes.fromhex("0000 0007 01 03 04 0001 0002")
        await stream.send_all(reply[:5])
        await trio.sleep(0.05)
        await stream.send_all(reply[5:])
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, device, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with ModbusMaster(TcpLink(TcpPort("127.0.0.1", port)), timeout=1.0) as master:
            assert await master.read_holding_registers(1, 0, 2) == [1, 2]
        nursery.cancel_scope.cancel()


async def test_closing_the_bus_wakes_a_request_waiting_for_its_reply() -> None:
    async with tcp_master(timeout=5.0) as master:
        assert await master.read_holding_registers(ANSWERING, 0, 1) == [100]
        outcome: list[BaseException] = []

        async def waiting() -> None:
            try:
                await master.read_holding_registers(SILENT, 0, 1)
            except Disconnected as exc:
                outcome.append(exc)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await trio.sleep(0.05)
            await master.link.aclose()
        assert trio.current_time() - start < 1.0
        assert len(outcome) == 1
        assert "closed" in str(outcome[0])


async def test_a_request_cancelled_from_outside_stops_waiting() -> None:
    async with tcp_master(timeout=5.0) as master:
        with trio.move_on_after(0.1) as scope:
            await master.read_holding_registers(SILENT, 0, 1)
        assert scope.cancelled_caught
        assert await master.read_holding_registers(ANSWERING, 0, 1) == [100]


async def test_a_virtual_clock_keeps_exact_times_on_a_real_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Under MockClock the timer (which counts real time) is not used: the
    # 5 s deadline passes in virtual time, at once and exactly.
    assert not on_real_clock()
    async with tcp_master(timeout=5.0) as master:
        assert await master.read_holding_registers(ANSWERING, 0, 1) == [100]
        start = trio.current_time()
        with pytest.raises(ModbusTimeout):
            await master.read_holding_registers(SILENT, 0, 1)
        assert trio.current_time() - start == pytest.approx(5.0)


# -- the timer itself -------------------------------------------------------------


def make_timer() -> Timer:
    timer = Timer.create()
    assert timer is not None, "Linux has timerfd"
    return timer


@pytest.mark.parametrize("exact", [False, True])
async def test_a_timed_sleep_never_ends_early(exact: bool) -> None:
    timer = make_timer()
    try:
        for i in range(30):
            deadline = trio.current_time() + 0.001 + i * 0.0001
            await timer.sleep_until(deadline, exact=exact)
            assert trio.current_time() >= deadline
        # The yielding at the end of an exact sleep stays bounded.
        assert 0.0 <= timer._lead <= MAX_LEAD
    finally:
        timer.close()


async def test_a_timed_sleep_is_cancellable_and_the_timer_usable_after() -> None:
    timer = make_timer()
    try:
        start = trio.current_time()
        with trio.move_on_after(0.02):
            await timer.sleep_until(start + 10.0)
        assert trio.current_time() - start < 1.0
        # Still armed for +10 s: a nearer deadline re-arms it.
        deadline = trio.current_time() + 0.01
        await timer.sleep_until(deadline)
        assert 0 <= trio.current_time() - deadline < 0.5
    finally:
        timer.close()


async def test_ready_or_deadline_wakes_on_data_and_on_the_deadline() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    ready = ReadyOrDeadline.create(a.fileno())
    assert ready is not None
    try:
        start = trio.current_time()
        assert await ready.wait(start + 0.1)  # the timer wakes it (a spurious wake-up)
        assert trio.current_time() >= start + 0.1
        assert not await ready.wait(start + 0.1)  # and the deadline has passed
        b.send(b"x")
        assert await ready.wait(trio.current_time() + 5.0)
        assert a.recv(10) == b"x"
        # Armed for +5 s now; a nearer deadline is kept.
        start = trio.current_time()
        assert await ready.wait(start + 0.05)
        assert 0.05 <= trio.current_time() - start < 1.0
    finally:
        ready.close()
        a.close()
        b.close()


async def test_rtu_silence_is_kept_from_the_reply_and_the_poll_does_not_spin() -> None:
    # Counted at the device: every request comes t3.5 or more after the last
    # reply went out. Counted in the scheduler: the poller takes a handful of
    # steps per request (the timer's wake-up, the reply's, a bounded yield
    # at the end of the silence), not the hundreds of the yield loop it
    # replaces (1 ms of checkpoints per request).
    replies: list[float] = []
    requests: list[float] = []
    srv = ModbusServer(
        {1: store()},
        on_request=lambda unit, _: requests.append(trio.current_time()),
        on_reply=lambda unit: replies.append(trio.current_time()),
    )
    device_fd, line_fd = os.openpty()
    tty.setraw(device_fd)
    tty.setraw(line_fd)
    port = RtuPort(os.ttyname(line_fd), baud=9600)

    class Steps(trio.abc.Instrument):
        def __init__(self, task: trio.lowlevel.Task) -> None:
            self.task = task
            self.count = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task is self.task:
                self.count += 1

    n = 40
    try:
        async with trio.open_nursery() as nursery:
            stream = trio.lowlevel.FdStream(os.dup(device_fd))
            nursery.start_soon(partial(srv.serve_stream, stream, rtu=True))
            async with ModbusMaster.for_port(port) as master:
                await master.read_holding_registers(1, 0, 2)
                steps = Steps(trio.lowlevel.current_task())
                trio.lowlevel.add_instrument(steps)
                for _ in range(n):
                    await master.read_holding_registers(1, 0, 2)
                trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()
    finally:
        os.close(device_fd)
        os.close(line_fd)
    silences = [req - rep for rep, req in zip(replies, requests[1:], strict=False)]
    assert len(silences) == n
    assert min(silences) >= port.frame_gap
    # How long one step of a yield loop takes here, now: the old loop took
    # 1 ms of them per request, the new one at most MAX_LEAD (0.3 ms).
    start = trio.current_time()
    for _ in range(200):
        await trio.lowlevel.checkpoint()
    step = (trio.current_time() - start) / 200
    assert steps.count / n < 10 + 1.5 * MAX_LEAD / step
