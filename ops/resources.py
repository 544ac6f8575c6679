"""MemoryExhaustion (OCPP 1.6 Security Whitepaper ed. 3, critical): storage or
memory running out, told to the central system before it stops the station.

What runs out first on a gateway is the flash under the data directory (the
SQLite file with the transaction queue, the log files) and then RAM. A station
that cannot write its queue can no longer keep rule 2 of DEVELOPERS.md, so the
operator must hear of it while the link still works. ``ResourceWatch`` is the
rule, sans-I/O: it is given what is free and says when to raise the event:

* storage: fewer than ``MIN_FREE_DISK`` bytes free for the station's user in the
  data directory's file system (statvfs ``f_bavail``);
* memory: fewer than ``MIN_FREE_MEMORY`` bytes of ``MemAvailable``
  (/proc/meminfo, the kernel's estimate of what can be had without swapping).

Each is raised once when it falls below its floor and raised again only after it
has come back above twice the floor (a hysteresis, so a disk hovering at the
floor does not flood the queue: the event is critical and never dropped).
``watch`` is the trio task that samples every ``INTERVAL`` seconds (trio's clock),
the first sample at once, the readings in a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

log = logging.getLogger(__name__)

#: 8 MiB: what a day of transactions, the queue's backlog and one log rotation need.
MIN_FREE_DISK: Final = 8 * 1024 * 1024
#: 16 MiB of MemAvailable: below it the kernel is reclaiming the station's own pages.
MIN_FREE_MEMORY: Final = 16 * 1024 * 1024
INTERVAL: Final = 60.0
EVENT: Final = "MemoryExhaustion"


@dataclass(frozen=True, slots=True)
class Reading:
    """Free bytes, None where it could not be read (that check is skipped)."""

    disk: int | None
    memory: int | None


@dataclass
class ResourceWatch:
    min_disk: int = MIN_FREE_DISK
    min_memory: int = MIN_FREE_MEMORY
    _low: set[str] = field(default_factory=set)

    def observe(self, reading: Reading) -> list[str]:
        """The techInfo of each MemoryExhaustion to raise now (usually none)."""
        raised: list[str] = []
        for what, free, floor in (
            ("storage", reading.disk, self.min_disk),
            ("memory", reading.memory, self.min_memory),
        ):
            if free is None:
                continue
            if what not in self._low and free < floor:
                self._low.add(what)
                raised.append(f"{what}: {free // 1024} KiB free, below {floor // 1024} KiB")
            elif what in self._low and free >= 2 * floor:
                self._low.discard(what)
                log.info("%s: %d KiB free again", what, free // 1024)
        return raised


def read_meminfo(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, None without it (not Linux, an old kernel)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_free_disk(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def reader(directory: Path) -> Callable[[], Reading]:
    return lambda: Reading(read_free_disk(directory), read_meminfo())


async def watch(
    read: Callable[[], Reading],
    emit: Callable[[str, str], None],
    *,
    rule: ResourceWatch | None = None,
    interval: float = INTERVAL,
    in_thread: bool = True,
) -> None:
    """Sample every ``interval`` s forever; each finding raised with ``emit`` and
    logged as an error (the event is critical). ``in_thread=False`` reads in the
    trio thread (tests on a virtual clock, whose autojump would run past a worker)."""
    rule = rule or ResourceWatch()
    while True:
        reading = await trio.to_thread.run_sync(read) if in_thread else read()
        for tech_info in rule.observe(reading):
            log.error("%s: %s", EVENT, tech_info)
            emit(EVENT, tech_info)
        await trio.sleep(interval)


__all__ = [
    "EVENT",
    "INTERVAL",
    "MIN_FREE_DISK",
    "MIN_FREE_MEMORY",
    "Reading",
    "ResourceWatch",
    "watch",
]
