"""Fault cases for the trio Modbus master, against small fake devices on real ptys and sockets.

The fake devices answer function 3 (read holding registers) with
``fake_value(address)``, or misbehave as a test's plan says: stay silent,
answer late, send a corrupt CRC, an exception, half a frame, or hang up.
Replies are built with pymodbus's framers and PDU classes.

These tests do real I/O, so they run on the real clock with short timeouts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
)

from fieldbus.errors import (
    Disconnected,
    ExceptionReply,
    FieldbusError,
    FrameError,
    ModbusTimeout,
    PortConfigError,
)
from fieldbus.links import SerialLink, TcpLink
from fieldbus.master import ModbusMaster
from fieldbus.ports import RtuPort, TcpPort
from tests.ptypair import PtyPair

pytestmark = pytest.mark.slow

#: The master's request timeout in these tests.
T = 0.1


def fake_value(address: int) -> int:
    return (0x4000 + address) & 0xFFFF


def expected(address: int, count: int) -> list[int]:
    return [fake_value(a) for a in range(address, address + count)]


@dataclass(frozen=True)
class Act:
    """What the fake device does with one request.

    kind: ``reply``; ``silent`` (no answer); ``corrupt`` (CRC / last byte
    flipped); ``exception`` (exception reply ``code``); ``close`` (hang up:
    TCP close, or the pty's device end closed). ``delay`` is waited before
    answering; ``data``, if given, is sent instead of the reply; with a
    ``gap``, the first ``split`` bytes go out, then the rest ``gap`` s later.
    """

    kind: str = "reply"
    delay: float = 0.0
    code: int = 2
    split: int = 4
    gap: float = 0.0
    data: bytes = b""


@dataclass
class Seen:
    unit: int
    tid: int
    address: int
    count: int
    at: float


@dataclass
class FakeDevice:
    """Answers requests one at a time, like a real device, following ``plan``."""

    rtu: bool
    plan: list[Act] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    #: When each reply's last byte was handed to the OS.
    replied_at: list[float] = field(default_factory=list)

    def _framer(self) -> FramerBase:
        decoder = DecodePDU(is_server=True)
        return FramerRTU(decoder) if self.rtu else FramerSocket(decoder)

    def next_act(self) -> Act:
        index = len(self.seen) - 1
        return self.plan[index] if index < len(self.plan) else Act()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve requests from ``stream`` until the peer hangs up or an Act says close."""
        framer = self._framer()
        buffer = b""
        while True:
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buffer += data
            while buffer:
                used, request = framer.handleFrame(buffer, 0, 0)
                if not used:
                    break
                buffer = buffer[used:]
                if request is None:
                    continue
                assert isinstance(request, ReadHoldingRegistersRequest)
                self.seen.append(
                    Seen(
                        request.dev_id,
                        request.transaction_id,
                        request.address,
                        request.count,
                        trio.current_time(),
                    )
                )
                if not await self._act(stream, framer, request, self.next_act()):
                    return

    async def _act(
        self, stream: trio.abc.Stream, framer: FramerBase, request: ModbusPDU, act: Act
    ) -> bool:
        if act.delay:
            await trio.sleep(act.delay)
        if act.kind == "close":
            return False
        if act.kind == "silent":
            return True
        reply: ModbusPDU
        if act.kind == "exception":
            reply = ExceptionResponse(
                request.function_code, act.code, request.dev_id, request.transaction_id
            )
        else:
            reply = ReadHoldingRegistersResponse(
                dev_id=request.dev_id,
                transaction_id=request.transaction_id,
                registers=expected(request.address, request.count),
            )
        frame = act.data or framer.buildFrame(reply)
        if act.kind == "corrupt":
            frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
        try:
            if act.gap:
                await stream.send_all(frame[: act.split])
                await trio.sleep(act.gap)
                frame = frame[act.split :]
            await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self.replied_at.append(trio.current_time())
        return True


# -- fixtures: an RTU device on a pty, a TCP device on a listener --------------------


@asynccontextmanager
async def rtu_device(pair: PtyPair, device: FakeDevice) -> AsyncIterator[FakeDevice]:
    """Run ``device`` on the device end of ``pair``; an Act("close") hangs the pty up."""

    async def run() -> None:
        stream = pair.device_stream()
        async with stream:
            await device.serve(stream)
        # The device is gone: close the pty's device end, as if unplugged.
        pair.close_master()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield device
        nursery.cancel_scope.cancel()


@pytest.fixture
def pty() -> Iterator[PtyPair]:
    with PtyPair() as pair:
        yield pair


def rtu_master(
    path: str, *, retries: int = 0, timeout: float = T, min_gap: float = 0.0
) -> ModbusMaster:
    return ModbusMaster(
        SerialLink(RtuPort(path, baud=19200)), timeout=timeout, retries=retries, min_gap=min_gap
    )


@dataclass
class TcpDevice:
    """A fake Modbus TCP device that can be stopped and started again on the same port."""

    device: FakeDevice
    port: int = 0
    connections: int = 0
    _scope: trio.CancelScope | None = None

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            await self.device.serve(stream)

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                # Handlers live in this nursery, so stop() also drops open connections.
                serve = partial(trio.serve_listeners, handler_nursery=nursery)
                await nursery.start(serve, self._handle, listeners)
                task_status.started()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


@asynccontextmanager
async def tcp_device(device: FakeDevice) -> AsyncIterator[tuple[TcpDevice, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        server = TcpDevice(device)
        await server.start(nursery)
        yield server, nursery
        nursery.cancel_scope.cancel()


def tcp_master(port: int, *, retries: int = 0, timeout: float = T) -> ModbusMaster:
    return ModbusMaster(TcpLink(TcpPort("127.0.0.1", port)), timeout=timeout, retries=retries)


# -- timeouts ----------------------------------------------------------------------


async def test_rtu_silent_device_times_out_after_retries(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act("silent")] * 10)
    async with rtu_device(pty, device), rtu_master(pty.path, retries=2) as bus:
        start = trio.current_time()
        with pytest.raises(ModbusTimeout) as info:
            await bus.read_holding_registers(1, 0, 2)
        elapsed = trio.current_time() - start
    assert "unit 1" in str(info.value)
    assert pty.path in str(info.value)
    assert bus.stats.timeouts == 3
    assert bus.stats.retries == 2
    assert bus.stats.requests == 3
    assert bus.stats.replies == 0
    # Three attempts really went out on the line, each given its full timeout.
    assert len(device.seen) == 3
    assert elapsed >= 3 * T


async def test_tcp_silent_device_times_out_after_retries() -> None:
    device = FakeDevice(rtu=False, plan=[Act("silent")] * 10)
    async with tcp_device(device) as (server, _), tcp_master(server.port, retries=1) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, 0, 2)
    assert bus.stats.timeouts == 2
    assert bus.stats.retries == 1
    assert len(device.seen) == 2
    # Each attempt carries a fresh transaction id.
    assert device.seen[0].tid != device.seen[1].tid


async def test_rtu_silent_then_back(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act("silent"), Act("silent")])
    async with rtu_device(pty, device), rtu_master(pty.path) as bus:
        for _ in range(2):
            with pytest.raises(ModbusTimeout):
                await bus.read_holding_registers(1, 0, 2)
        assert await bus.read_holding_registers(1, 30, 3) == expected(30, 3)
        assert await bus.read_holding_registers(1, 40, 1) == expected(40, 1)
    assert bus.stats.timeouts == 2
    assert bus.stats.replies == 2


async def test_rtu_one_silence_is_retried_transparently(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act("silent")])
    async with rtu_device(pty, device), rtu_master(pty.path, retries=2) as bus:
        assert await bus.read_holding_registers(1, 5, 4) == expected(5, 4)
    assert bus.stats.timeouts == 1
    assert bus.stats.retries == 1
    assert bus.stats.replies == 1


async def test_tcp_silent_then_back() -> None:
    device = FakeDevice(rtu=False, plan=[Act("silent")])
    async with tcp_device(device) as (server, _), tcp_master(server.port) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, 0, 2)
        assert await bus.read_holding_registers(1, 7, 2) == expected(7, 2)


# -- corrupt frames and exception replies -------------------------------------------


async def test_rtu_bad_crc_is_a_frame_error(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act("corrupt")])
    async with rtu_device(pty, device), rtu_master(pty.path, retries=0) as bus:
        with pytest.raises(FrameError, match="CRC"):
            await bus.read_holding_registers(1, 0, 4)
        assert bus.stats.frame_errors == 1
        assert bus.stats.replies == 0
        # The bus is usable at once.
        assert await bus.read_holding_registers(1, 0, 4) == expected(0, 4)


async def test_rtu_bad_crc_is_retried(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act("corrupt")])
    async with rtu_device(pty, device), rtu_master(pty.path, retries=1) as bus:
        assert await bus.read_holding_registers(1, 11, 2) == expected(11, 2)
    assert bus.stats.frame_errors == 1
    assert bus.stats.retries == 1
    assert len(device.seen) == 2


@pytest.mark.parametrize("rtu", [True, False])
async def test_exception_reply_is_raised_not_retried(pty: PtyPair, rtu: bool) -> None:
    device = FakeDevice(rtu=rtu, plan=[Act("exception", code=4), Act("exception", code=2)])

    async def check(bus: ModbusMaster) -> None:
        with pytest.raises(ExceptionReply) as info:
            await bus.read_holding_registers(1, 0, 1)
        assert (info.value.function_code, info.value.code) == (3, 4)
        assert info.value.name == "SERVER DEVICE FAILURE"
        with pytest.raises(ExceptionReply) as info:
            await bus.read_holding_registers(1, 0, 1)
        assert info.value.code == 2
        assert await bus.read_holding_registers(1, 0, 1) == expected(0, 1)
        assert bus.stats.exception_replies == 2
        assert bus.stats.retries == 0
        assert len(device.seen) == 3

    # A generous reply timeout: nothing here is about timing, and a reply late
    # on a loaded machine (0.1 s) would be retried and hide what is checked.
    if rtu:
        async with rtu_device(pty, device), rtu_master(pty.path, retries=3, timeout=2.0) as bus:
            await check(bus)
    else:
        async with (
            tcp_device(device) as (server, _),
            tcp_master(server.port, retries=3, timeout=2.0) as bus,
        ):
            await check(bus)


async def test_tcp_garbage_header_is_a_frame_error_and_resyncs() -> None:
    # A reply that is not MBAP (protocol id 0x1234), its tail arriving after the error.
    junk = bytes.fromhex("0001 1234 0006 01 03 04 00 01 00 02") + bytes(range(40))
    device = FakeDevice(rtu=False, plan=[Act(data=junk, split=8, gap=0.05)])
    async with tcp_device(device) as (server, _), tcp_master(server.port) as bus:
        with pytest.raises(FrameError, match="MBAP"):
            await bus.read_holding_registers(1, 0, 2)
        # Frame sync is lost on that connection; the next request must not trip on the rest.
        assert await bus.read_holding_registers(1, 20, 2) == expected(20, 2)
        assert await bus.read_holding_registers(1, 30, 2) == expected(30, 2)


# -- stale replies -----------------------------------------------------------------
#
# Request A is aborted (timeout or cancellation) and its reply comes late; the
# next request B (same unit, function and count, another address) must get
# B's registers, never A's.

A_ADDRESS, B_ADDRESS, C_ADDRESS, COUNT = 10, 20, 30, 2


async def test_tcp_late_reply_is_told_apart_by_transaction_id() -> None:
    # The device answers A after the master gave up, then answers B.
    device = FakeDevice(rtu=False, plan=[Act(delay=T + 0.05)])
    async with tcp_device(device) as (server, _), tcp_master(server.port) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, C_ADDRESS, COUNT) == expected(C_ADDRESS, COUNT)
    assert bus.stats.stale_discarded == 1
    assert server.connections == 1


async def test_tcp_half_read_late_reply_reconnects() -> None:
    # Half of A's reply is read before the timeout: frame sync on that connection
    # is lost, so B must go out on a fresh one and get its own answer.
    device = FakeDevice(rtu=False, plan=[Act(split=5, gap=T + 0.05)])
    async with tcp_device(device) as (server, _), tcp_master(server.port) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
    assert server.connections == 2


async def test_tcp_cancelled_request_then_next_request() -> None:
    device = FakeDevice(rtu=False, plan=[Act(delay=0.1)])
    async with tcp_device(device) as (server, _), tcp_master(server.port, timeout=1.0) as bus:
        with trio.move_on_after(0.03) as scope:
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert scope.cancelled_caught
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
    assert bus.stats.stale_discarded == 1


async def test_rtu_late_reply_already_buffered_is_discarded(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True, plan=[Act(delay=T + 0.03)])
    async with rtu_device(pty, device), rtu_master(pty.path) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        # A's reply arrives and waits in the driver's buffer.
        await trio.sleep(0.1)
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, C_ADDRESS, COUNT) == expected(C_ADDRESS, COUNT)


async def test_rtu_late_reply_during_settle_is_discarded(pty: PtyPair) -> None:
    # A slow device (min_gap 50 ms, so the line must be quiet 200 ms) answers A
    # 80 ms after the timeout, while B is already waiting for the line.
    device = FakeDevice(rtu=True, plan=[Act(delay=T + 0.08)])
    async with rtu_device(pty, device), rtu_master(pty.path, min_gap=0.05) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
    assert bus.stats.stale_discarded >= 1
    # B went out only after A's late reply had been sent (and thrown away).
    assert device.seen[1].at >= device.replied_at[0]


async def test_rtu_reply_split_across_the_timeout(pty: PtyPair) -> None:
    # The first 4 bytes of A's reply arrive in time, the rest after the timeout
    # (and within the 200 ms of quiet a 50 ms min_gap asks for).
    device = FakeDevice(rtu=True, plan=[Act(split=4, gap=T + 0.08)])
    async with rtu_device(pty, device), rtu_master(pty.path, min_gap=0.05) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
        assert await bus.read_holding_registers(1, C_ADDRESS, COUNT) == expected(C_ADDRESS, COUNT)
    assert bus.stats.frame_errors == 0


async def test_rtu_cancelled_request_finishes_its_exchange_then_next_request(
    pty: PtyPair,
) -> None:
    # A is cancelled while on the wire; the device answers it well within A's
    # timeout. The exchange is finished, not aborted (an aborted one would leave
    # the line dirty and the next request waiting out A's whole timeout), so A
    # gets its answer and B goes straight after, without a settle.
    device = FakeDevice(rtu=True, plan=[Act(delay=0.1)])
    async with rtu_device(pty, device), rtu_master(pty.path, timeout=1.0) as bus:
        with trio.move_on_after(0.03) as scope:
            got = await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        assert scope.cancel_called
        assert got == expected(A_ADDRESS, COUNT)
        started = trio.current_time()
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)
        # No wait for A's 1 s timeout to run out.
        assert trio.current_time() - started < 0.5
        assert bus.stats.stale_discarded == 0
    assert device.seen[1].at >= device.replied_at[0]


async def test_rtu_cancelled_request_with_its_own_longer_timeout(pty: PtyPair) -> None:
    # A carries a per-request timeout longer than the bus default; cancelled, it
    # still finishes within its own timeout, not the default.
    device = FakeDevice(rtu=True, plan=[Act(delay=0.2)])
    async with rtu_device(pty, device), rtu_master(pty.path, timeout=T) as bus:
        request = ReadHoldingRegistersRequest(address=A_ADDRESS, count=COUNT)
        with trio.move_on_after(0.03) as scope:
            await bus.execute(1, request, reply_timeout=0.4)
        assert scope.cancel_called
        assert await bus.read_holding_registers(1, B_ADDRESS, COUNT) == expected(B_ADDRESS, COUNT)


async def test_rtu_request_cancelled_while_settling(pty: PtyPair) -> None:
    # A's reply is corrupt (the line is dirty: more may follow within A's
    # timeout); B is cancelled while it waits for that to pass; C must still
    # not take anything of A's for its own.
    device = FakeDevice(rtu=True, plan=[Act(kind="corrupt")])
    async with rtu_device(pty, device), rtu_master(pty.path, timeout=1.0) as bus:
        with pytest.raises(FrameError):
            await bus.read_holding_registers(1, A_ADDRESS, COUNT)
        with trio.move_on_after(0.03) as scope:
            await bus.read_holding_registers(1, B_ADDRESS, COUNT)
        assert scope.cancelled_caught
        assert await bus.read_holding_registers(1, C_ADDRESS, COUNT) == expected(C_ADDRESS, COUNT)
    # B never reached the line.
    assert [seen.address for seen in device.seen] == [A_ADDRESS, C_ADDRESS]


# -- dropped and refused TCP connections ------------------------------------------


async def test_tcp_connection_dropped_mid_request() -> None:
    device = FakeDevice(rtu=False, plan=[Act(), Act("close")])
    async with tcp_device(device) as (server, _), tcp_master(server.port, timeout=1.0) as bus:
        assert await bus.read_holding_registers(1, 0, 2) == expected(0, 2)
        start = trio.current_time()
        with pytest.raises(Disconnected) as info:
            await bus.read_holding_registers(1, 2, 2)
        # Reported at once, not after the timeout.
        assert trio.current_time() - start < 0.5
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert bus.stats.disconnects == 1
        # The next request reconnects.
        assert await bus.read_holding_registers(1, 4, 2) == expected(4, 2)
    assert server.connections == 2


async def test_tcp_connection_dropped_is_retried_transparently() -> None:
    device = FakeDevice(rtu=False, plan=[Act("close")])
    async with tcp_device(device) as (server, _), tcp_master(server.port, retries=1) as bus:
        assert await bus.read_holding_registers(1, 6, 3) == expected(6, 3)
    assert bus.stats.disconnects == 1
    assert bus.stats.retries == 1
    assert server.connections == 2


async def test_tcp_connection_closed_while_idle() -> None:
    device = FakeDevice(rtu=False)
    async with tcp_device(device) as (server, nursery), tcp_master(server.port) as bus:
        assert await bus.read_holding_registers(1, 0, 1) == expected(0, 1)
        # The device restarts: its connections drop, and it listens again at once.
        server.stop()
        await server.start(nursery)
        await trio.sleep(0.02)
        with pytest.raises(Disconnected):
            await bus.read_holding_registers(1, 1, 1)
        assert await bus.read_holding_registers(1, 2, 1) == expected(2, 1)


async def test_tcp_server_gone_then_back() -> None:
    device = FakeDevice(rtu=False)
    async with tcp_device(device) as (server, nursery), tcp_master(server.port, retries=1) as bus:
        assert await bus.read_holding_registers(1, 0, 1) == expected(0, 1)
        server.stop()
        await trio.sleep(0.02)
        with pytest.raises(Disconnected) as info:
            await bus.read_holding_registers(1, 1, 1)
        assert "cannot connect" in str(info.value)
        await server.start(nursery)
        assert await bus.read_holding_registers(1, 2, 1) == expected(2, 1)


async def test_tcp_connection_refused() -> None:
    # A port that was just free: nothing listens there.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    async with tcp_master(port, retries=2) as bus:
        with pytest.raises(Disconnected) as info:
            await bus.read_holding_registers(1, 0, 1)
    assert str(info.value).startswith(f"tcp://127.0.0.1:{port}: cannot connect")
    assert bus.stats.disconnects == 3
    assert bus.stats.retries == 2
    # Nothing was sent, so nothing counts as a request.
    assert bus.stats.requests == 0


# -- serial port that vanishes; misconfigured ports ---------------------------------


async def test_serial_port_vanishes_mid_request_then_comes_back(tmp_path: Path) -> None:
    # The configured path is a symlink, like /dev/serial/by-id/...: unplugging
    # removes it, plugging back makes it point at the new tty.
    link = tmp_path / "ttyRS485"
    first = PtyPair()
    second = PtyPair()
    try:
        link.symlink_to(first.path)
        device = FakeDevice(rtu=True, plan=[Act(), Act("close")])
        async with rtu_master(str(link), timeout=1.0) as bus:
            async with rtu_device(first, device):
                assert await bus.read_holding_registers(1, 0, 2) == expected(0, 2)
                start = trio.current_time()
                with pytest.raises(Disconnected) as info:
                    await bus.read_holding_registers(1, 2, 2)
                # A hang-up is reported at once, not as a timeout.
                assert trio.current_time() - start < 0.5
                assert str(link) in str(info.value)
                link.unlink()
            assert bus.stats.disconnects == 1
            assert not bus.link.is_open
            # While it is gone, every request says so.
            with pytest.raises(Disconnected, match="cannot open serial port"):
                await bus.read_holding_registers(1, 4, 2)
            # Plugged back in.
            link.symlink_to(second.path)
            async with rtu_device(second, FakeDevice(rtu=True)):
                assert await bus.read_holding_registers(1, 4, 2) == expected(4, 2)
    finally:
        first.close()
        second.close()


async def test_serial_port_vanishes_while_idle(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True)
    async with rtu_master(pty.path, timeout=1.0, retries=1) as bus:
        async with rtu_device(pty, device):
            assert await bus.read_holding_registers(1, 0, 2) == expected(0, 2)
        pty.close_master()
        start = trio.current_time()
        with pytest.raises(Disconnected):
            await bus.read_holding_registers(1, 0, 2)
        assert trio.current_time() - start < 0.5


async def test_missing_serial_device_is_disconnected_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "ttyUSB9"
    async with rtu_master(str(path), retries=1) as bus:
        with pytest.raises(Disconnected) as info:
            await bus.read_holding_registers(1, 0, 1)
    message = str(info.value)
    assert str(path) in message
    assert "ENOENT" in message or "No such file" in message
    assert bus.stats.requests == 0
    assert bus.stats.disconnects == 2


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"baud": -9600}, "-9600"),
        ({"parity": "X"}, "X"),
        ({"stopbits": 3}, "3"),
    ],
)
async def test_invalid_serial_settings_are_a_config_error(
    pty: PtyPair, settings: dict[str, int | str], names: str
) -> None:
    port = RtuPort(pty.path, **settings)  # type: ignore[arg-type]
    async with ModbusMaster(SerialLink(port), timeout=T, retries=3) as bus:
        with pytest.raises(PortConfigError) as info:
            await bus.read_holding_registers(1, 0, 1)
    assert names in str(info.value)
    assert pty.path in str(info.value)
    # A configuration error is not retried.
    assert bus.stats.retries == 0


async def test_serial_port_is_opened_exclusively(pty: PtyPair) -> None:
    device = FakeDevice(rtu=True)
    async with rtu_device(pty, device), rtu_master(pty.path) as first:
        assert await first.read_holding_registers(1, 0, 1) == expected(0, 1)
        async with rtu_master(pty.path) as second:
            with pytest.raises(Disconnected, match="cannot open serial port"):
                await second.read_holding_registers(1, 0, 1)
        assert await first.read_holding_registers(1, 1, 1) == expected(1, 1)


def test_master_refuses_bad_timing_settings() -> None:
    link = TcpLink(TcpPort("127.0.0.1", 502))
    with pytest.raises(ValueError, match="timeout must be positive, not 0"):
        ModbusMaster(link, timeout=0)
    with pytest.raises(ValueError, match="retries must be >= 0, not -1"):
        ModbusMaster(link, retries=-1)


# -- line discipline ----------------------------------------------------------------


async def test_rtu_silence_between_frames(pty: PtyPair) -> None:
    # Every request waits at least the bus's gap after the previous reply.
    device = FakeDevice(rtu=True)
    gap = 0.03
    async with rtu_device(pty, device), rtu_master(pty.path, min_gap=gap) as bus:
        for address in range(5):
            assert await bus.read_holding_registers(1, address, 1) == expected(address, 1)
    for reply_at, next_seen in zip(device.replied_at, device.seen[1:], strict=False):
        assert next_seen.at - reply_at >= gap


async def test_rtu_noise_on_the_idle_line_is_discarded(pty: PtyPair) -> None:
    # After a good reply, the line picks up noise that looks like the start of
    # a frame (unit 1, function 3, byte count 4); the next request must not
    # read it as the head of its reply.
    reply = FramerRTU(DecodePDU(is_server=True)).buildFrame(
        ReadHoldingRegistersResponse(dev_id=1, registers=expected(0, 1))
    )
    noise = bytes.fromhex("01 03 04 ff")
    device = FakeDevice(rtu=True, plan=[Act(data=reply + noise, split=len(reply), gap=0.01)])
    async with rtu_device(pty, device), rtu_master(pty.path) as bus:
        assert await bus.read_holding_registers(1, 0, 1) == expected(0, 1)
        await trio.sleep(0.05)
        assert await bus.read_holding_registers(1, 8, 2) == expected(8, 2)
    assert bus.stats.frame_errors == 0


async def test_reply_from_another_unit_is_not_taken(pty: PtyPair) -> None:
    # A misaddressed device (unit 2 answers a request to unit 1): not our reply.
    wrong = FramerRTU(DecodePDU(is_server=True)).buildFrame(
        ReadHoldingRegistersResponse(dev_id=2, registers=expected(0, 1))
    )
    device = FakeDevice(rtu=True, plan=[Act(data=wrong)])
    async with rtu_device(pty, device), rtu_master(pty.path) as bus:
        with pytest.raises(ModbusTimeout):
            await bus.read_holding_registers(1, 0, 1)
        assert bus.stats.stale_discarded == 1
        assert await bus.read_holding_registers(1, 0, 1) == expected(0, 1)


async def test_short_reply_is_a_frame_error(pty: PtyPair) -> None:
    # A well-framed reply with one register where two were asked for.
    short = FramerRTU(DecodePDU(is_server=True)).buildFrame(
        ReadHoldingRegistersResponse(dev_id=1, registers=expected(0, 1))
    )
    device = FakeDevice(rtu=True, plan=[Act(data=short)])
    async with rtu_device(pty, device), rtu_master(pty.path) as bus:
        with pytest.raises(FrameError, match="asked for 2 registers, got 1"):
            await bus.read_holding_registers(1, 0, 2)
        assert await bus.read_holding_registers(1, 0, 2) == expected(0, 2)


def test_errors_are_fieldbus_errors() -> None:
    for error in (Disconnected, ExceptionReply, FrameError, ModbusTimeout, PortConfigError):
        assert issubclass(error, FieldbusError)
