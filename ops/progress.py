"""Progress of long transfers (a firmware download, a log upload), for the log and ``evse status``.

A transfer of tens of megabytes over a gateway's cellular link takes minutes;
an operator must see that it moves, without a log line per chunk. A
``Transfer`` counts bytes and reports them:

* to the log, at most once every ``interval`` seconds (and at the start and
  the end), as ``firmware download: 1.5 of 12.0 MB (12 %), 48.2 kB/s``;
* as a state (``snapshot()``: name, bytes, total, percent, rate, state,
  reason), which the control socket's ``GET /status`` shows under
  ``transfers`` and ``evse status`` prints.

Time is trio's clock (``trio.current_time``) unless a ``now`` is given: the
intervals and the rate are durations, never wall time. The counting itself is
pure (``now`` an argument), so it is tested without a clock.

``Transfers`` is the registry a station holds: one entry per running
transfer, the finished ones kept until replaced (the last outcome stays
visible) and at most ``keep`` of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import trio

log = logging.getLogger(__name__)

#: Log at most this often while a transfer runs (seconds).
LOG_INTERVAL = 10.0


class State(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ProgressError(ValueError):
    """A transfer used wrongly: a negative count, more bytes than its total, a finished one."""


def _now() -> float:
    return trio.current_time()


def size(n: float) -> str:
    """Bytes for people: ``512 B``, ``48.2 kB``, ``12.0 MB`` (SI, as link speeds are)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


class Transfer:
    """One transfer's bytes so far, against its total when known."""

    def __init__(
        self,
        name: str,
        total: int | None,
        *,
        interval: float = LOG_INTERVAL,
        now: float | None = None,
        clock: Callable[[], float] = _now,
        logger: logging.Logger = log,
    ) -> None:
        if total is not None and total < 0:
            raise ProgressError(f"{name}: total {total} is negative")
        if not (math.isfinite(interval) and interval > 0):
            raise ProgressError(f"{name}: log interval {interval!r} is not a positive number")
        self.name = name
        self.total = total
        self.done = 0
        self.state = State.RUNNING
        self.reason = ""
        self._interval = interval
        self._clock = clock
        self._log = logger
        self.started = clock() if now is None else now
        self.ended: float | None = None
        self._last_log = self.started
        #: How many progress lines were logged (start and end included).
        self.lines = 0
        self._report(logging.INFO, f"{self.name}: started" + self._of_total())

    # -- the transfer's side ---------------------------------------------------

    def advance(self, nbytes: int, now: float | None = None) -> None:
        """``nbytes`` more arrived (or went out); logged if the interval has passed."""
        if self.state is not State.RUNNING:
            raise ProgressError(f"{self.name}: already {self.state.value}")
        if nbytes < 0:
            raise ProgressError(f"{self.name}: {nbytes} bytes is negative")
        if self.total is not None and self.done + nbytes > self.total:
            raise ProgressError(
                f"{self.name}: {self.done + nbytes} bytes is more than the total {self.total}"
            )
        self.done += nbytes
        at = self._clock() if now is None else now
        if at - self._last_log >= self._interval:
            self._last_log = at
            self._report(logging.INFO, f"{self.name}: {self._amount(at)}")

    def finish(self, now: float | None = None) -> None:
        """Complete; a transfer with a total must have all of it."""
        if self.state is not State.RUNNING:
            raise ProgressError(f"{self.name}: already {self.state.value}")
        if self.total is not None and self.done != self.total:
            raise ProgressError(f"{self.name}: finished at {self.done} of {self.total} bytes")
        self.ended = self._clock() if now is None else now
        self.state = State.DONE
        self._report(logging.INFO, f"{self.name}: done, {self._amount(self.ended)}")

    def fail(self, reason: str, now: float | None = None) -> None:
        """It ended without completing (the link dropped, a checksum failed)."""
        if self.state is not State.RUNNING:
            raise ProgressError(f"{self.name}: already {self.state.value}")
        self.ended = self._clock() if now is None else now
        self.state = State.FAILED
        self.reason = reason
        self._report(
            logging.WARNING, f"{self.name}: failed at {self._amount(self.ended)}: {reason}"
        )

    # -- what is shown -------------------------------------------------------

    @property
    def percent(self) -> float | None:
        if self.total is None:
            return None
        if self.total == 0:
            return 100.0
        return 100.0 * self.done / self.total

    def rate(self, now: float | None = None) -> float | None:
        """Bytes per second since the start (None before any time passed)."""
        at = self.ended if self.ended is not None else (self._clock() if now is None else now)
        elapsed = at - self.started
        return self.done / elapsed if elapsed > 0 else None

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        rate = self.rate(now)
        percent = self.percent
        return {
            "name": self.name,
            "state": self.state.value,
            "bytes": self.done,
            "total": self.total,
            "percent": None if percent is None else round(percent, 1),
            "rate_bps": None if rate is None else round(rate, 1),
            "reason": self.reason or None,
        }

    def _of_total(self) -> str:
        return "" if self.total is None else f", {size(self.total)}"

    def _amount(self, now: float) -> str:
        text = size(self.done)
        if self.total is not None:
            percent = self.percent
            assert percent is not None
            text += f" of {size(self.total)} ({percent:.0f} %)"
        rate = self.rate(now)
        if rate is not None:
            text += f", {size(rate)}/s"
        return text

    def _report(self, level: int, message: str) -> None:
        self.lines += 1
        self._log.log(level, "%s", message)


class Transfers:
    """The station's transfers, by name: what ``GET /status`` shows under ``transfers``."""

    def __init__(self, keep: int = 4, clock: Callable[[], float] = _now) -> None:
        self._keep = keep
        self._clock = clock
        self._items: dict[str, Transfer] = {}

    def start(
        self,
        name: str,
        total: int | None,
        *,
        interval: float = LOG_INTERVAL,
        now: float | None = None,
    ) -> Transfer:
        """A new transfer under ``name``; one still running under it is refused."""
        old = self._items.get(name)
        if old is not None and old.state is State.RUNNING:
            raise ProgressError(f"{name}: a transfer of that name is running")
        transfer = Transfer(name, total, interval=interval, now=now, clock=self._clock)
        self._items.pop(name, None)
        self._items[name] = transfer
        # Forget the oldest finished ones beyond ``keep``; running ones always stay.
        finished = [n for n, t in self._items.items() if t.state is not State.RUNNING]
        for old_name in finished[: max(0, len(self._items) - self._keep)]:
            del self._items[old_name]
        return transfer

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        return [t.snapshot(now) for t in self._items.values()]
