"""Byte links under the Modbus master: a TCP socket or a serial port, on trio.

These are the only places that touch sockets and file descriptors. They
translate OSError and pyserial's exceptions into fieldbus errors where they
enter, so the master sees ``Disconnected`` / ``PortConfigError`` only.

Both links do non-blocking I/O on the raw descriptor and wait with trio's
``wait_readable`` / ``wait_writable``: a read blocked on a silent device is
cancellable like any other trio wait, no threads are involved, and a poll
costs one scheduler round-trip (the higher-level trio streams add two more
checkpoints per request, which the polling benchmark showed). On trio's real
clock ``TcpLink.exchange_by`` also keeps the request's deadline without a
cancel scope: the socket and a timer descriptor sit in one epoll set
(``fieldbus.timer.ReadyOrDeadline``), and one wait ends on either.

The serial port is opened and configured by pyserial (baud, parity, stop
bits, exclusive lock); trio only reads and writes its descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import termios
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import serial
import trio

from fieldbus.errors import Disconnected, PortConfigError
from fieldbus.ports import PortSpec, RtuPort, TcpPort
from fieldbus.timer import ReadyOrDeadline

RECEIVE_CHUNK = 512
#: A TCP connect not answered within this long gets a fresh attempt beside it.
#: A SYN lost while a switch, a gateway or the device itself restarted is sent
#: again by the kernel only after its initial retransmission timeout of 1 s
#: (RFC 6298 section 2), then 3 s: one attempt per request would keep an
#: off-write waiting that long after the device is back. The earlier attempt
#: runs on, so a network slower than this still connects.
CONNECT_STAGGER = 0.1

_T = TypeVar("_T")


async def staggered(
    attempt: Callable[[], Awaitable[_T]],
    discard: Callable[[_T], None],
    *,
    stagger: float = CONNECT_STAGGER,
) -> _T:
    """The first success of ``attempt``, a new one started every ``stagger`` s
    while none has succeeded (happy eyeballs on one address, RFC 8305 idea).

    Raises the last ``Disconnected`` once every attempt started has failed (a
    refused connection fails at once: no spinning). Results that arrive after
    the first are passed to ``discard``. Attempts have no timeout of their
    own: the caller bounds the whole with its deadline.
    """
    won: list[_T] = []
    failures: list[Disconnected] = []
    running = 0
    settled = trio.Event()

    async def one() -> None:
        nonlocal running
        try:
            result = await attempt()
        except Disconnected as exc:
            failures.append(exc)
        else:
            if won:
                discard(result)
            else:
                won.append(result)
        finally:
            running -= 1
            settled.set()

    try:
        async with trio.open_nursery() as nursery:
            while not won:
                running += 1
                nursery.start_soon(one)
                with trio.move_on_after(stagger):
                    while not won and running:
                        settled = trio.Event()
                        await settled.wait()
                if not running:
                    break
            nursery.cancel_scope.cancel()
    except BaseException:
        for result in won:
            discard(result)
        raise
    if won:
        return won[0]
    raise failures[-1]


class Link(Protocol):
    """What the master needs from a byte link."""

    where: str
    #: Silence required between frames; 0 for TCP.
    frame_gap: float
    #: Whether replies carry a transaction id (MBAP) to match them by.
    has_transaction_ids: bool

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def receive(self, *, wait_first: bool = False) -> bytes:
        """Some bytes; ``wait_first`` skips the read attempt that would fail
        with EAGAIN right after a request was sent (a syscall and an exception
        saved per poll)."""
        ...

    def discard_input(self) -> None: ...

    async def aclose(self) -> None: ...


class TcpLink:
    """Modbus TCP: one socket, reopened by the master after a drop."""

    frame_gap = 0.0
    has_transaction_ids = True

    def __init__(self, port: TcpPort, *, connect_timeout: float = 3.0) -> None:
        self.port = port
        self.where = port.url
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        #: The socket and a reply timer in one descriptor (``receive_by``).
        self._ready: ReadyOrDeadline | None = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def waits_by_deadline(self) -> bool:
        """Whether ``exchange_by`` / ``receive_by`` can be used: open, with a
        timer (Linux); the caller checks that trio's clock is the real one."""
        return self._ready is not None

    async def open(self) -> None:
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await staggered(self._connect, _close_stream)
        except trio.TooSlowError:
            raise Disconnected(
                f"connect timed out after {self.connect_timeout:g} s", where=self.where
            ) from None
        # trio connected it (name resolution, happy eyeballs); take the bare
        # descriptor over for the cheap path described in the module docstring.
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        # Modbus requests are tiny; don't let Nagle hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._ready = ReadyOrDeadline.create(sock.fileno())

    async def _connect(self) -> trio.SocketStream:
        """One connect attempt (``open`` staggers them, within its timeout)."""
        try:
            return await trio.open_tcp_stream(self.port.host, self.port.port)
        except OSError as exc:
            raise Disconnected(f"cannot connect ({_reason(exc)})", where=self.where) from None

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise Disconnected("not connected", where=self.where)
        return self._sock

    async def send(self, data: bytes) -> None:
        sock = self._require()
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                await self.aclose()
                raise Disconnected(f"send failed ({_reason(exc)})", where=self.where) from None
            view = view[sent:]

    async def receive(self, *, wait_first: bool = False) -> bytes:
        sock = self._require()
        if wait_first:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                raise Disconnected("connection closed", where=self.where) from None
        while True:
            try:
                data = sock.recv(RECEIVE_CHUNK)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    raise Disconnected("connection closed", where=self.where) from None
                continue
            except OSError as exc:
                await self.aclose()
                raise Disconnected(f"receive failed ({_reason(exc)})", where=self.where) from None
            if not data:
                await self.aclose()
                raise Disconnected("connection closed by the device", where=self.where)
            return data

    # The master's hot path, on trio's real clock: a request's deadline without a
    # cancel scope per request (the largest CPU cost of a poll: see
    # fieldbus.timer). Cancellation from outside works as for any trio wait.

    async def exchange_by(self, request: bytes, deadline: float, now: float) -> bytes | None:
        """Send ``request`` and return the first bytes of its reply, or None once
        trio's clock has passed ``deadline`` (``now``: trio's time).

        A request is a dozen bytes and one is in flight at a time, so the
        socket takes it at once: one system call; only a peer that stops
        reading makes the send wait, under the same deadline. Nothing has
        arrived right after a request, so the first read waits first.
        """
        sock = self._sock
        if sock is None:
            raise Disconnected("not connected", where=self.where)
        try:
            sent = sock.send(request)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            await self.aclose()
            raise Disconnected(f"send failed ({_reason(exc)})", where=self.where) from None
        if sent < len(request):
            with trio.move_on_at(deadline):
                await self.send(request[sent:])
                sent = len(request)
            if sent < len(request):
                return None
            now = trio.current_time()
        ready = self._ready
        if ready is None:  # pragma: no cover - no timer here: see waits_by_deadline
            with trio.move_on_at(deadline):
                return await self.receive(wait_first=True)
            return None
        if not ready.arm(deadline, now):
            await trio.lowlevel.checkpoint()
            return None
        try:
            await trio.lowlevel.wait_readable(ready.fd)
        except trio.ClosedResourceError:
            raise Disconnected("connection closed", where=self.where) from None
        data = self._recv_nowait(sock)
        if data is None:
            # The timer, not the socket (the deadline, or an earlier one it was
            # armed for): the rest is receive_by's.
            return await self._read_by(sock, ready, deadline)
        return data

    async def receive_by(self, deadline: float) -> bytes | None:
        """Some bytes, or None once trio's clock has passed ``deadline``."""
        sock = self._require()
        ready = self._ready
        if ready is None:  # pragma: no cover - no timer here: see waits_by_deadline
            with trio.move_on_at(deadline):
                return await self.receive()
            return None
        return await self._read_by(sock, ready, deadline)

    async def _read_by(
        self, sock: socket.socket, ready: ReadyOrDeadline, deadline: float
    ) -> bytes | None:
        while (data := self._recv_nowait(sock)) is None:
            # Nothing yet, or the timer fired for an earlier deadline: wait,
            # unless this one has passed.
            try:
                if not await ready.wait(deadline):
                    return None
            except trio.ClosedResourceError:
                raise Disconnected("connection closed", where=self.where) from None
        return data

    def _recv_nowait(self, sock: socket.socket) -> bytes | None:
        """What has arrived, None if nothing has; a dead connection is closed
        and reported as Disconnected."""
        try:
            data = sock.recv(RECEIVE_CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._drop()
            raise Disconnected(f"receive failed ({_reason(exc)})", where=self.where) from None
        if not data:
            self._drop()
            raise Disconnected("connection closed by the device", where=self.where)
        return data

    def discard_input(self) -> None:
        # Stale replies on TCP are told apart by their transaction id.
        return

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self._drop()
        await trio.lowlevel.checkpoint_if_cancelled()


class SerialLink:
    """Modbus RTU on a serial port: pyserial configures, trio waits on the descriptor."""

    has_transaction_ids = False

    def __init__(self, port: RtuPort) -> None:
        self.port = port
        self.where = port.url
        self.frame_gap = port.frame_gap
        self._serial: serial.Serial | None = None
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    async def open(self) -> None:
        parity = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
        stopbits = {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}
        # An RtuPort built without parse_port() is unchecked: refuse it here
        # rather than let a KeyError out.
        if self.port.parity not in parity:
            raise PortConfigError(
                f"parity={self.port.parity!r} is not one of N, E, O", where=self.where
            )
        if self.port.stopbits not in stopbits:
            raise PortConfigError(f"stopbits={self.port.stopbits} is not 1 or 2", where=self.where)
        ser: serial.Serial | None = None
        try:
            ser = serial.Serial(
                port=None,
                baudrate=self.port.baud,
                bytesize=serial.EIGHTBITS,
                parity=parity[self.port.parity],
                stopbits=stopbits[self.port.stopbits],
                timeout=0,
                exclusive=True,
            )
            ser.port = self.port.device
            ser.open()
            fd = ser.fileno()
            # pyserial leaves VMIN=0, under which a read with no data returns b""
            # (indistinguishable from end-of-file). VMIN=1 on a non-blocking fd
            # gives EAGAIN instead, which trio turns into a wait for readability.
            attrs = termios.tcgetattr(fd)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            os.set_blocking(fd, False)
        except (ValueError, serial.SerialException, OSError, termios.error) as exc:
            # Opened but not configurable: don't leak the descriptor or the lock.
            if ser is not None:
                with contextlib.suppress(serial.SerialException, OSError):
                    ser.close()
            if isinstance(exc, ValueError):
                raise PortConfigError(f"cannot configure port ({exc})", where=self.where) from None
            raise Disconnected(
                f"cannot open serial port ({_reason(exc)})", where=self.where
            ) from None
        self._serial = ser
        self._fd = fd
        self.discard_input()
        await trio.lowlevel.checkpoint()

    def _require(self) -> int:
        if self._fd is None:
            raise Disconnected("serial port not open", where=self.where)
        return self._fd

    async def send(self, data: bytes) -> None:
        fd = self._require()
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:
                await self.aclose()
                raise Disconnected(
                    f"serial write failed ({_reason(exc)})", where=self.where
                ) from None
            view = view[written:]

    async def receive(self, *, wait_first: bool = False) -> bytes:
        fd = self._require()
        if wait_first:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                raise Disconnected("serial port closed", where=self.where) from None
        while True:
            try:
                data = os.read(fd, RECEIVE_CHUNK)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    raise Disconnected("serial port closed", where=self.where) from None
                continue
            except OSError as exc:
                # EIO: a USB adapter unplugged, or the far end of a pty closed.
                await self.aclose()
                raise Disconnected(
                    f"serial read failed ({_reason(exc)})", where=self.where
                ) from None
            if not data:
                await self.aclose()
                raise Disconnected("serial port closed", where=self.where)
            return data

    def discard_input(self) -> None:
        """Drop whatever the driver has buffered: a late reply to an aborted request,
        noise on the idle line. Before every request, so straight to the call
        pyserial's ``reset_input_buffer`` makes, without its wrapping."""
        if self._fd is not None:
            try:
                termios.tcflush(self._fd, termios.TCIFLUSH)
            except (OSError, termios.error):
                # A vanished port; the next read reports it as Disconnected.
                return

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        ser, self._serial = self._serial, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
        if ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()
        await trio.lowlevel.checkpoint_if_cancelled()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def make_link(port: PortSpec) -> Link:
    if isinstance(port, TcpPort):
        return TcpLink(port)
    return SerialLink(port)


def _close_stream(stream: trio.SocketStream) -> None:
    """A connection that lost the race: closed at once (no checkpoint needed)."""
    stream.socket.close()
