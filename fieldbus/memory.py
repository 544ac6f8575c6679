"""An in-memory byte link: the master talks to an in-process Modbus server on trio's clock.

``MemoryLink`` implements ``fieldbus.links.Link`` without a socket or a file
descriptor. Every ``open()`` makes a fresh pair of byte pipes (what
``trio.testing.memory_stream_pair`` gives, plus a wire model) and starts the
server's ``serve_stream`` on the far end, in a nursery the caller owns; the
master sees a connection that can be refused, dropped and re-opened like a
TCP socket or a serial port.

The wire is modelled on trio's clock, in both directions (``WireTiming``):

* RTU: each byte takes the port's character time (start, data, parity and
  stop bits over the baud rate: ``RtuPort.char_time``); a frame arrives when
  its last byte has been sent, and a second frame queued behind a first one
  waits for the line. The device answers ``turnaround`` after the last byte
  of the request arrived (default 2 ms).
* TCP: a frame arrives ``latency`` after it was sent (default 0.2 ms, one
  way), the reply likewise, after the device's ``turnaround`` (default 0);
  ``open()`` takes one round trip (the handshake).

So under ``trio.testing.MockClock(autojump_threshold=0)`` one RTU read of N
holding registers at 9600 baud 8N1 takes exactly
``8 x 10/9600 + turnaround + (5 + 2N) x 10/9600`` after the master's t3.5
silence, and nothing here depends on wall time. ``pdu_sizes`` and
``WireTiming.exchange_time`` give those figures for any request.

Faults, for reconnect tests (settable at any time):

* a unit that does not answer: the server's own ``responding`` (the simulator's
  ``board_silent`` / ``meter_silent``); the link is not involved;
* ``refuse``: ``open()`` raises ``Disconnected`` at once (TCP: connection
  refused; RTU: no such serial device);
* ``unreachable``: a TCP connect attempt made meanwhile waits
  ``connect_timeout`` and then raises ``Disconnected``, as ``TcpLink`` does for
  a host that never answers (a lost SYN); attempts are staggered as
  ``TcpLink.open`` staggers them (``fieldbus.links.staggered``), so one started
  after the link is back gets through (an RTU port is local: there it acts as
  ``refuse``);
* ``drop()``: the far end closes every open connection now (TCP: the peer
  closed; RTU: the adapter vanished); frames still on the wire are lost, the
  master's pending read raises ``Disconnected``, the next request re-opens;
* ``reply_delay``: extra seconds added to the device's turnaround (slow replies).

Not modelled: RS-485 collisions (the two directions are independent wires),
bytes arriving in pieces, corrupt bytes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from fieldbus.errors import Disconnected
from fieldbus.links import staggered
from fieldbus.ports import PortSpec, RtuPort, TcpPort

#: Bytes an ADU adds to a PDU: unit id + CRC-16 (RTU), MBAP header (TCP).
RTU_OVERHEAD = 3
TCP_OVERHEAD = 7

#: Default device turnaround on a serial line (request received -> reply starts).
RTU_TURNAROUND = 0.002
#: Default one-way latency of a Modbus TCP frame.
TCP_LATENCY = 0.0002


def pdu_sizes(function_code: int, count: int = 1) -> tuple[int, int]:
    """(request, reply) PDU lengths in bytes of a successful request.

    ``count`` is the number of registers or bits read or written (Modbus
    Application Protocol V1.1b3, section 6).
    """
    match function_code:
        case 1 | 2:
            return 5, 2 + (count + 7) // 8
        case 3 | 4:
            return 5, 2 + 2 * count
        case 5 | 6:
            return 5, 5
        case 15:
            return 6 + (count + 7) // 8, 5
        case 16:
            return 6 + 2 * count, 5
    raise ValueError(f"no size known for function {function_code}")


@dataclass(frozen=True, slots=True)
class WireTiming:
    """How long a frame takes between master and device, on trio's clock."""

    #: Seconds per byte on the line (0 on TCP).
    char_time: float = 0.0
    #: One-way delay of a frame after its last byte was sent.
    latency: float = 0.0
    #: The device's time from a request's last byte to the first byte of its reply.
    turnaround: float = 0.0
    #: Time ``open()`` takes when the peer accepts.
    connect: float = 0.0
    #: ADU bytes around a PDU (unit id + CRC on RTU, MBAP on TCP).
    overhead: int = TCP_OVERHEAD

    @classmethod
    def for_port(
        cls,
        port: PortSpec,
        *,
        turnaround: float | None = None,
        latency: float | None = None,
    ) -> WireTiming:
        """RTU: the port's character time, 2 ms turnaround; TCP: 0.2 ms latency each way."""
        if isinstance(port, RtuPort):
            return cls(
                char_time=port.char_time,
                latency=0.0 if latency is None else latency,
                turnaround=RTU_TURNAROUND if turnaround is None else turnaround,
                overhead=RTU_OVERHEAD,
            )
        one_way = TCP_LATENCY if latency is None else latency
        return cls(
            latency=one_way,
            turnaround=0.0 if turnaround is None else turnaround,
            connect=2 * one_way,
            overhead=TCP_OVERHEAD,
        )

    def frame_time(self, nbytes: int) -> float:
        """From the first byte sent to the last byte arrived, for a frame of ``nbytes``."""
        return nbytes * self.char_time + self.latency

    def exchange_time(self, request_pdu: int, reply_pdu: int) -> float:
        """From the master's send to its reply complete (PDU lengths, as ``pdu_sizes``)."""
        return (
            self.frame_time(request_pdu + self.overhead)
            + self.turnaround
            + self.frame_time(reply_pdu + self.overhead)
        )


class StreamServer(Protocol):
    """What the far end runs on each connection (``fieldbus.server.ModbusServer``)."""

    async def serve_stream(self, stream: trio.abc.Stream, *, rtu: bool) -> None: ...


Spawn = Callable[[Callable[[], Awaitable[None]]], object]


class _Wire:
    """One direction: frames queued with the virtual time they arrive."""

    __slots__ = ("_busy_until", "_chunks", "_lot", "char_time", "eof", "latency", "reader_closed")

    def __init__(self, char_time: float, latency: float) -> None:
        self.char_time = char_time
        self.latency = latency
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._busy_until = -math.inf
        self._lot = trio.lowlevel.ParkingLot()
        #: The sender closed: the reader gets b"" once the wire is empty.
        self.eof = False
        #: The reader's own end was closed: its waits raise ClosedResourceError.
        self.reader_closed = False

    def put(self, data: bytes, *, after: float = 0.0) -> None:
        """Send ``data``: it starts once the line is free and ``after`` seconds have passed."""
        start = max(trio.current_time() + after, self._busy_until)
        end = start + len(data) * self.char_time
        self._busy_until = end
        self._chunks.append((end + self.latency, bytes(data)))
        self._lot.unpark_all()

    def close_sender(self) -> None:
        self.eof = True
        self._lot.unpark_all()

    def close_reader(self) -> None:
        self.reader_closed = True
        self._chunks.clear()
        self._lot.unpark_all()

    def sever(self) -> None:
        """The connection is gone: what is on the wire is lost, the reader sees the end."""
        self._chunks.clear()
        self.close_sender()

    def discard_arrived(self) -> None:
        now = trio.current_time()
        while self._chunks and self._chunks[0][0] <= now:
            self._chunks.popleft()

    def _take(self, max_bytes: int | None) -> bytes:
        now = trio.current_time()
        parts: list[bytes] = []
        size = 0
        while self._chunks and self._chunks[0][0] <= now:
            at, chunk = self._chunks[0]
            if max_bytes is not None and size + len(chunk) > max_bytes:
                keep = max_bytes - size
                if keep > 0:
                    parts.append(chunk[:keep])
                    self._chunks[0] = (at, chunk[keep:])
                break
            parts.append(chunk)
            size += len(chunk)
            self._chunks.popleft()
        return b"".join(parts)

    async def get(self, max_bytes: int | None = None) -> bytes:
        """The bytes arrived by now (waiting for the next frame if none); b"" at the end."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self.reader_closed:
                raise trio.ClosedResourceError("this end was closed")
            data = self._take(max_bytes)
            if data or (self.eof and not self._chunks):
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            waited = True
            if self._chunks:
                with trio.move_on_at(self._chunks[0][0]):
                    await self._lot.park()
            else:
                await self._lot.park()


class _DeviceEnd(trio.abc.Stream):
    """The far end of one connection, as the server sees it."""

    def __init__(self, connection: _Connection) -> None:
        self._c = connection

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        c = self._c
        if c.to_master.eof:
            raise trio.ClosedResourceError("the device's end was closed")
        if c.to_master.reader_closed:
            raise trio.BrokenResourceError("the master closed the connection")
        c.to_master.put(bytes(data), after=c.turnaround())
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._c.to_device.get(max_bytes)

    async def aclose(self) -> None:
        self._c.close_device_end()
        await trio.lowlevel.checkpoint()


class _Connection:
    def __init__(self, link: MemoryLink) -> None:
        t = link.timing
        self._link = link
        self.to_device = _Wire(t.char_time, t.latency)
        self.to_master = _Wire(t.char_time, t.latency)
        self.device_end = _DeviceEnd(self)

    def turnaround(self) -> float:
        return self._link.timing.turnaround + self._link.reply_delay

    def close_device_end(self) -> None:
        self.to_master.close_sender()
        self.to_device.close_reader()

    def close_master_end(self) -> None:
        self.to_device.close_sender()
        self.to_master.close_reader()

    def sever(self) -> None:
        self.to_master.sever()
        self.to_device.close_reader()


class MemoryLink:
    """A ``Link`` to ``server`` in this process; see the module docstring."""

    def __init__(
        self,
        port: PortSpec,
        server: StreamServer,
        spawn: trio.Nursery | Spawn,
        *,
        timing: WireTiming | None = None,
        connect_timeout: float = 3.0,
    ) -> None:
        self.port = port
        self.where = port.url
        self.server = server
        self._spawn: Spawn = spawn.start_soon if isinstance(spawn, trio.Nursery) else spawn
        self.timing = timing or WireTiming.for_port(port)
        self.connect_timeout = connect_timeout
        self.rtu = isinstance(port, RtuPort)
        self.has_transaction_ids = isinstance(port, TcpPort)
        self.frame_gap = port.frame_gap if isinstance(port, RtuPort) else 0.0
        #: Faults, settable at any time (module docstring).
        self.refuse = False
        self.unreachable = False
        self.reply_delay = 0.0
        #: Successful opens so far (the first connect and every reconnect).
        self.opens = 0
        self._conn: _Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._conn is not None:
            # A re-open replaces the connection, as TcpLink.open does.
            self._conn.close_master_end()
            self._conn = None
        if self.refuse or (self.unreachable and self.rtu):
            await trio.lowlevel.cancel_shielded_checkpoint()
            reason = (
                "cannot open serial port (ENOENT: No such file or directory)"
                if self.rtu
                else "cannot connect (ECONNREFUSED: Connection refused)"
            )
            raise Disconnected(reason, where=self.where)
        # TCP connects are staggered as TcpLink.open staggers them: an attempt
        # made while unreachable stays lost (as a dropped SYN), a later one
        # gets through once the device is back.
        if self.rtu:
            conn = await self._connect()
        else:
            try:
                with trio.fail_after(self.connect_timeout):
                    conn = await staggered(self._connect, _Connection.close_master_end)
            except trio.TooSlowError:
                raise Disconnected(
                    f"connect timed out after {self.connect_timeout:g} s", where=self.where
                ) from None
        self._conn = conn
        self.opens += 1
        server, end, rtu = self.server, conn.device_end, self.rtu

        async def serve() -> None:
            await server.serve_stream(end, rtu=rtu)

        self._spawn(serve)

    async def _connect(self) -> _Connection:
        if self.unreachable:
            await trio.sleep_forever()  # a lost SYN: only the caller's timeout ends it
        if self.timing.connect > 0:
            await trio.sleep(self.timing.connect)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return _Connection(self)

    def drop(self) -> None:
        """The far end goes away now (module docstring)."""
        conn = self._conn
        if conn is not None:
            conn.sever()

    def _require(self) -> _Connection:
        if self._conn is None:
            raise Disconnected("not connected", where=self.where)
        return self._conn

    async def send(self, data: bytes) -> None:
        conn = self._require()
        await trio.lowlevel.checkpoint_if_cancelled()
        if conn.to_device.reader_closed:
            await self.aclose()
            raise Disconnected("send failed (EPIPE: Broken pipe)", where=self.where)
        conn.to_device.put(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self, *, wait_first: bool = False) -> bytes:
        conn = self._require()
        try:
            data = await conn.to_master.get()
        except trio.ClosedResourceError:
            raise Disconnected("connection closed", where=self.where) from None
        if not data:
            await self.aclose()
            raise Disconnected("connection closed by the device", where=self.where)
        return data

    def discard_input(self) -> None:
        # As the real links: RTU drops what the driver has buffered (bytes still
        # on the wire arrive later); on TCP the transaction id sorts replies out.
        if self.rtu and self._conn is not None:
            self._conn.to_master.discard_arrived()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close_master_end()
        await trio.lowlevel.checkpoint_if_cancelled()


__all__ = ["MemoryLink", "StreamServer", "WireTiming", "pdu_sizes"]
