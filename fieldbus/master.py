"""A trio-native Modbus master (client) for TCP and RTU.

``fieldbus.codec`` builds and decodes the frames (MBAP header, CRC-16; pymodbus
is the reference it is tested against); this module owns the I/O and the rules
a bus needs in a charger:

* one request in flight per bus (a trio.Lock), so several devices (unit ids)
  share one RTU line safely;
* the RTU inter-frame silence t3.5 before every request (Modbus over Serial
  Line V1.02, 2.5.1.1), plus an optional per-bus gap for slow devices;
* a per-request timeout on trio's clock and bounded retries for the
  transient failures (timeout, corrupt frame, dropped link); an exception
  reply is the device's answer and is not retried. On trio's real clock the
  two waits of a poll are kept by timer descriptors (``fieldbus.timer``): the
  reply's deadline on TCP without a cancel scope per request, and the RTU
  silence to within microseconds, counted from the reply's last bytes;
* a dropped TCP connection is reconnected and a vanished serial port re-opened
  on the next attempt;
* no stale reply is ever taken for the answer to a later request: MBAP
  transaction ids on TCP; on RTU, after an aborted exchange (timeout, CRC
  error, cancellation), the line is drained until it has been quiet and the
  aborted request's own timeout has run out, and every reply is checked
  against the unit id, function code and register count it answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, cast

import trio

from fieldbus import codec
from fieldbus.codec import Reply, decode_reply
from fieldbus.errors import (
    Disconnected,
    ExceptionReply,
    FieldbusError,
    FrameError,
    ModbusTimeout,
    Superseded,
)
from fieldbus.links import Link, TcpLink, make_link
from fieldbus.ports import PortSpec, parse_port
from fieldbus.timer import Timer, on_real_clock

if TYPE_CHECKING:
    from pymodbus.pdu import ModbusPDU

#: Where there is no timer descriptor (fieldbus.timer: not Linux), the last
#: part of the inter-frame silence is waited by yielding to the scheduler
#: rather than by trio's timer: epoll's timeout is whole milliseconds, rounded
#: up, so a timer alone overshoots a 3.65 ms t3.5 by up to 1 ms (a quarter of
#: the throughput of a 9600-baud line). Under a virtual clock it is exact.
_SPIN = 0.001


async def _sleep_precisely(deadline: float) -> None:
    """Sleep until ``deadline`` on trio's clock, not much past it, without a timer."""
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

    __slots__ = ("_held", "_normal", "_parking", "_urgent")

    def __init__(self) -> None:
        self._held = False
        self._urgent = trio.lowlevel.ParkingLot()
        self._normal = trio.lowlevel.ParkingLot()
        # Tasks in acquire's park (or just out of it): 0 means both lots are
        # empty, so the uncontended bus (every poll) is taken and released
        # without asking the lots (each ask is a Python-level call).
        self._parking = 0

    @property
    def urgent_waiting(self) -> bool:
        return bool(self._parking and self._urgent)

    def acquire_nowait(self, *, urgent: bool = False) -> None:
        if self._held or (self._parking and not urgent and self._urgent):
            raise trio.WouldBlock
        self._held = True

    async def acquire(self, *, urgent: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait(urgent=urgent)
        except trio.WouldBlock:
            # Ownership is handed over by release(): once unparked we hold it.
            self._parking += 1
            try:
                await (self._urgent if urgent else self._normal).park()
            finally:
                self._parking -= 1
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("the bus is not held")
        if not self._parking:
            self._held = False
        elif self._urgent:
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
        self._buffer = b""
        self._tid = 0
        self._last_io = -float("inf")
        self._last_send = -float("inf")
        # When the last bytes of the RTU reply being read came in.
        self._reply_at = -float("inf")
        # The last reply's PDU (``execute`` hands it to pymodbus).
        self._reply_pdu = b""
        # The timeout of the request last sent: its reply may come until then.
        self._last_timeout = timeout
        # True from sending a request until its reply has been consumed: if
        # it is still set when the next request starts, a reply may be in flight.
        self._dirty = False
        #: Whether the request holding the bus is urgent (an off-write).
        self._urgent = False
        self._frames: dict[tuple[int, int, int, int], bytes] = {}
        self._unit_gap: dict[int, float] = {}
        #: Per-unit reply timeout and retries, where a device needs its own.
        self._unit_timeout: dict[int, float] = {}
        self._unit_retries: dict[int, int] = {}
        self._unit_last: dict[int, float] = {}
        #: Writes waiting for a unit's gap slot; reads to that unit let them go first.
        self._writes_waiting: dict[int, int] = {}
        self._write_turn = trio.lowlevel.ParkingLot()
        # Modbus TCP over a real socket: the reply deadline without a cancel
        # scope (TcpLink.exchange_by), on trio's real clock; None: not decided
        # yet for this connection.
        self._tcp = link if isinstance(link, TcpLink) else None
        self._fast: bool | None = None
        # The silence before a request, woken at its end (fieldbus.timer); made
        # when first needed, closed with the link.
        self._silence_timer: Timer | None = None

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
        timer, self._silence_timer = self._silence_timer, None
        if timer is not None:
            timer.close()
        await self.link.aclose()

    async def _wait_silence(self, deadline: float) -> None:
        """Sleep until ``deadline``, the end of the line's silence: on trio's real
        clock with a timer descriptor (fieldbus.timer), else by ``_sleep_precisely``."""
        if on_real_clock():
            timer = self._silence_timer
            if timer is None:
                timer = self._silence_timer = Timer.create()
            if timer is not None:
                await timer.sleep_until(deadline, exact=True)
                return
        await _sleep_precisely(deadline)

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
        frame = self._read_frame(unit, 3, address, count)
        return cast("list[int]", await self._transact(unit, 3, count, frame, None, wanted=wanted))

    async def read_input_registers(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[int]:
        frame = self._read_frame(unit, 4, address, count)
        return cast("list[int]", await self._transact(unit, 4, count, frame, None, wanted=wanted))

    async def read_coils(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[bool]:
        frame = self._read_frame(unit, 1, address, count)
        return cast("list[bool]", await self._transact(unit, 1, count, frame, None, wanted=wanted))

    async def read_discrete_inputs(
        self, unit: int, address: int, count: int, *, wanted: Wanted = None
    ) -> list[bool]:
        frame = self._read_frame(unit, 2, address, count)
        return cast("list[bool]", await self._transact(unit, 2, count, frame, None, wanted=wanted))

    # ``urgent``: an off-write (charging current 0). It goes ahead of every
    # request waiting for the bus, and a normal request's retries step aside
    # for it between attempts. ``wanted``: asked once the bus is ours, just
    # before the request goes on the wire (and before each retry); False drops
    # it with Superseded. A current command uses it so that it can never
    # follow an off-write that overtook it.

    async def write_register(
        self, unit: int, address: int, value: int, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        pdu = codec.write_register_request(address, value)
        await self._write(unit, pdu, urgent=urgent, wanted=wanted)

    async def write_registers(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> None:
        pdu = codec.write_registers_request(address, values)
        await self._write(unit, pdu, urgent=urgent, wanted=wanted)

    async def write_coil(
        self, unit: int, address: int, value: bool, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        pdu = codec.write_coil_request(address, value)
        await self._write(unit, pdu, urgent=urgent, wanted=wanted)

    async def write_coils(
        self,
        unit: int,
        address: int,
        values: Sequence[bool],
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> None:
        pdu = codec.write_coils_request(address, values)
        await self._write(unit, pdu, urgent=urgent, wanted=wanted)

    def _frame(self, unit: int, pdu: bytes) -> bytes:
        _check_unit(unit)
        if self.link.has_transaction_ids:
            return codec.tcp_frame(unit, pdu)
        return codec.rtu_frame(unit, pdu)

    def _read_frame(self, unit: int, code: int, address: int, count: int) -> bytes:
        """A read request; pollers repeat the same few, so their frames are kept."""
        key = (code, unit, address, count)
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frame(unit, codec.read_request(code, address, count))
            if len(self._frames) < _MAX_CACHED_FRAMES:
                self._frames[key] = frame
        return frame

    async def _write(self, unit: int, pdu: bytes, *, urgent: bool, wanted: Wanted) -> None:
        await self._transact(
            unit, pdu[0], 0, self._frame(unit, pdu), None, wanted=wanted, urgent=urgent
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
        """Send one pymodbus request PDU and return pymodbus's decoding of its
        reply, retrying transient failures (the functions the master knows:
        01-06, 15, 16; the caller has pymodbus imported, the station does not).

        Raises ExceptionReply at once; ModbusTimeout, FrameError or Disconnected
        after ``retries`` further attempts; PortConfigError at once.
        """
        from pymodbus.pdu import DecodePDU  # noqa: PLC0415 - kept out of the station

        code = request.function_code
        count = request.count if code in codec.READ_BITS or code in codec.READ_REGISTERS else 0
        pdu = code.to_bytes(1, "big") + request.encode()
        await self._transact(
            unit, code, count, self._frame(unit, pdu), reply_timeout, wanted=wanted, urgent=urgent
        )
        reply = DecodePDU(is_server=False).decode(self._reply_pdu)
        if reply is None:  # pragma: no cover - decode_reply accepted it
            raise FrameError(f"undecodable reply {self._reply_pdu.hex(' ')}", where=self.where)
        return reply

    async def _transact(
        self,
        unit: int,
        code: int,
        count: int,
        frame: bytes,
        reply_timeout: float | None,
        *,
        wanted: Wanted = None,
        urgent: bool = False,
    ) -> Reply:
        lock = self._lock
        if self._unit_gap:
            await self._take(unit, code, urgent)
        elif not lock._held and not lock._parking:
            # The common case, kept short (it is the per-poll cost): an
            # uncontended bus is taken without a scheduler round-trip (the
            # exchange itself checkpoints on send and receive) and without
            # a call (BusLock.acquire_nowait, inlined).
            lock._held = True
        else:
            await lock.acquire(urgent=urgent)
        held = True
        self._urgent = urgent
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
                        reply_timeout
                        or (
                            self._unit_timeout.get(unit, self.timeout)
                            if self._unit_timeout
                            else self.timeout
                        ),
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
                if lock._parking:
                    lock.release()
                else:
                    lock._held = False  # BusLock.release, nobody waiting

    async def _take(self, unit: int, code: int, urgent: bool) -> None:
        unit_gap = self._unit_gap.get(unit)
        if not unit_gap:
            try:
                self._lock.acquire_nowait(urgent=urgent)
            except trio.WouldBlock:
                await self._lock.acquire(urgent=urgent)
            return
        is_write = code in codec.WRITE_FUNCTIONS
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

    async def _open(self, reply_timeout: float) -> None:
        """(Re)connect the link, within the request's deadline."""
        link = self.link
        try:
            # The bus is held meanwhile: the (re)connect gets the request's
            # own deadline, never the link's longer connect timeout alone.
            with trio.move_on_after(reply_timeout) as connecting:
                await link.open()
            if connecting.cancelled_caught:
                await link.aclose()
                raise Disconnected(f"connect timed out after {reply_timeout:g} s", where=self.where)
        except Disconnected:
            self.stats.disconnects += 1
            # Don't spin on a refused connection; the retry is one gap away
            # (unless this is an off-write, or one is waiting for the bus: its
            # caller paces its own attempts).
            if not (self._urgent or self._lock.urgent_waiting):
                await trio.sleep(max(self.gap, 0.05))
            raise
        self._buffer = b""
        self._dirty = False
        self._fast = None

    async def _exchange(
        self, unit: int, code: int, count: int, frame: bytes, reply_timeout: float
    ) -> Reply:
        link = self.link
        if not link.is_open:
            await self._open(reply_timeout)
        if self._dirty:
            await self._settle()
        gap = self.gap
        now = trio.current_time()
        if gap:
            ready_at = self._last_io + gap
            if ready_at > now:
                await self._wait_silence(ready_at)
                now = trio.current_time()
        unit_gap = self._unit_gap.get(unit) if self._unit_gap else None
        tid = self._tid = self._tid % 0xFFFF + 1
        if link.has_transaction_ids:
            # MBAP: the transaction id is the frame's first two bytes.
            frame = tid.to_bytes(2, "big") + frame[2:]
        else:
            link.discard_input()
        self._buffer = b""
        self._dirty = True
        self.stats.requests += 1
        reply: bytes | None = None
        self._last_send = now
        self._last_timeout = reply_timeout
        deadline = now + reply_timeout
        tcp = self._tcp
        if self._fast is None:
            # Decided once per connection (trio's clock is fixed for a run).
            self._fast = tcp is not None and tcp.waits_by_deadline and on_real_clock()
        try:
            if self._fast and tcp is not None:
                # The poll's hot path: the same deadline, kept by the link's
                # timer instead of a cancel scope (fieldbus.timer).
                data = await tcp.exchange_by(frame, deadline, now)
                while data is not None:
                    self._buffer += data
                    reply = self._tcp_reply(unit, tid)
                    if reply is not None:
                        break
                    data = await tcp.receive_by(deadline)
            else:
                # On RTU a request on the wire is finished, not aborted, when
                # its caller is cancelled (within its own deadline): an aborted
                # one leaves the line dirty, and the next request (the
                # switch-off's off-write, say) would first have to wait out the
                # whole reply timeout (``_settle``).
                with trio.CancelScope(deadline=deadline, shield=not link.has_transaction_ids):
                    await link.send(frame)
                    reply = await self._read_reply(unit, tid)
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
            # Only gaps count from here (without one, a poll skips the clock).
            if gap or unit_gap:
                self._last_io = trio.current_time()
                if unit_gap:
                    self._unit_last[unit] = self._last_io
        self._dirty = False
        if not link.has_transaction_ids:
            # The line's silence counts from the reply's last bytes coming in:
            # decoding it, and the caller's next request up to its wait, are
            # part of the silence, not added to it.
            self._last_io = self._reply_at
        # A complete frame, in sync: what it says is the device's answer, checked
        # against the request (function, count) by the codec.
        self.stats.replies += 1
        self._reply_pdu = reply
        try:
            return decode_reply(reply, code, count, link.where, unit)
        except FrameError:
            self.stats.frame_errors += 1
            raise
        except ExceptionReply:
            self.stats.exception_replies += 1
            raise

    async def _read_reply(self, unit: int, tid: int) -> bytes:
        """The reply's PDU, its frame found (and checked) by the codec; on TCP
        by ``_read_tcp_reply``."""
        if self.link.has_transaction_ids:
            return await self._read_tcp_reply(unit, tid)
        link = self.link
        self._buffer = await link.receive(wait_first=True)
        while True:
            # The line was busy until at least now: the next request's silence
            # runs from here (see _exchange), not from when decoding is done.
            self._reply_at = trio.current_time()
            while self._buffer:
                used, dev_id, pdu = codec.find_rtu_reply(self._buffer)
                if not used:
                    break
                self._buffer = self._buffer[used:]
                if not pdu:
                    raise FrameError(
                        f"corrupt reply from unit {unit} (CRC mismatch)", where=self.where
                    )
                if dev_id != unit:
                    # A late reply to an earlier, aborted request.
                    self.stats.stale_discarded += 1
                    continue
                return pdu
            self._buffer += await link.receive()

    async def _read_tcp_reply(self, unit: int, tid: int) -> bytes:
        """The reply's PDU on TCP, under the caller's cancel scope."""
        self._buffer = await self.link.receive(wait_first=True)
        while (pdu := self._tcp_reply(unit, tid)) is None:
            self._buffer += await self.link.receive()
        return pdu

    def _tcp_reply(self, unit: int, tid: int) -> bytes | None:
        """The reply's PDU if it is in the buffer (None: not all of it yet).

        MBAP frames are parsed here (what ``FramerSocket.decode`` and
        ``_check_mbap_header`` do, in one pass: a poll's hot path); a late reply
        to an earlier request (another transaction id) is thrown away.
        """
        buffer = self._buffer
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
            pdu = buffer[7:end]
            buffer = self._buffer = buffer[end:]
            if reply_tid != tid or dev_id != unit:
                # A late reply to an earlier, aborted request.
                self.stats.stale_discarded += 1
                continue
            return pdu
        return None

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
                self._fast = None
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
