"""Precise, cheap wake-ups at trio deadlines: a Linux timer descriptor trio waits on.

Two waits on the master's hot path are badly served by trio's own timers:

* the RTU inter-frame silence (t3.5, 3.65 ms at 9600 baud): trio's timers end
  in ``epoll_wait``, whose timeout CPython rounds *up* to whole milliseconds,
  so a timer alone oversleeps it by up to 1 ms, a quarter of the line's
  throughput; the master used to wait the last millisecond by yielding in a
  loop, which costs ~0.6 ms of CPU per request;
* the per-request reply deadline on Modbus TCP: a cancel scope per request is
  the largest single cost of a poll (entering and leaving one costs more CPU
  than the socket calls of the request itself).

A ``timerfd`` is armed in nanoseconds, and trio waits for it like for any
other descriptor (``wait_readable``): cancellable, no thread, no CPU burnt.
``ReadyOrDeadline`` puts a descriptor and such a timer into an epoll set of
their own, so a task waits for "data, or the deadline" in one trio wait,
without a cancel scope.

Deadlines stay on trio's clock: the timer is armed with what the clock itself
says is left (``Clock.deadline_to_sleep_time``), and every wake-up is judged
by ``trio.current_time()``, never by the timer. Only trio's own clock runs in
real time, so only there is the timer used (``on_real_clock``); under any
other clock (``MockClock`` in the tests: virtual time, autojumped to the next
trio deadline) callers use trio's own waits, whose virtual times stay exact.
Where there is no timerfd (not Linux), ``Timer.create`` gives None and callers
do the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import select
from collections.abc import Callable

import trio

try:
    # trio's default clock: time.perf_counter, which on Linux is CLOCK_MONOTONIC,
    # the clock the timer counts. Not public API: if it moves, nothing breaks,
    # the callers just take trio's own (less precise, costlier) waits.
    from trio._core._run import SystemClock as _SystemClock
except ImportError:  # pragma: no cover - another trio
    _SystemClock = None  # type: ignore[assignment,misc]

_CLOCK_MONOTONIC = 1
#: The longest an exact sleep waits by yielding (Timer.sleep_until): 8 % of the
#: t3.5 silence at 9600 baud, a sixth of the old 1 ms of yielding per request.
MAX_LEAD = 0.0003
_CFunc = Callable[..., int]
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _libc_timerfd() -> tuple[_CFunc, _CFunc] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    create.argtypes = (ctypes.c_int, ctypes.c_int)
    create.restype = ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _libc_timerfd()


def on_real_clock() -> bool:
    """Whether this trio run keeps real time (trio's default clock)."""
    return type(trio.lowlevel.current_clock()) is _SystemClock


class Timer:
    """One timer descriptor, armed at a trio deadline (on trio's real clock only)."""

    __slots__ = ("_fd", "_late", "_lead", "_ref", "_settime", "_spec", "armed_for")

    def __init__(self, fd: int, settime: _CFunc) -> None:
        self._fd = fd
        self._settime = settime
        self._spec = _Itimerspec()
        # One struct per timer, passed by reference: arming allocates nothing.
        self._ref = ctypes.addressof(self._spec)
        #: The trio deadline the timer fires at; inf when not armed. Once it has
        #: passed, the descriptor is readable until the timer is armed again.
        self.armed_for = math.inf
        # How late wake-ups come, and how early an exact sleep sets the timer.
        self._late = 0.0
        self._lead = 0.0

    @classmethod
    def create(cls) -> Timer | None:
        """A new timer, or None where the system has none (callers use trio's)."""
        if _TIMERFD is None or _SystemClock is None:  # pragma: no cover - not Linux
            return None
        create, settime = _TIMERFD
        fd = create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:  # pragma: no cover - out of descriptors, or a seccomp filter
            return None
        return cls(fd, settime)

    def fileno(self) -> int:
        return self._fd

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` (trio's clock, which must be the real one).

        Arming again resets the timer, so a descriptor left readable by an
        earlier expiry is quiet again until the new one.
        """
        left = trio.lowlevel.current_clock().deadline_to_sleep_time(deadline)
        # Measured now and armed relative to now: it fires at the deadline or a
        # few microseconds after, never before. A zero would disarm it: a
        # deadline already past fires at once instead.
        nanoseconds = max(1, math.ceil(left * 1e9))
        spec = self._spec.it_value
        spec.tv_sec, spec.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        if self._settime(self._fd, 0, self._ref, None) != 0:  # pragma: no cover
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.armed_for = deadline

    async def sleep_until(self, deadline: float, *, exact: bool = False) -> None:
        """``trio.sleep_until(deadline)``, woken within tens of microseconds of it
        rather than up to a millisecond late (call only on trio's real clock).

        ``exact``: also take out the wake-up's own latency. A task woken by a
        timer runs some time after it fires, more where the CPU has gone idle
        (about 0.1 ms in a virtual machine, a few microseconds on bare
        metal), so the timer is set that much early, as measured on the
        sleeps before (at most MAX_LEAD), and the rest is waited by yielding
        to the scheduler: a bounded busy wait where wake-ups are slow, none
        where they are prompt.
        """
        now = trio.current_time()
        if now >= deadline:
            await trio.lowlevel.checkpoint()
            return
        wake_at = deadline - self._lead if exact else deadline
        if now < wake_at:
            while now < wake_at:
                if not now < self.armed_for <= wake_at:
                    self.arm(wake_at)
                await trio.lowlevel.wait_readable(self._fd)
                # Fired (the descriptor stays readable until armed again);
                # whether the sleep is over is trio's clock's to say.
                self.armed_for = math.inf
                now = trio.current_time()
            if exact:
                # A running mean of how late wake-ups are; twice that is
                # early enough for most of them.
                self._late += (now - wake_at - self._late) / 8
                self._lead = min(MAX_LEAD, 2 * self._late)
        while trio.current_time() < deadline:
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _notify_closing(fd)
            os.close(fd)


def _notify_closing(fd: int) -> None:
    """Wake a task still waiting on ``fd`` (outside a trio run: nothing to wake)."""
    with contextlib.suppress(RuntimeError):
        trio.lowlevel.notify_closing(fd)


class ReadyOrDeadline:
    """Wait until a descriptor is readable or a trio deadline has passed, in one trio
    wait and without a cancel scope (module docstring).

    The descriptor and a ``Timer`` sit in an epoll set of their own
    (level-triggered), which is readable while either is; trio waits on the
    set. The timer is re-armed only when it would not fire by the deadline
    asked, so back-to-back requests with the same timeout share one arming and
    a poll costs no extra system call.
    """

    __slots__ = ("_epoll", "_timer", "fd")

    def __init__(self, epoll: select.epoll, timer: Timer) -> None:
        self._epoll = epoll
        self._timer = timer
        #: The set's descriptor: readable once the descriptor or the timer is.
        self.fd = epoll.fileno()

    @classmethod
    def create(cls, fd: int) -> ReadyOrDeadline | None:
        timer = Timer.create()
        if timer is None:  # pragma: no cover - not Linux
            return None
        epoll = select.epoll()
        try:
            epoll.register(fd, select.EPOLLIN)
            epoll.register(timer.fileno(), select.EPOLLIN)
        except OSError:  # pragma: no cover - an fd epoll cannot watch
            epoll.close()
            timer.close()
            return None
        return cls(epoll, timer)

    def fileno(self) -> int:
        return self.fd

    def arm(self, deadline: float, now: float) -> bool:
        """Make the set readable by ``deadline`` at the latest (``now`` is
        trio's time); False if it has passed already."""
        if now >= deadline:
            return False
        timer = self._timer
        if not now < timer.armed_for <= deadline:
            timer.arm(deadline)
        return True

    async def wait(self, deadline: float) -> bool:
        """True once the descriptor may be readable (a wake-up can be spurious:
        read, and on EAGAIN ask again); False once ``deadline`` has passed.

        A checkpoint either way. Call only on trio's real clock.
        """
        if not self.arm(deadline, trio.current_time()):
            await trio.lowlevel.checkpoint()
            return False
        await trio.lowlevel.wait_readable(self.fd)
        return True

    def close(self) -> None:
        _notify_closing(self._epoll.fileno())
        self._epoll.close()
        self._timer.close()


__all__ = ["ReadyOrDeadline", "Timer", "on_real_clock"]
