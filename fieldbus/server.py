"""A trio-native Modbus server (slave) for TCP and RTU, for simulators and tests.

pymodbus supplies the framing and the request PDUs, including each request's
own ``datastore_update`` (the code that turns a request into a reply); this
module supplies the I/O and a small datastore interface, ``UnitStore``, that
a simulated device implements. It knows registers, not chargers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import trio
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from fieldbus.registers import Table

log = logging.getLogger(__name__)

#: Function code -> data table (Modbus Application Protocol V1.1b3, section 6).
FUNCTION_TABLES: Mapping[int, Table] = {
    1: Table.COIL,
    5: Table.COIL,
    15: Table.COIL,
    2: Table.DISCRETE_INPUT,
    3: Table.HOLDING,
    6: Table.HOLDING,
    16: Table.HOLDING,
    23: Table.HOLDING,
    4: Table.INPUT,
}


class UnitStore(Protocol):
    """One device's data as the server sees it."""

    def get(self, table: Table, address: int, count: int) -> list[int] | ExcCodes: ...

    def set(self, table: Table, address: int, values: Sequence[int]) -> ExcCodes | None: ...


class SparseStore:
    """Registers in address ranges; reads inside a range of unset registers give 0.

    ``on_write`` sees every accepted write and may refuse it by returning an
    exception code (e.g. ILLEGAL_VALUE for a current out of range).
    """

    def __init__(
        self,
        ranges: Mapping[Table, Sequence[range]],
        *,
        writable: Mapping[Table, Sequence[range]] | None = None,
        on_write: Callable[[Table, int, Sequence[int]], ExcCodes | None] | None = None,
    ) -> None:
        self.values: dict[Table, dict[int, int]] = {t: {} for t in Table}
        self.ranges = {t: list(r) for t, r in ranges.items()}
        self.writable = {t: list(r) for t, r in (writable or {}).items()}
        self.on_write = on_write

    @staticmethod
    def _covered(ranges: Sequence[range], address: int, count: int) -> bool:
        return any(address in r and address + count - 1 in r for r in ranges)

    def get(self, table: Table, address: int, count: int) -> list[int] | ExcCodes:
        if not self._covered(self.ranges.get(table, ()), address, count):
            return ExcCodes.ILLEGAL_ADDRESS
        values = self.values[table]
        return [values.get(a, 0) for a in range(address, address + count)]

    def set(self, table: Table, address: int, values: Sequence[int]) -> ExcCodes | None:
        if not self._covered(self.writable.get(table, ()), address, len(values)):
            return ExcCodes.ILLEGAL_ADDRESS
        if self.on_write is not None and (refusal := self.on_write(table, address, values)):
            return refusal
        self.put(table, address, values)
        return None

    def put(self, table: Table, address: int, values: Sequence[int]) -> None:
        """Set values from the device side (no write check, no callback)."""
        store = self.values[table]
        for offset, value in enumerate(values):
            store[address + offset] = int(value)


class _Context:
    """The duck-typed datastore pymodbus's request PDUs call into."""

    def __init__(self, store: UnitStore) -> None:
        self.store = store

    async def async_getValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = FUNCTION_TABLES[func_code]
        values = self.store.get(table, address, count)
        if isinstance(values, ExcCodes) or not table.is_bits:
            return values
        return [bool(v) for v in values]

    async def async_setValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        return self.store.set(FUNCTION_TABLES[func_code], address, [int(v) for v in values])


class ModbusServer:
    """Serves a set of units; ``responding(unit)`` false makes a unit silent."""

    def __init__(
        self,
        units: Mapping[int, UnitStore],
        *,
        responding: Callable[[int], bool] = lambda unit: True,
        on_request: Callable[[int, ModbusPDU], None] | None = None,
        on_reply: Callable[[int], None] | None = None,
    ) -> None:
        self.units = units
        self.responding = responding
        self.on_request = on_request
        #: Called once a reply has been handed to the link (timing checks).
        self.on_reply = on_reply
        self.requests = 0

    async def handle(self, unit: int, request: ModbusPDU) -> ModbusPDU | None:
        """Execute one request; None means no reply (unknown or silent unit, broadcast)."""
        self.requests += 1
        if unit == 0:
            # Broadcast (Serial Line V1.02, 2.1): writes to every unit, no reply.
            for each in self.units.values():
                await request.datastore_update(cast(Any, _Context(each)), 0)
            return None
        store = self.units.get(unit)
        if store is None or not self.responding(unit):
            return None
        if self.on_request is not None:
            self.on_request(unit, request)
        if request.function_code not in FUNCTION_TABLES:
            return ExceptionResponse(request.function_code, ExcCodes.ILLEGAL_FUNCTION)
        return await request.datastore_update(cast(Any, _Context(store)), unit)

    async def _reply(self, framer: FramerBase, unit: int, tid: int, pdu_bytes: bytes) -> bytes:
        request = framer.decoder.decode(pdu_bytes)
        if request is None:
            if unit == 0 or unit not in self.units or not self.responding(unit):
                return b""
            reply: ModbusPDU | None = ExceptionResponse(pdu_bytes[0], ExcCodes.ILLEGAL_FUNCTION)
        else:
            request.dev_id, request.transaction_id = unit, tid
            reply = await self.handle(unit, request)
        if reply is None:
            return b""
        reply.dev_id, reply.transaction_id = unit, tid
        return framer.buildFrame(reply)

    async def serve_stream(self, stream: trio.abc.Stream, *, rtu: bool) -> None:
        """Serve requests arriving on one byte stream until it closes."""
        framer: FramerBase = (FramerRTU if rtu else FramerSocket)(DecodePDU(is_server=True))
        buffer = b""
        while True:
            try:
                data = await stream.receive_some(1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            buffer += data
            while buffer:
                used, unit, tid, pdu_bytes = framer.decode(buffer)
                if not used:
                    break
                buffer = buffer[used:]
                if not pdu_bytes:
                    continue  # a frame with a bad CRC is ignored, as a real device does
                frame = await self._reply(framer, unit, tid, pdu_bytes)
                if frame:
                    try:
                        await stream.send_all(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return
                    if self.on_reply is not None:
                        self.on_reply(unit)

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve Modbus TCP; reports the bound port through ``task_status``."""

        async def handler(stream: trio.SocketStream) -> None:
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            async with stream:
                await self.serve_stream(stream, rtu=False)

        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            task_status.started(bound)
