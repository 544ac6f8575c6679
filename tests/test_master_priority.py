"""The master's off-write lane: an urgent write goes ahead of every waiting request,
a silent device's retries step aside for it, and a reconnect holds the bus only
within the request's deadline.

Real Modbus TCP to the project's server (fieldbus.server) on loopback, on the real
clock: only the order of requests at the server is asserted, never a duration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from pymodbus.pdu import ModbusPDU

from fieldbus.errors import Disconnected, ModbusTimeout, Superseded
from fieldbus.master import BusLock, ModbusMaster
from fieldbus.registers import Table
from fieldbus.server import ModbusServer, SparseStore


def _store() -> SparseStore:
    return SparseStore({Table.HOLDING: [range(0, 10)]}, writable={Table.HOLDING: [range(0, 10)]})


@asynccontextmanager
async def server(silent: set[int]) -> AsyncIterator[tuple[str, list[tuple[int, int]]]]:
    """A server with units 1 and 2; ``silent`` units never answer. Yields (url, log)
    where log lists (unit, function code) of every request the server executed."""
    seen: list[tuple[int, int]] = []

    def on_request(unit: int, request: ModbusPDU) -> None:
        seen.append((unit, request.function_code))

    srv = ModbusServer(
        {1: _store(), 2: _store()},
        responding=lambda unit: unit not in silent,
        on_request=on_request,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(srv.serve_tcp, "127.0.0.1", 0)
        yield f"tcp://127.0.0.1:{port}", seen
        nursery.cancel_scope.cancel()


async def test_urgent_write_goes_ahead_of_waiting_reads() -> None:
    silent: set[int] = {2}
    async with (
        server(silent) as (url, seen),
        ModbusMaster.for_port(url, timeout=0.3, retries=0) as bus,
    ):
        order: list[str] = []
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                # Unit 2 is silent: this read holds the bus for its timeout.
                with pytest.raises(Exception, match="no reply"):
                    await bus.read_holding_registers(2, 0, 1)
                order.append("hold")

            async def read(i: int) -> None:
                await bus.read_holding_registers(1, 0, 1)
                order.append(f"read{i}")

            async def off() -> None:
                await bus.write_register(1, 0, 0, urgent=True)
                order.append("off")

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                nursery.start_soon(read, i)
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(off)
        assert order == ["hold", "off", "read0", "read1", "read2"]
        assert seen[0] == (1, 6), seen  # the silent unit executes nothing


async def test_silent_devices_retries_step_aside_for_an_urgent_write() -> None:
    async with (
        server({2}) as (url, seen),
        ModbusMaster.for_port(url, timeout=0.3, retries=3) as bus,
    ):
        done: list[str] = []
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                with pytest.raises(Exception, match="no reply"):
                    await bus.read_holding_registers(2, 0, 1)
                done.append("hold")

            async def off() -> None:
                await bus.write_register(1, 0, 0, urgent=True)
                done.append("off")
                # The silent unit's first attempt was still running: the write
                # went between its attempts, not after all four of them.
                assert bus.stats.retries <= 1

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(off)
        assert done == ["off", "hold"]
        assert seen == [(1, 6)]


class HangingLink:
    """A TCP link whose connect never completes (a device that drops SYNs)."""

    frame_gap = 0.0
    has_transaction_ids = True

    def __init__(self) -> None:
        self.where = "tcp://hanging"
        self.opens = 0

    @property
    def is_open(self) -> bool:
        return False

    async def open(self) -> None:
        self.opens += 1
        await trio.sleep_forever()

    async def send(self, data: bytes) -> None:
        raise Disconnected("not connected", where=self.where)

    async def receive(self, *, wait_first: bool = False) -> bytes:
        raise Disconnected("not connected", where=self.where)

    def discard_input(self) -> None:
        return

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_reconnect_holds_the_bus_only_within_the_request_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = HangingLink()
    bus = ModbusMaster(link, timeout=0.25, retries=0)
    start = trio.current_time()
    with pytest.raises(Disconnected, match=r"connect timed out after 0\.25 s"):
        await bus.read_holding_registers(1, 0, 1)
    # The connect's own deadline (TcpLink: 3 s) does not apply while the bus is held.
    assert trio.current_time() - start == pytest.approx(0.25 + 0.05)
    assert link.opens == 1


async def test_bus_lock_hands_over_to_urgent_first() -> None:
    lock = BusLock()
    await lock.acquire()
    got: list[str] = []

    async def take(name: str, urgent: bool) -> None:
        await lock.acquire(urgent=urgent)
        got.append(name)
        lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "normal1", False)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "urgent", True)
        await trio.testing.wait_all_tasks_blocked()
        # A normal request arriving while an urgent one waits does not barge in.
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
        nursery.start_soon(take, "normal2", False)
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert got == ["urgent", "normal1", "normal2"]
    with pytest.raises(RuntimeError):
        lock.release()


async def test_a_write_no_longer_wanted_is_dropped_before_the_wire() -> None:
    """A current command that waited for the bus while an off-write overtook it is
    dropped (Superseded) just before it would be sent, so it never follows the off."""
    async with (
        server({2}) as (url, seen),
        ModbusMaster.for_port(url, timeout=0.3, retries=0) as bus,
    ):
        tripped = False
        results: list[str] = []
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                with pytest.raises(Exception, match="no reply"):
                    await bus.read_holding_registers(2, 0, 1)

            async def command() -> None:
                try:
                    await bus.write_register(1, 0, 16, wanted=lambda: not tripped)
                    results.append("16 A written")
                except Superseded:
                    results.append("16 A dropped")

            async def off() -> None:
                nonlocal tripped
                tripped = True
                await bus.write_register(1, 0, 0, urgent=True)
                results.append("off written")

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(command)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(off)
        assert results == ["off written", "16 A dropped"]
        assert seen == [(1, 6)]  # only the off-write reached the device
        with pytest.raises(Superseded):
            await bus.write_register(1, 0, 16, wanted=lambda: False)
        assert seen == [(1, 6)]


async def test_a_retry_cancelled_while_it_waits_to_take_the_bus_back() -> None:
    """Found by the stateful station test: a silent unit's retry that stepped aside
    for an off-write, then was cancelled while waiting to take the bus back, must
    not release a bus it no longer holds (RuntimeError), and the bus stays usable."""
    async with (
        server({2}) as (url, _seen),
        ModbusMaster.for_port(url, timeout=0.3, retries=3) as bus,
    ):
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                with trio.move_on_after(0.45):
                    await bus.read_holding_registers(2, 0, 1)

            async def off() -> None:
                # Slow to finish (unit 2 is silent): it holds the bus while the
                # read's retry waits to take it back.
                with pytest.raises(ModbusTimeout):
                    await bus.write_register(2, 0, 0, urgent=True)

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(off)
        assert await bus.read_holding_registers(1, 0, 1) == [0]
