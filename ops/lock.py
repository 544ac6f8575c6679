"""One station per data directory and per board: locks held for the process's life.

Two ``evse run`` on one configuration would fight for the central system,
delete each other's control socket and switch each other's board off; two
on one board (different data directories) would each believe it owns the
contactor. So before it touches the store or the bus, a station takes:

* ``<data_dir>/station.lock``: the data directory (store, control socket);
* ``board-<port>-unit<N>.lock`` in the lock directory: the board, keyed by
  its port URL (host and port as written, or the serial device with its
  symlinks resolved) and unit;
* ``line-<device>.lock`` for every serial line it opens (board or meter):
  two processes on one RS-485 line garble each other's frames.

The lock directory is ``$EVSE_LOCK_DIR`` if set, else ``/run/lock/evse``
(created when ``/run/lock`` lets us; the systemd unit makes it with
``RuntimeDirectory=``), else the system temporary directory. Every station
of a host must agree on it, so an existing ``/run/lock/evse`` is used even
where it turns out to be unusable (then the start is refused, naming it).

A lock is ``flock(LOCK_EX | LOCK_NB)`` on the open file, with the holder's
pid written into it: the kernel releases it when the process ends however it
ends (kill -9 included), so a stale file never blocks a restart. The holder
deletes its file when it lets go (so ``--sim`` runs on ever new ports leave
nothing behind); a process that locked a file just deleted that way sees
that the path no longer names its file, and starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fieldbus.ports import RtuPort, TcpPort, parse_port

LOCK_DIR_ENV = "EVSE_LOCK_DIR"
SYSTEM_LOCK_DIR = Path("/run/lock/evse")
STATION_LOCK = "station.lock"


class LockError(Exception):
    """A lock could not be taken; ``str()`` is the one line an installer reads."""


class LockHeld(LockError):
    """Another process holds the lock: names what, the holder's pid and the file."""

    def __init__(self, what: str, path: Path, pid: int | None) -> None:
        self.what = what
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        super().__init__(f"{what} is in use by another station ({holder}; lock file {path})")


class LockUnusable(LockError):
    """The lock file cannot be opened or locked (permissions, a missing directory)."""

    def __init__(self, what: str, path: Path, reason: str) -> None:
        self.what = what
        self.path = path
        super().__init__(f"cannot lock {what}: {path}: {reason}")


def lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where board and serial-line locks go (see the module docstring)."""
    env = os.environ if environ is None else environ
    configured = env.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    if SYSTEM_LOCK_DIR.is_dir():
        return SYSTEM_LOCK_DIR
    with contextlib.suppress(OSError):
        SYSTEM_LOCK_DIR.mkdir()
        # Like /run/lock itself: any station user may lock, none may delete
        # another's file (sticky).
        SYSTEM_LOCK_DIR.chmod(0o1777)
        return SYSTEM_LOCK_DIR
    return Path(tempfile.gettempdir())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


@dataclass(frozen=True)
class Claim:
    """One thing a station must own alone: a description and its lock file."""

    what: str
    path: Path


def station_claims(
    data_dir: Path, board_port: str, board_unit: int, meter_port: str, directory: Path
) -> list[Claim]:
    """The locks a station takes, in the order it takes them (the same for all)."""
    claims = [Claim(f"data directory {data_dir}", data_dir / STATION_LOCK)]
    board = parse_port(board_port)
    if isinstance(board, TcpPort):
        key = f"tcp-{board.host.lower()}-{board.port}"
    else:
        key = "rtu-" + os.path.realpath(board.device)
    claims.append(
        Claim(
            f"board {board.url} unit {board_unit}",
            directory / f"evse-board-{_safe(key)}-unit{board_unit}.lock",
        )
    )
    lines: list[str] = []
    for port in (board, parse_port(meter_port)):
        if isinstance(port, RtuPort):
            device = os.path.realpath(port.device)
            if device not in lines:
                lines.append(device)
    claims += [
        Claim(f"serial line {device}", directory / f"evse-line-{_safe('rtu-' + device)}.lock")
        for device in lines
    ]
    return claims


def _holder(fd: int) -> int | None:
    """The pid recorded in a lock file (its holder writes it right after locking)."""
    for attempt in range(3):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if attempt < 2:
            time.sleep(0.05)
    return None


def _open(claim: Claim) -> tuple[int, bool]:
    """The lock file's descriptor, and whether we may write the pid into it."""
    try:
        return os.open(claim.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664), True
    except PermissionError:
        # Another user's file: flock works on a read-only descriptor too.
        try:
            return os.open(claim.path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError as exc:
            raise LockUnusable(claim.what, claim.path, exc.strerror or str(exc)) from None
    except OSError as exc:
        raise LockUnusable(claim.what, claim.path, exc.strerror or str(exc)) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _take(claim: Claim) -> int:
    for _ in range(10):
        fd = _take_once(claim)
        if fd is not None:
            return fd
    raise LockUnusable(claim.what, claim.path, "the lock file keeps being replaced")


def _take_once(claim: Claim) -> int | None:
    """The locked descriptor, or None when the file was deleted meanwhile (retry)."""
    fd, writable = _open(claim)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(claim.what, claim.path, _holder(fd)) from None
        except OSError as exc:
            raise LockUnusable(claim.what, claim.path, exc.strerror or str(exc)) from None
        if not _same_file(fd, claim.path):
            # Its holder deleted it between our open and our lock.
            os.close(fd)
            return None
        if writable:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:
                raise LockUnusable(claim.what, claim.path, exc.strerror or str(exc)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Locks:
    """Locks held; released by ``release`` (or by the kernel when the process ends)."""

    claims: list[Claim] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            claim = self.claims.pop()
            # Deleted while still locked, so nobody can lock this file after us
            # (see _take); closing the descriptor then releases the flock.
            with contextlib.suppress(OSError):
                if _same_file(fd, claim.path):
                    os.unlink(claim.path)
            os.close(fd)

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(claims: list[Claim]) -> Locks:
    """Take every claim, in order, or none: raises LockHeld / LockUnusable."""
    held = Locks()
    try:
        for claim in claims:
            held._fds.append(_take(claim))
            held.claims.append(claim)
    except BaseException:
        held.release()
        raise
    return held
