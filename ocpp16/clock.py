"""The central system's time, as the charge point knows it.

OCPP 1.6 has the central system tell the time (BootNotification.conf and
Heartbeat.conf ``currentTime``, sections 4.2 and 4.6); a station without a
real-time clock may boot in 1970. ``CentralClock`` keeps the offset of the
central system's clock from the system clock and turns station times (taken
on the system clock) into the times sent.

OCPP 1.6 has no field for "this time is unreliable", so a time taken before
the central system set the clock is never sent as it is: ``stamp`` marks its
holder (a payload or a MeterValue, queued on disk meanwhile) with ``UNSYNCED``
and this boot's ``BOOT_ID``; ``prepare`` (just before sending) removes the
mark and corrects the time by the offset learned when the clock got set in
that same boot. A mark from an earlier boot cannot be corrected: that time is
sent as recorded, and logged as such.

No trio and no I/O: the system clock is a callable (a seam for tests).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from ocpp16.metering import format_time

log = logging.getLogger(__name__)

#: A queued payload's private marker: its timestamps were taken before the
#: central system set our clock, in the boot named by the value. Stripped
#: before sending (it is not part of any OCPP schema).
UNSYNCED = "_clockNotSet"
#: This boot, as ``UNSYNCED`` names it.
BOOT_ID = uuid.uuid4().hex

#: A new currentTime that moves the offset by more than this is a clock step:
#: the clock-aligned schedule is recomputed.
STEP = timedelta(seconds=1)


def _shifted(text: object, offset: timedelta) -> object:
    if not isinstance(text, str):
        return text
    return format_time(datetime.fromisoformat(text.replace("Z", "+00:00")) + offset)


class CentralClock:
    def __init__(self, wall_clock: Callable[[], datetime]) -> None:
        #: The system clock; station times are taken on it.
        self.wall_clock = wall_clock
        #: Offset of the central system's clock from ours (set from its answers).
        self.offset: timedelta | None = None
        #: The offset when the clock was first set in this boot: timestamps taken
        #: before that are moved by it when they are sent.
        self.synced_offset: timedelta | None = None

    def now(self) -> datetime:
        """Our best idea of the time: the central system's, once it told us."""
        now = self.wall_clock()
        return now + self.offset if self.offset is not None else now

    def set(self, current_time: object) -> bool:
        """Take a ``currentTime`` from the central system (ignored unless it is an
        RFC 3339 time with a zone). True when the offset was set for the first time
        or stepped by more than ``STEP``."""
        if not isinstance(current_time, str):
            return False
        try:
            theirs = datetime.fromisoformat(current_time.replace("Z", "+00:00"))
        except ValueError:
            return False
        if theirs.tzinfo is None:
            return False
        previous = self.offset
        self.offset = theirs - self.wall_clock()
        stepped = previous is None or abs(self.offset - previous) > STEP
        if self.synced_offset is None:
            self.synced_offset = self.offset
            log.info("clock set by the central system (offset %.3f s)", self.offset.total_seconds())
        return stepped

    def to_station(self, at: datetime) -> datetime:
        """A time in the central system's clock, back on the system clock."""
        return at - self.offset if self.offset else at

    def stamp(self, at: datetime, holder: dict[str, Any]) -> str:
        """A station (system clock) time for a message, in the central system's time;
        ``holder`` is marked ``UNSYNCED`` while the clock is not set."""
        if self.offset is not None:
            return format_time(at + self.offset)
        holder[UNSYNCED] = BOOT_ID
        return format_time(at)

    def prepare(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Strip the private clock markers, correcting what can be corrected."""
        holders = [payload]
        for key in ("meterValue", "transactionData"):
            holders += [v for v in payload.get(key) or () if isinstance(v, dict)]
        for holder in holders:
            boot = holder.pop(UNSYNCED, None)
            if boot is None:
                continue
            if boot == BOOT_ID and self.synced_offset is not None:
                holder["timestamp"] = _shifted(holder.get("timestamp"), self.synced_offset)
            else:
                log.warning(
                    "%s: a timestamp taken before the clock was set in an earlier "
                    "boot is sent as recorded",
                    action,
                )
        return payload
