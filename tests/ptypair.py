"""Serial pairs for RTU tests, made of pseudo-terminals.

``PtyPair()`` is one pty: ``path`` is the end a serial user (pyserial, the
master under test) opens; ``master_fd`` is the other end, where a test plays
the device. ``bridged_ptys()`` joins two ptys back to back, for when both
ends must be opened by path (our master on one, pymodbus's serial server on
the other).

A pty ignores baud rate, parity and character timing: this tests framing,
CRC and the master's logic, not a line's electrical timing.
"""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import AsyncIterator
from types import TracebackType

import trio

_CHUNK = 4096


class PtyPair:
    """One pty in raw mode: ``path`` for the serial user, ``master_fd`` for the test."""

    def __init__(self) -> None:
        master, slave = os.openpty()
        # Raw on both ends: no echo, no CR/LF translation, no signals, 8 bits clean.
        tty.setraw(master)
        tty.setraw(slave)
        self.master_fd: int = master
        # Held open so the pty stays up while the serial user closes and reopens it.
        self.slave_fd: int = slave
        self.path: str = os.ttyname(slave)

    def device_stream(self) -> trio.lowlevel.FdStream:
        """A trio stream on (a duplicate of) the device end; close it yourself."""
        return trio.lowlevel.FdStream(os.dup(self.master_fd))

    def close_master(self) -> None:
        """Close the device end: the serial user's reads and writes then fail (EIO).

        Close any ``device_stream()`` too, or the pty stays up through it.
        """
        fd, self.master_fd = self.master_fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        self.close_master()
        fd, self.slave_fd = self.slave_fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _pump(source: trio.lowlevel.FdStream, sink: trio.lowlevel.FdStream) -> None:
    while data := await source.receive_some(_CHUNK):
        await sink.send_all(data)


@contextlib.asynccontextmanager
async def bridged_ptys() -> AsyncIterator[tuple[PtyPair, PtyPair]]:
    """Two ptys whose device ends are joined: what is written to one path is read on the other."""
    with PtyPair() as a, PtyPair() as b:
        stream_a, stream_b = a.device_stream(), b.device_stream()
        async with stream_a, stream_b, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, stream_a, stream_b)
            nursery.start_soon(_pump, stream_b, stream_a)
            yield a, b
            nursery.cancel_scope.cancel()
