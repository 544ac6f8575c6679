"""The trio Modbus master against pymodbus's own RTU serial server, over a pty pair.

Real RTU framing with CRC-16 on both sides; the pty ignores baud rate and timing.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import trio

from fieldbus.errors import ExceptionReply
from fieldbus.links import SerialLink
from fieldbus.master import ModbusMaster
from fieldbus.ports import RtuPort, parse_port
from tests.ptypair import bridged_ptys
from tests.pymodbus_peer import (
    SIZE,
    coil_value,
    discrete_value,
    holding_value,
    input_value,
    running_peer,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def master() -> AsyncIterator[ModbusMaster]:
    async with bridged_ptys() as (ours, theirs), running_peer("rtu", theirs.path):
        port = parse_port(f"rtu://{ours.path}?baud=19200&parity=N")
        assert isinstance(port, RtuPort)
        # No retries: a lost or garbled frame must show up as a failure.
        async with ModbusMaster(SerialLink(port), timeout=2.0, retries=0) as bus:
            yield bus


async def test_reads(master: ModbusMaster) -> None:
    assert await master.read_holding_registers(1, 0, 10) == [holding_value(1, a) for a in range(10)]
    assert await master.read_input_registers(1, 150, 50) == [
        input_value(1, a) for a in range(150, 200)
    ]
    assert await master.read_input_registers(1, 0, 125) == [input_value(1, a) for a in range(125)]
    assert await master.read_coils(1, 0, 19) == [coil_value(1, a) for a in range(19)]
    assert await master.read_discrete_inputs(1, 7, 30) == [
        discrete_value(1, a) for a in range(7, 37)
    ]
    assert master.stats.requests == master.stats.replies == 5
    assert master.stats.frame_errors == master.stats.timeouts == 0


async def test_writes_and_read_back(master: ModbusMaster) -> None:
    await master.write_register(1, 3, 0xA5A5)
    await master.write_registers(1, 20, [7, 8, 9])
    await master.write_coil(1, 0, True)
    await master.write_coils(1, 30, [True, True, False, True])
    assert await master.read_holding_registers(1, 2, 3) == [
        holding_value(1, 2),
        0xA5A5,
        holding_value(1, 4),
    ]
    assert await master.read_holding_registers(1, 19, 5) == [
        holding_value(1, 19),
        7,
        8,
        9,
        holding_value(1, 23),
    ]
    assert await master.read_coils(1, 0, 1) == [True]
    assert coil_value(1, 0) is False  # so the write is what made it True
    assert await master.read_coils(1, 30, 4) == [True, True, False, True]


async def test_exception_reply_then_bus_usable(master: ModbusMaster) -> None:
    with pytest.raises(ExceptionReply) as info:
        await master.read_input_registers(2, SIZE + 50, 4)
    assert (info.value.function_code, info.value.code) == (4, 2)
    assert "unit 2" in str(info.value)
    assert await master.read_input_registers(2, 0, 2) == [input_value(2, 0), input_value(2, 1)]
    assert master.stats.exception_replies == 1
    assert master.stats.timeouts == master.stats.frame_errors == 0


async def test_two_units_on_one_line(master: ModbusMaster) -> None:
    for _ in range(3):
        assert await master.read_holding_registers(1, 10, 4) == [
            holding_value(1, a) for a in range(10, 14)
        ]
        assert await master.read_holding_registers(2, 10, 4) == [
            holding_value(2, a) for a in range(10, 14)
        ]
    await master.write_register(2, 10, 4242)
    assert await master.read_holding_registers(2, 10, 1) == [4242]
    assert await master.read_holding_registers(1, 10, 1) == [holding_value(1, 10)]


async def test_concurrent_tasks_share_the_line(master: ModbusMaster) -> None:
    rng = random.Random(15118)
    results: dict[int, list[int] | list[bool]] = {}
    expected: dict[int, list[int] | list[bool]] = {}

    async def one(index: int) -> None:
        unit = rng.choice((1, 2))
        address = rng.randrange(0, SIZE - 8)
        count = rng.randrange(1, 9)
        span = range(address, address + count)
        if index % 3 == 0:
            expected[index] = [holding_value(unit, a) for a in span]
            results[index] = await master.read_holding_registers(unit, address, count)
        elif index % 3 == 1:
            expected[index] = [input_value(unit, a) for a in span]
            results[index] = await master.read_input_registers(unit, address, count)
        else:
            expected[index] = [coil_value(unit, a) for a in span]
            results[index] = await master.read_coils(unit, address, count)

    tasks = 60
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for index in range(tasks):
                nursery.start_soon(one, index)
    assert results == expected
    # Two requests on the line at once would garble both (RTU has no ids to sort them).
    assert master.stats.requests == master.stats.replies == tasks
    assert master.stats.timeouts == master.stats.frame_errors == 0
