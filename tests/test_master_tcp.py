"""The trio Modbus master against pymodbus's own TCP server (a subprocess)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from fieldbus.errors import ExceptionReply
from fieldbus.master import ModbusMaster
from fieldbus.ports import TcpPort, parse_port
from tests.pymodbus_peer import (
    SIZE,
    Peer,
    coil_value,
    discrete_value,
    holding_value,
    input_value,
    running_peer,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    async with running_peer("tcp") as running:
        yield running


@pytest.fixture
async def master(peer: Peer) -> AsyncIterator[ModbusMaster]:
    # No retries: any lost or garbled exchange must show up as a failure.
    async with ModbusMaster.for_port(peer.url, timeout=2.0, retries=0) as bus:
        yield bus


async def test_read_input_registers(master: ModbusMaster) -> None:
    assert await master.read_input_registers(1, 0, 10) == [input_value(1, a) for a in range(10)]
    assert await master.read_input_registers(1, 37, 1) == [input_value(1, 37)]
    # The last registers of the block, and the largest read Modbus allows (125).
    assert await master.read_input_registers(1, SIZE - 3, 3) == [
        input_value(1, a) for a in range(SIZE - 3, SIZE)
    ]
    assert await master.read_input_registers(1, 50, 125) == [
        input_value(1, a) for a in range(50, 175)
    ]
    assert master.stats.requests == 4
    assert master.stats.replies == 4


async def test_read_holding_registers(master: ModbusMaster) -> None:
    assert await master.read_holding_registers(1, 0, 10) == [holding_value(1, a) for a in range(10)]
    assert await master.read_holding_registers(1, 120, 80) == [
        holding_value(1, a) for a in range(120, 200)
    ]


async def test_read_coils(master: ModbusMaster) -> None:
    # 13 bits: the reply carries 16; the master must trim to what was asked.
    assert await master.read_coils(1, 0, 13) == [coil_value(1, a) for a in range(13)]
    assert await master.read_coils(1, 5, 1) == [coil_value(1, 5)]
    assert await master.read_coils(1, 100, 100) == [coil_value(1, a) for a in range(100, 200)]


async def test_read_discrete_inputs(master: ModbusMaster) -> None:
    assert await master.read_discrete_inputs(1, 0, 20) == [discrete_value(1, a) for a in range(20)]
    assert await master.read_discrete_inputs(2, 3, 9) == [
        discrete_value(2, a) for a in range(3, 12)
    ]


async def test_write_register_and_read_back(master: ModbusMaster) -> None:
    await master.write_register(1, 10, 0xBEEF)
    assert await master.read_holding_registers(1, 9, 3) == [
        holding_value(1, 9),
        0xBEEF,
        holding_value(1, 11),
    ]
    # The other device on the same port is untouched.
    assert await master.read_holding_registers(2, 10, 1) == [holding_value(2, 10)]


async def test_write_registers_and_read_back(master: ModbusMaster) -> None:
    values = [0, 1, 0x7FFF, 0x8000, 0xFFFF]
    await master.write_registers(2, 40, values)
    assert await master.read_holding_registers(2, 39, 7) == [
        holding_value(2, 39),
        *values,
        holding_value(2, 45),
    ]
    assert await master.read_holding_registers(1, 40, 5) == [
        holding_value(1, a) for a in range(40, 45)
    ]


async def test_write_coil_and_read_back(master: ModbusMaster) -> None:
    address = 2  # coil_value(1, 2) is True
    assert await master.read_coils(1, address, 1) == [True]
    await master.write_coil(1, address, False)
    assert await master.read_coils(1, address, 1) == [False]
    await master.write_coil(1, address, True)
    assert await master.read_coils(1, address, 1) == [True]
    await master.write_coil(1, 3, True)
    assert await master.read_coils(1, 0, 6) == [
        coil_value(1, 0),
        coil_value(1, 1),
        True,
        True,
        coil_value(1, 4),
        coil_value(1, 5),
    ]


async def test_write_coils_and_read_back(master: ModbusMaster) -> None:
    values = [True, False, True, True, False, False, True, False, True, True, True]
    await master.write_coils(2, 60, values)
    assert await master.read_coils(2, 60, len(values)) == values
    assert await master.read_coils(2, 59, 1) == [coil_value(2, 59)]
    assert await master.read_coils(2, 60 + len(values), 1) == [coil_value(2, 60 + len(values))]
    assert await master.read_coils(1, 60, len(values)) == [
        coil_value(1, a) for a in range(60, 60 + len(values))
    ]


@pytest.mark.parametrize(
    ("address", "count"),
    [(SIZE, 1), (SIZE - 1, 2), (1000, 10)],
)
async def test_illegal_address_raises_exception_reply_and_bus_stays_usable(
    master: ModbusMaster, address: int, count: int
) -> None:
    with pytest.raises(ExceptionReply) as info:
        await master.read_holding_registers(1, address, count)
    assert info.value.code == 2
    assert info.value.function_code == 3
    assert info.value.name == "ILLEGAL DATA ADDRESS"
    assert "unit 1" in str(info.value)
    assert master.stats.exception_replies == 1
    # An exception reply is the device's answer: not retried, not a fault of the bus.
    assert master.stats.retries == 0
    assert master.stats.timeouts == 0
    assert master.stats.frame_errors == 0
    assert await master.read_holding_registers(1, 0, 2) == [
        holding_value(1, 0),
        holding_value(1, 1),
    ]


async def test_illegal_write_raises_exception_reply(master: ModbusMaster) -> None:
    with pytest.raises(ExceptionReply) as info:
        await master.write_register(2, 5000, 1)
    assert (info.value.function_code, info.value.code) == (6, 2)
    with pytest.raises(ExceptionReply) as info:
        await master.write_registers(2, SIZE - 1, [1, 2])
    assert (info.value.function_code, info.value.code) == (16, 2)
    # A refused write changes nothing.
    assert await master.read_holding_registers(2, SIZE - 1, 1) == [holding_value(2, SIZE - 1)]
    with pytest.raises(ExceptionReply) as info:
        await master.write_coils(2, 5000, [True, True])
    assert (info.value.function_code, info.value.code) == (15, 2)


async def test_exception_reply_is_not_retried(peer: Peer) -> None:
    async with ModbusMaster.for_port(peer.url, timeout=2.0, retries=3) as bus:
        with pytest.raises(ExceptionReply):
            await bus.read_input_registers(2, 4000, 1)
        assert bus.stats.requests == 1
        assert bus.stats.retries == 0


async def test_two_unit_ids_on_one_port(master: ModbusMaster) -> None:
    one = await master.read_holding_registers(1, 0, 5)
    two = await master.read_holding_registers(2, 0, 5)
    assert one == [holding_value(1, a) for a in range(5)]
    assert two == [holding_value(2, a) for a in range(5)]
    assert one != two
    assert await master.read_coils(2, 0, 9) == [coil_value(2, a) for a in range(9)]
    assert await master.read_coils(1, 0, 9) != await master.read_coils(2, 0, 9)


# -- concurrency ------------------------------------------------------------------


@dataclass
class InFlight:
    """Counts Modbus requests forwarded to the server but not yet answered."""

    now: int = 0
    peak: int = 0
    requests: int = 0


async def _pump(
    source: trio.SocketStream, sink: trio.SocketStream, flight: InFlight, requests: bool
) -> None:
    buffer = b""
    while data := await source.receive_some(4096):
        buffer += data
        # Count whole MBAP frames: 6-byte header, then "length" more bytes.
        while len(buffer) >= 6 and len(buffer) >= 6 + int.from_bytes(buffer[4:6], "big"):
            size = 6 + int.from_bytes(buffer[4:6], "big")
            frame, buffer = buffer[:size], buffer[size:]
            if requests:
                flight.requests += 1
                flight.now += 1
                flight.peak = max(flight.peak, flight.now)
            else:
                flight.now -= 1
            await sink.send_all(frame)
    await sink.send_eof()


async def _counting_proxy(
    target: TcpPort, flight: InFlight, *, task_status: trio.TaskStatus[int]
) -> None:
    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(target.host, target.port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, server, flight, True)
            nursery.start_soon(_pump, server, client, flight, False)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(port)


async def test_concurrent_tasks_each_get_their_own_answer_one_in_flight(peer: Peer) -> None:
    target = parse_port(peer.url)
    assert isinstance(target, TcpPort)
    flight = InFlight()
    rng = random.Random(61851)
    results: dict[int, object] = {}
    expected: dict[int, object] = {}

    async def one(index: int, bus: ModbusMaster) -> None:
        unit = rng.choice((1, 2))
        address = rng.randrange(0, SIZE - 10)
        count = rng.randrange(1, 11)
        span = range(address, address + count)
        kind = index % 4
        if kind == 0:
            expected[index] = [holding_value(unit, a) for a in span]
            results[index] = await bus.read_holding_registers(unit, address, count)
        elif kind == 1:
            expected[index] = [input_value(unit, a) for a in span]
            results[index] = await bus.read_input_registers(unit, address, count)
        elif kind == 2:
            expected[index] = [coil_value(unit, a) for a in span]
            results[index] = await bus.read_coils(unit, address, count)
        else:
            expected[index] = [discrete_value(unit, a) for a in span]
            results[index] = await bus.read_discrete_inputs(unit, address, count)

    tasks = 200
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_counting_proxy, target, flight)
        async with ModbusMaster.for_port(TcpPort("127.0.0.1", port), timeout=2.0, retries=0) as bus:
            with trio.fail_after(10):
                async with trio.open_nursery() as workers:
                    for index in range(tasks):
                        workers.start_soon(one, index, bus)
            assert bus.stats.requests == tasks
            assert bus.stats.replies == tasks
            assert bus.stats.stale_discarded == 0
        nursery.cancel_scope.cancel()

    assert results == expected
    assert flight.requests == tasks
    # The lock holds: never a second request on the wire before the first is answered.
    assert flight.peak == 1
