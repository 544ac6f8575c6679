"""A trio-native Modbus master (client) for TCP and RTU.

pymodbus supplies the framing (``FramerSocket``, ``FramerRTU``: MBAP header,
CRC-16) and the PDU classes; this module owns the I/O and the rules a bus
needs in a charger:

* one request in flight per bus (a trio.Lock), so several devices (unit ids)
  share one RTU line safely;
* the RTU inter-frame silence t3.5 before every request (Modbus over Serial
  Line V1.02, 2.5.1.1), plus an optional per-bus gap for slow devices;
* a per-request timeout on trio's clock and bounded retries for the
  transient failures (timeout, corrupt frame, dropped link); an exception
  reply is the device's answer and is not retried;
* a dropped TCP connection is reconnected and a vanished serial port re-opened
  on the next attempt;
* no stale reply is ever taken for the answer to a later request: MBAP
  transaction ids on TCP; on RTU, after an aborted exchange (timeout, CRC
  error, cancellation), the line is drained until it has been quiet and the
  aborted request's own timeout has run out, and every reply is checked
  against the unit id, function code and register count it answers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import trio
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from fieldbus.errors import (
    Disconnected,
    ExceptionReply,
    FieldbusError,
    FrameError,
    ModbusTimeout,
    Superseded,
)
from fieldbus.links import Link, make_link
from fieldbus.ports import PortSpec, parse_port

#: Function code -> pymodbus's response class, for the functions the master sends;
#: exception replies (function | 0x80) map to ExceptionResponse.
_RESPONSE_CLASSES: dict[int, type[ModbusPDU]] = {
    code: DecodePDU.pdu_table[code][1] for code in (1, 2, 3, 4, 5, 6, 15, 16)
}
_RESPONSE_CLASSES.update({code | 0x80: ExceptionResponse for code in tuple(_RESPONSE_CLASSES)})
#: Read holding / input registers: their replies are decoded by the master itself.
_REGISTER_REPLIES: dict[int, type[ModbusPDU]] = {3: _RESPONSE_CLASSES[3], 4: _RESPONSE_CLASSES[4]}

#: The last part of the inter-frame silence is waited by yielding to the
#: scheduler rather than by a timer: epoll's timeout is whole milliseconds,
#: rounded up, so a timer alone overshoots a 3.65 ms t3.5 by up to 1 ms (a
#: quarter of the throughput of a 9600-baud line).
_SPIN = 0.001


async def _sleep_precisely(deadline: float) -> None:
    """Sleep until ``deadline`` on trio's clock, not much past it."""
    if deadline - trio.current_time() > _SPIN:
        await trio.sleep_until(deadline - _SPIN)
    while (now := trio.current_time()) < deadline:
        await trio.lowlevel.checkpoint()
        if trio.current_time() == now:
            # A virtual clock (tests): it moves only when every task sleeps.
            await trio.sleep_until(deadline)
            return


#: A request's "still wanted?" check (see ModbusMaster.write_register).
Wanted = Callable[[], bool] | None

#: Function codes that write (05, 06, 15, 16).
_WRITE_CODES = frozenset({5, 6, 15, 16})

#: Read-request frames kept per bus (a poller repeats a handful).
_MAX_CACHED_FRAMES = 256


def _check_unit(unit: int) -> None:
    if not 0 <= unit <= 255:
        raise ValueError(f"unit id {unit} is outside 0..255")


#: The largest MBAP "length" a valid Modbus TCP ADU can carry (unit id + 253-byte PDU).
_MAX_MBAP_LENGTH = 254


class BusLock:
    """The bus: one holder at a time; urgent waiters (off-writes) go before all others.

    Like ``trio.Lock`` (FIFO hand-over through a parking lot, so a release never
    lets a late-comer barge in), with a second lot that is always served first.
    A normal request that finds the bus free while an urgent one waits does not
    take it.
    """

    __slots__ = ("_held", "_normal", "_urgent")

    def __init__(self) -> None:
        self._held = False
        self._urgent = trio.lowlevel.ParkingLot()
        self._normal = trio.lowlevel.ParkingLot()

    @property
    def urgent_waiting(self) -> bool:
        return bool(self._urgent)

    def acquire_nowait(self, *, urgent: bool = False) -> None:
        if self._held or (not urgent and self._urgent):
            raise trio.WouldBlock
        self._held = True

    async def acquire(self, *, urgent: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait(urgent=urgent)
        except trio.WouldBlock:
            # Ownership is handed over by release(): once unparked we hold it.
            await (self._urgent if urgent else self._normal).park()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("the bus is not held")
        if self._urgent:
            self._urgent.unpark()
        elif self._normal:
            self._normal.unpark()
        else:
            self._held = False


@dataclass(slots=True)
class BusStats:
    """Counters an operator can read to judge a bus's health."""

    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    frame_errors: int = 0
    exception_replies: int = 0
    disconnects: int = 0
    retries: int = 0
    stale_discarded: int = 0


class ModbusMaster:
    """One bus: a TCP connection to one device or gateway, or one RTU line."""

    def __init__(
        self,
        link: Link,
        *,
        timeout: float = 1.0,
        retries: int = 2,
        min_gap: float = 0.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        self.link = link
        self.timeout = timeout
        self.retries = retries
        # Silence before each request: t3.5 on RTU, or more for slow devices.
        self.gap = max(link.frame_gap, min_gap)
        self.stats = BusStats()
        self._lock = BusLock()
        framer_class: type[FramerBase] = FramerSocket if link.has_transaction_ids else FramerRTU
        self._framer = framer_class(DecodePDU(is_server=False))
        self._decoder = self._framer.decoder
        self._buffer = b""
        self._tid = 0
        self._last_io = -float("inf")
        self._last_send = -float("inf")
        # The timeout of the request last sent: its reply may come until then.
        self._last_timeout = timeout
        # True from sending a request until its reply has been consumed: if
        # it is still set when the next request starts, a reply may be in flight.
        self._dirty = False
        self._frames: dict[tuple[int, int, int, int], bytes] = {}
        self._unit_gap: dict[int, float] = {}
        #: Per-unit reply timeout and retries, where a device needs its own.
        self._unit_timeout: dict[int, float] = {}
        self._unit_retries: dict[int, int] = {}
        self._unit_last: dict[int, float] = {}
        #: Writes waiting for a unit's gap slot; reads to that unit let them go first.
        self._writes_waiting: dict[int, int] = {}
        self._write_turn = trio.lowlevel.ParkingLot()

    @classmethod
    def for_port(
        cls, port: PortSpec | str, *, timeout: float = 1.0, retries: int = 2, min_gap: float = 0.0
    ) -> ModbusMaster:
        spec = parse_port(port) if isinstance(port, str) else port
        return cls(make_link(spec), timeout=timeout, retries=retries, min_gap=min_gap)

    @property
    def where(self) -> str:
        return self.link.where

    async def __aenter__(self) -> ModbusMaster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.link.aclose()

    def configure_unit(
        self, unit: int, *, timeout: float | None = None, retries: int | None = None
    ) -> None:
        """Give one device on a shared bus its own reply timeout and retries.

        A silent device holds the bus for timeout x (1 + retries) per request;
        on a line shared with a safety-critical board, keep that short.
        """
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, not {timeout}")
            self._unit_timeout[unit] = timeout
        if retries is not None:
            if retries < 0:
                raise ValueError(f"retries must be >= 0, not {retries}")
            self._unit_retries[unit] = retries

    def set_unit_gap(self, unit: int, seconds: float) -> None:
        """Keep ``seconds`` between two requests to ``unit`` (slow device firmware).

        Other units on the same line are not held back by it.
        """
        if seconds < 0:
            raise ValueError(f"gap must be >= 0, not {seconds}")
        self._unit_gap[unit] = seconds

    def unit_ready_at(self, unit: int) -> float:
        """The trio time from which the unit's own gap (``set_unit_gap``) lets its
        next request go: a poller that sleeps until then does not wake only to
        wait again. -inf for a unit without a gap."""
        gap = self._unit_gap.get(unit)
        if not gap:
            return -float("inf")
        return self._unit_last.get(unit, -float("inf")) + gap

    # -- requests ------------------------------------------------------------

    # ``wanted`` on a read: as for a write (below), e.g. a meter read that no
    # longer fits into the time the board's poller leaves it (LineShare).

    async def read_holding_registers(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[int]:
        reply = await self._read(unit, ReadHoldingRegistersRequest, address, count, wanted)
        return list(reply.registers)

    async def read_input_registers(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[int]:
        reply = await self._read(unit, ReadInputRegistersRequest, address, count, wanted)
        return list(reply.registers)

    async def read_coils(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[bool]:
        reply = await self._read(unit, ReadCoilsRequest, address, count, wanted)
        return list(reply.bits[:count])

    async def read_discrete_inputs(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[bool]:
        reply = await self._read(unit, ReadDiscreteInputsRequest, address, count, wanted)
        return list(reply.bits[:count])

    # ``urgent``: an off-write (charging current 0). It goes ahead of every
    # request waiting for the bus, and a normal request's retries step aside
    # for it between attempts. ``wanted``: asked once the bus is ours, just
    # before the request goes on the wire (and before each retry); False drops
    # it with Superseded. A current command uses it so that it can never
    # follow an off-write that overtook it.

    async def write_register(
        self, unit: int, address: int, value: int, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        request = WriteSingleRegisterRequest(address=address, registers=[value])
        await self.execute(unit, request, urgent=urgent, wanted=wanted)

    async def write_registers(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> None:
        request = WriteMultipleRegistersRequest(address=address, registers=values)
        await self.execute(unit, request, urgent=urgent, wanted=wanted)

    async def write_coil(
        self, unit: int, address: int, value: bool, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        request = WriteSingleCoilRequest(address=address, bits=[value])
        await self.execute(unit, request, urgent=urgent, wanted=wanted)

    async def write_coils(
        self,
        unit: int,
        address: int,
        values: Sequence[bool],
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> None:
        request = WriteMultipleCoilsRequest(address=address, bits=values)
        await self.execute(unit, request, urgent=urgent, wanted=wanted)

    async def _read(
        self,
        unit: int,
        request_class: type[ModbusPDU],
        address: int,
        count: int,
        wanted: Wanted = None,
    ) -> ModbusPDU:
        """A read request; pollers repeat the same few, so their frames are kept."""
        key = (request_class.function_code, unit, address, count)
        frame = self._frames.get(key)
        if frame is None:
            _check_unit(unit)
            frame = self._framer.buildFrame(
                request_class(address=address, count=count, dev_id=unit)
            )
            if len(self._frames) < _MAX_CACHED_FRAMES:
                self._frames[key] = frame
        return await self._transact(
            unit, request_class.function_code, count, frame, None, wanted=wanted
        )

    async def execute(
        self,
        unit: int,
        request: ModbusPDU,
        *,
        reply_timeout: float | None = None,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> ModbusPDU:
        """Send one request and return its reply, retrying transient failures.

        Raises ExceptionReply at once; ModbusTimeout, FrameError or Disconnected
        after ``retries`` further attempts; PortConfigError at once.
        """
        _check_unit(unit)
        request.dev_id = unit
        frame = self._framer.buildFrame(request)
        count = request.count if request.function_code in (1, 2, 3, 4) else 0
        return await self._transact(
            unit, request.function_code, count, frame, reply_timeout, urgent=urgent, wanted=wanted
        )

    async def _transact(
        self,
        unit: int,
        code: int,
        count: int,
        frame: bytes,
        reply_timeout: float | None,
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> ModbusPDU:
        await self._take(unit, code, urgent)
        held = True
        try:
            attempt = 0
            while True:
                if wanted is not None and not wanted():
                    raise Superseded("request no longer wanted", where=self.where)
                try:
                    return await self._exchange(
                        unit,
                        code,
                        count,
                        frame,
                        reply_timeout or self._unit_timeout.get(unit, self.timeout),
                    )
                except (ModbusTimeout, FrameError, Disconnected):
                    if attempt >= self._unit_retries.get(unit, self.retries):
                        raise
                    attempt += 1
                    self.stats.retries += 1
                    if not urgent and self._lock.urgent_waiting:
                        # A silent device's retries must not hold an off-write back.
                        held = False
                        self._lock.release()
                        await self._take(unit, code, urgent)
                        held = True
        finally:
            # Not held when cancelled while waiting to take the bus back.
            if held:
                self._lock.release()

    async def _take(self, unit: int, code: int, urgent: bool) -> None:
        unit_gap = self._unit_gap.get(unit)
        if not unit_gap:
            # The common case, kept short (it is the per-poll cost): an
            # uncontended bus is taken without a scheduler round-trip; the
            # exchange itself checkpoints on send and receive.
            try:
                self._lock.acquire_nowait(urgent=urgent)
            except trio.WouldBlock:
                await self._lock.acquire(urgent=urgent)
            return
        is_write = code in _WRITE_CODES
        if is_write:
            self._writes_waiting[unit] = self._writes_waiting.get(unit, 0) + 1
        try:
            await self._take_bus(unit, unit_gap, is_write, urgent)
        finally:
            if is_write:
                self._writes_waiting[unit] -= 1
                self._write_turn.unpark_all()

    async def _take_bus(self, unit: int, unit_gap: float, is_write: bool, urgent: bool) -> None:
        """Wait for the unit's own gap, then hold the bus lock.

        On a unit with a request gap, a write (a current command, "off" above
        all) goes before reads waiting for the same gap slot: a poller that
        keeps winning the slot would otherwise delay the off-command by a
        whole gap per lost round (EVSE DIN: 100 ms each).
        """
        while True:
            # Wait out a slow unit's own gap *before* taking the bus, so
            # requests to other units go ahead meanwhile.
            ready_at = self._unit_last.get(unit, -float("inf")) + unit_gap
            if ready_at > trio.current_time():
                await trio.sleep_until(ready_at)
            if not is_write and self._writes_waiting.get(unit):
                await self._write_turn.park()
                continue
            try:
                self._lock.acquire_nowait(urgent=urgent)
            except trio.WouldBlock:
                await self._lock.acquire(urgent=urgent)
            if trio.current_time() >= self._unit_last.get(unit, -float("inf")) + unit_gap:
                return
            # Another task reached the same unit first: wait its gap again.
            self._lock.release()

    async def _exchange(
        self, unit: int, code: int, count: int, frame: bytes, reply_timeout: float
    ) -> ModbusPDU:
        link = self.link
        if not link.is_open:
            try:
                # The bus is held meanwhile: the (re)connect gets the request's
                # own deadline, never the link's longer connect timeout alone.
                with trio.move_on_after(reply_timeout) as connecting:
                    await link.open()
                if connecting.cancelled_caught:
                    await link.aclose()
                    raise Disconnected(
                        f"connect timed out after {reply_timeout:g} s", where=self.where
                    )
            except Disconnected:
                self.stats.disconnects += 1
                # Don't spin on a refused connection; the retry is one gap away
                # (unless an off-write is waiting for the bus).
                if not self._lock.urgent_waiting:
                    await trio.sleep(max(self.gap, 0.05))
                raise
            self._buffer = b""
            self._dirty = False
        if self._dirty:
            await self._settle()
        ready_at = self._last_io + self.gap
        unit_gap = self._unit_gap.get(unit)
        now = trio.current_time()
        if ready_at > now:
            await _sleep_precisely(ready_at)
            now = trio.current_time()
        tid = self._tid = self._tid % 0xFFFF + 1
        if link.has_transaction_ids:
            # MBAP: the transaction id is the frame's first two bytes.
            frame = tid.to_bytes(2, "big") + frame[2:]
        self._buffer = b""
        link.discard_input()
        self._dirty = True
        self.stats.requests += 1
        reply: ModbusPDU | None = None
        self._last_send = now
        self._last_timeout = reply_timeout
        try:
            # A bare CancelScope rather than fail_after: same semantics, a
            # measurable part of the per-poll cost cheaper. On RTU a request on
            # the wire is finished, not aborted, when its caller is cancelled
            # (within its own deadline): an aborted one leaves the line dirty,
            # and the next request (the switch-off's off-write, say) would first
            # have to wait out the whole reply timeout (``_settle``).
            with trio.CancelScope(
                deadline=now + reply_timeout, shield=not link.has_transaction_ids
            ):
                await link.send(frame)
                reply = await self._read_reply(unit, tid, code)
            if reply is None:
                self.stats.timeouts += 1
                raise ModbusTimeout(
                    f"no reply from unit {unit} within {reply_timeout:g} s", where=self.where
                )
        except FrameError:
            self.stats.frame_errors += 1
            raise
        except Disconnected:
            self.stats.disconnects += 1
            raise
        finally:
            self._last_io = trio.current_time()
            if unit_gap:
                self._unit_last[unit] = self._last_io
        self._dirty = False
        self.stats.replies += 1
        return self._check_reply(unit, code, count, reply)

    async def _read_reply(self, unit: int, tid: int, function_code: int) -> ModbusPDU:
        if self.link.has_transaction_ids:
            return await self._read_tcp_reply(unit, tid, function_code)
        framer = self._framer
        self._buffer = await self.link.receive(wait_first=True)
        while True:
            while self._buffer:
                used, dev_id, _, pdu_bytes = framer.decode(self._buffer)
                if not used:
                    break
                self._buffer = self._buffer[used:]
                if not pdu_bytes:
                    raise FrameError(
                        f"corrupt reply from unit {unit} (CRC mismatch)", where=self.where
                    )
                if dev_id != unit:
                    # A late reply to an earlier, aborted request.
                    self.stats.stale_discarded += 1
                    continue
                return self._decode(unit, function_code, pdu_bytes)
            self._buffer += await self.link.receive()

    async def _read_tcp_reply(self, unit: int, tid: int, function_code: int) -> ModbusPDU:
        """The reply on TCP: MBAP frames parsed here (what ``FramerSocket.decode``
        and ``_check_mbap_header`` do, in one pass: a poll's hot path), a late
        reply to an earlier request (another transaction id) thrown away."""
        buffer = self._buffer = await self.link.receive(wait_first=True)
        while True:
            while len(buffer) >= 6:
                length = buffer[4] << 8 | buffer[5]
                if buffer[2] or buffer[3] or not 2 <= length <= _MAX_MBAP_LENGTH:
                    self._check_mbap_header()  # raises, with the header in the message
                end = 6 + length
                if len(buffer) < end:
                    break
                if length == 2 and len(buffer) == 9:
                    end = 9  # as FramerSocket.decode takes it
                reply_tid = buffer[0] << 8 | buffer[1]
                dev_id = buffer[6]
                pdu_bytes = buffer[7:end]
                buffer = self._buffer = buffer[end:]
                if reply_tid != tid or dev_id != unit:
                    # A late reply to an earlier, aborted request.
                    self.stats.stale_discarded += 1
                    continue
                return self._decode(unit, function_code, pdu_bytes)
            buffer = self._buffer = buffer + await self.link.receive()

    def _decode(self, unit: int, function_code: int, pdu_bytes: bytes) -> ModbusPDU:
        """Decode a reply with pymodbus's response class for the function asked.

        Looking the class up directly (instead of ``DecodePDU.decode``) skips
        the debug string pymodbus formats for every frame, a third of the
        master's CPU per poll.
        """
        code = pdu_bytes[0]
        reply_class = _RESPONSE_CLASSES.get(code)
        registers_reply = _REGISTER_REPLIES.get(code)
        if registers_reply is not None:
            # The pollers' replies: the registers in one unpack (pymodbus's decode
            # makes a call per register); anything odd takes the general path below.
            size = pdu_bytes[1] if len(pdu_bytes) > 1 else -1
            if size >= 0 and not size & 1 and size <= len(pdu_bytes) - 2:
                return registers_reply(
                    registers=list(struct.unpack(f">{size >> 1}H", pdu_bytes[2 : 2 + size]))
                )
        if reply_class is None:
            reply = self._decoder.decode(pdu_bytes)
        elif code & 0x80:
            reply = ExceptionResponse(code & 0x7F)
        else:
            reply = reply_class()
        if reply is None:
            raise FrameError(
                f"undecodable reply from unit {unit}: {pdu_bytes.hex(' ')}", where=self.where
            )
        if reply_class is not None:
            try:
                reply.decode(pdu_bytes[1:])
            except (ValueError, IndexError, struct.error, ModbusException) as exc:
                raise FrameError(
                    f"malformed reply from unit {unit} to function {function_code}: "
                    f"{pdu_bytes.hex(' ')} ({exc})",
                    where=self.where,
                ) from None
        return reply

    def _check_mbap_header(self) -> None:
        """Refuse a TCP stream that has lost frame sync, rather than wait on it."""
        header = self._buffer[:6]
        if len(header) < 6:
            return
        protocol = int.from_bytes(header[2:4], "big")
        length = int.from_bytes(header[4:6], "big")
        if protocol != 0 or not 2 <= length <= _MAX_MBAP_LENGTH:
            # The bad bytes stay in the buffer so that _settle reconnects: the
            # rest of whatever this is may still be on its way.
            raise FrameError(
                f"malformed MBAP header {header.hex(' ')} (protocol {protocol}, length {length})",
                where=self.where,
            )

    def _check_reply(self, unit: int, code: int, count: int, reply: ModbusPDU) -> ModbusPDU:
        if reply.function_code == code | 0x80 and isinstance(reply, ExceptionResponse):
            self.stats.exception_replies += 1
            raise ExceptionReply(code, reply.exception_code, where=f"{self.where} unit {unit}")
        if reply.function_code != code:
            self.stats.frame_errors += 1
            raise FrameError(
                f"reply with function {reply.function_code} to a function {code} request",
                where=self.where,
            )
        if code in (3, 4) and len(reply.registers) != count:
            self.stats.frame_errors += 1
            raise FrameError(
                f"asked for {count} registers, got {len(reply.registers)}", where=self.where
            )
        if code in (1, 2) and len(reply.bits) < count:
            self.stats.frame_errors += 1
            raise FrameError(f"asked for {count} bits, got {len(reply.bits)}", where=self.where)
        return reply

    async def _settle(self) -> None:
        """After an aborted exchange, let a late reply arrive and throw it away.

        On TCP the transaction id tells a late reply apart, unless part of it
        was already read: then frame sync is lost, so reconnect. On RTU, read
        and discard until the line has been quiet for a while and the aborted
        request's timeout has run out, the latest a correct device answers.
        """
        # _dirty is cleared only when the settle is complete: one cut short
        # (cancelled) must be done again by the next request.
        if self.link.has_transaction_ids:
            if self._buffer:
                self._buffer = b""
                await self.link.aclose()
                await self.link.open()
            self._dirty = False
            return
        self._buffer = b""
        quiet = max(0.02, 4 * self.gap)
        deadline = max(self._last_send + self._last_timeout, trio.current_time() + quiet)
        while True:
            with trio.move_on_at(deadline):
                data = await self.link.receive()
                self.stats.stale_discarded += 1 if data else 0
                deadline = max(deadline, trio.current_time() + quiet)
                continue
            break
        self.link.discard_input()
        self._last_io = trio.current_time()
        self._dirty = False


__all__ = ["BusStats", "FieldbusError", "ModbusMaster"]
