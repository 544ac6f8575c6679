"""The in-memory link against the real master and server, with exact virtual times."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

from fieldbus.errors import Disconnected, ModbusTimeout
from fieldbus.master import ModbusMaster
from fieldbus.memory import MemoryLink, WireTiming, pdu_sizes
from fieldbus.ports import PortSpec, RtuPort, TcpPort
from fieldbus.registers import Table
from fieldbus.server import ModbusServer, SparseStore

RTU = RtuPort("/dev/ttyMEM0", baud=9600)
TCP = TcpPort("device.invalid", 502)


def store() -> SparseStore:
    s = SparseStore({Table.HOLDING: [range(0, 125)]}, writable={Table.HOLDING: [range(0, 125)]})
    s.put(Table.HOLDING, 0, list(range(100, 225)))
    return s


@dataclass
class Device:
    """A served unit 1 that logs when each request arrives; ``silent`` stops its replies."""

    silent: bool = False
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    server: ModbusServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = ModbusServer(
            {1: store()}, responding=lambda unit: not self.silent, on_request=self.on_request
        )

    def on_request(self, unit: int, request: ModbusPDU) -> None:
        self.arrivals.append((trio.current_time(), request.function_code))


@asynccontextmanager
async def bus(
    port: PortSpec,
    *,
    timing: WireTiming | None = None,
    reply_timeout: float = 0.5,
    retries: int = 0,
) -> AsyncIterator[tuple[ModbusMaster, MemoryLink, Device]]:
    device = Device()
    async with trio.open_nursery() as nursery:
        link = MemoryLink(port, device.server, nursery, timing=timing)
        async with ModbusMaster(link, timeout=reply_timeout, retries=retries) as master:
            yield master, link, device
        nursery.cancel_scope.cancel()


def rtu_read_time(port: RtuPort, count: int, turnaround: float = 0.002) -> float:
    request, reply = pdu_sizes(3, count)
    return (request + 3) * port.char_time + turnaround + (reply + 3) * port.char_time


async def test_timing_defaults_follow_the_port() -> None:
    rtu = WireTiming.for_port(RTU)
    assert rtu.char_time == 10 / 9600
    assert (rtu.turnaround, rtu.latency, rtu.connect, rtu.overhead) == (0.002, 0.0, 0.0, 3)
    even = WireTiming.for_port(RtuPort("/dev/x", baud=19200, parity="E"))
    assert even.char_time == 11 / 19200
    tcp = WireTiming.for_port(TCP)
    assert (tcp.char_time, tcp.latency, tcp.turnaround, tcp.connect) == (0.0, 0.0002, 0.0, 0.0004)
    # MAP V1.1b3 section 6: read 4 registers is 5 bytes out, 2 + 8 back.
    assert pdu_sizes(3, 4) == (5, 10)
    assert pdu_sizes(1, 9) == (5, 4)
    assert pdu_sizes(16, 1) == (8, 5)
    assert pdu_sizes(5) == pdu_sizes(6) == (5, 5)
    with pytest.raises(ValueError, match="function 23"):
        pdu_sizes(23)


@pytest.mark.parametrize("count", [1, 8, 125])
async def test_rtu_read_takes_exactly_silence_wire_and_turnaround(
    autojump_clock: trio.testing.MockClock, count: int
) -> None:
    c = RTU.char_time
    async with bus(RTU) as (master, link, device):
        t0 = trio.current_time()
        values = await master.read_holding_registers(1, 0, count)
        first = trio.current_time() - t0
        assert values == list(range(100, 100 + count))
        # The first request needs no silence before it (nothing was on the line).
        assert first == pytest.approx(rtu_read_time(RTU, count), abs=1e-9)
        # The request's last byte reaches the device after 8 characters.
        assert device.arrivals[0][0] - t0 == pytest.approx(8 * c, abs=1e-9)
        t1 = trio.current_time()
        await master.read_holding_registers(1, 0, count)
        second = trio.current_time() - t1
        # t3.5 (3.5 x 10 bits / 9600 baud) + request wire + 2 ms + reply wire.
        expected = RTU.frame_gap + (8 + 5 + 2 * count) * c + 0.002
        assert second == pytest.approx(expected, abs=1e-9)
        assert link.timing.exchange_time(*pdu_sizes(3, count)) == pytest.approx(
            rtu_read_time(RTU, count), abs=1e-12
        )


async def test_rtu_write_and_parity_timing(autojump_clock: trio.testing.MockClock) -> None:
    port = RtuPort("/dev/ttyMEM1", baud=19200, parity="E", stopbits=1)
    c = 11 / 19200
    timing = WireTiming.for_port(port, turnaround=0.005)
    async with bus(port, timing=timing) as (master, _, device):
        t0 = trio.current_time()
        await master.write_register(1, 3, 77)  # function 06: 8 bytes each way
        assert trio.current_time() - t0 == pytest.approx(8 * c + 0.005 + 8 * c, abs=1e-9)
        t1 = trio.current_time()
        await master.write_registers(1, 3, [1, 2])  # function 16: 13 bytes out, 8 back
        assert trio.current_time() - t1 == pytest.approx(
            port.frame_gap + 13 * c + 0.005 + 8 * c, abs=1e-9
        )
        assert [code for _, code in device.arrivals] == [6, 16]
        assert await master.read_holding_registers(1, 3, 2) == [1, 2]


async def test_tcp_connect_and_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    timing = WireTiming.for_port(TCP, latency=0.001, turnaround=0.003)
    async with bus(TCP, timing=timing) as (master, link, device):
        t0 = trio.current_time()
        await master.read_holding_registers(1, 0, 4)
        # The handshake (one round trip), then latency + turnaround + latency.
        assert trio.current_time() - t0 == pytest.approx(0.002 + 0.001 + 0.003 + 0.001, abs=1e-9)
        assert device.arrivals[0][0] - t0 == pytest.approx(0.003, abs=1e-9)
        t1 = trio.current_time()
        await master.read_holding_registers(1, 0, 125)
        assert trio.current_time() - t1 == pytest.approx(0.005, abs=1e-9)
        assert link.opens == 1
        assert link.has_transaction_ids
        assert link.frame_gap == 0.0


async def test_tcp_default_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    async with bus(TCP) as (master, _, _device):
        await master.read_holding_registers(1, 0, 1)
        t0 = trio.current_time()
        await master.read_holding_registers(1, 0, 1)
        assert trio.current_time() - t0 == pytest.approx(2 * 0.0002, abs=1e-12)


async def test_slow_replies(autojump_clock: trio.testing.MockClock) -> None:
    async with bus(TCP) as (master, link, _):
        await master.read_holding_registers(1, 0, 1)
        link.reply_delay = 0.25
        t0 = trio.current_time()
        await master.read_holding_registers(1, 0, 1)
        assert trio.current_time() - t0 == pytest.approx(0.0004 + 0.25, abs=1e-9)
        link.reply_delay = 0.6
        with pytest.raises(ModbusTimeout):
            await master.read_holding_registers(1, 0, 1)


async def test_a_frame_waits_for_the_line(autojump_clock: trio.testing.MockClock) -> None:
    """Two frames sent back to back: the second's bytes follow the first's."""
    c = RTU.char_time
    async with bus(RTU) as (_, link, device):
        await link.open()
        framer = FramerRTU(DecodePDU(is_server=False))
        frame = framer.buildFrame(ReadHoldingRegistersRequest(address=0, count=2, dev_id=1))
        t0 = trio.current_time()
        await link.send(frame)
        await link.send(frame)
        got = b""
        while len(got) < 2 * 9:
            got += await link.receive()
        assert [t - t0 for t, _ in device.arrivals] == [
            pytest.approx(8 * c, abs=1e-9),
            pytest.approx(16 * c, abs=1e-9),
        ]
        # Replies (9 bytes each) start 2 ms after their request; the second
        # (ready at 16c + 2 ms) waits for the first to leave the line at
        # 8c + 2 ms + 9c, so it ends at 26c + 2 ms.
        assert trio.current_time() - t0 == pytest.approx(26 * c + 0.002, abs=1e-9)


async def test_silent_unit_times_out_on_the_virtual_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bus(RTU, reply_timeout=0.5) as (master, _, device):
        device.silent = True
        t0 = trio.current_time()
        with pytest.raises(ModbusTimeout):
            await master.read_holding_registers(1, 0, 2)
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=1e-9)
        device.silent = False
        assert await master.read_holding_registers(1, 0, 2) == [100, 101]


@pytest.mark.parametrize("port", [RTU, TCP], ids=["rtu", "tcp"])
async def test_refused_then_accepted(
    autojump_clock: trio.testing.MockClock, port: PortSpec
) -> None:
    async with bus(port) as (master, link, _):
        link.refuse = True
        t0 = trio.current_time()
        with pytest.raises(Disconnected, match=r"refused|No such file"):
            await link.open()
        assert trio.current_time() == t0
        assert not link.is_open
        with pytest.raises(Disconnected):
            await master.read_holding_registers(1, 0, 1)
        assert master.stats.disconnects >= 1
        link.refuse = False
        assert await master.read_holding_registers(1, 0, 1) == [100]
        assert link.opens == 1


async def test_unreachable_host_takes_the_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bus(TCP) as (master, link, _):
        link.unreachable = True
        t0 = trio.current_time()
        with pytest.raises(Disconnected, match="timed out after 3 s"):
            await link.open()
        assert trio.current_time() - t0 == pytest.approx(3.0, abs=1e-9)
        with pytest.raises(Disconnected):
            await master.read_holding_registers(1, 0, 1)
        link.unreachable = False
        assert await master.read_holding_registers(1, 0, 1) == [100]


async def test_a_connect_lost_while_unreachable_is_overtaken_by_a_fresh_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The device comes back while a connect is lost (its SYN dropped): the next
    staggered attempt, not the kernel's retransmission, gets the request through,
    within the request's own deadline."""
    async with bus(TCP, reply_timeout=0.5) as (master, link, device):
        link.unreachable = True
        t0 = trio.current_time()

        async def back() -> None:
            await trio.sleep(0.25)
            link.unreachable = False

        async with trio.open_nursery() as nursery:
            nursery.start_soon(back)
            assert await master.read_holding_registers(1, 0, 1) == [100]
        # Attempts at 0, 0.1, 0.2 are lost; the one at 0.3 connects.
        timing = link.timing
        arrived = device.arrivals[0][0] - t0
        assert arrived == pytest.approx(0.3 + timing.connect + timing.latency, abs=1e-9)
        assert link.opens == 1


@pytest.mark.parametrize("port", [RTU, TCP], ids=["rtu", "tcp"])
async def test_drop_between_requests_reconnects(
    autojump_clock: trio.testing.MockClock, port: PortSpec
) -> None:
    async with bus(port, retries=1) as (master, link, _):
        assert await master.read_holding_registers(1, 0, 1) == [100]
        link.drop()
        assert await master.read_holding_registers(1, 0, 3) == [100, 101, 102]
        assert link.opens == 2
        assert master.stats.disconnects == 1


@pytest.mark.parametrize("port", [RTU, TCP], ids=["rtu", "tcp"])
async def test_drop_with_a_reply_on_the_wire(
    autojump_clock: trio.testing.MockClock, port: PortSpec
) -> None:
    """The peer goes away while the reply is on its way: it is lost, the retry reconnects."""
    async with bus(port, retries=1) as (master, link, device):
        device.server.on_request = lambda unit, request: link.drop() if link.opens == 1 else None
        assert await master.read_holding_registers(1, 0, 2) == [100, 101]
        assert link.opens == 2
        assert master.stats.disconnects == 1
        assert master.stats.replies == 1


async def test_closing_the_link_ends_the_served_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served: list[str] = []
    server = Device().server

    class Spy:
        async def serve_stream(self, stream: trio.abc.Stream, *, rtu: bool) -> None:
            served.append("open")
            await server.serve_stream(stream, rtu=rtu)
            served.append("closed")

    async with trio.open_nursery() as nursery:
        link = MemoryLink(TCP, Spy(), nursery.start_soon)
        async with ModbusMaster(link) as master:
            await master.read_holding_registers(1, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert served == ["open", "closed"]
        assert not link.is_open
        with pytest.raises(Disconnected):
            await link.send(b"\x00")


async def test_rtu_discard_drops_only_what_has_arrived(
    autojump_clock: trio.testing.MockClock,
) -> None:
    framer = FramerRTU(DecodePDU(is_server=False))
    frame = framer.buildFrame(ReadHoldingRegistersRequest(address=0, count=1, dev_id=1))
    async with bus(RTU) as (_, link, _device):
        await link.open()
        await link.send(frame)
        await trio.sleep(0.1)  # the 7-byte reply is in
        link.discard_input()
        with trio.move_on_after(1.0) as scope:
            await link.receive()
        assert scope.cancelled_caught
        await link.send(frame)
        link.discard_input()  # nothing has arrived yet: the reply is still on the wire
        t0 = trio.current_time()
        reply = await link.receive()
        assert len(reply) == 7
        assert trio.current_time() - t0 == pytest.approx(15 * RTU.char_time + 0.002, abs=1e-9)
