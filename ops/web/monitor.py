"""What the web page remembers about the station: recent faults and the power plot.

The rings are sans-I/O: the web service's sampler (ops/web/server.py) hands
each ``Station.view()`` in with the time; nothing here reads a clock. ``WebState``
is what the sampler, the app and /metrics share.

* ``FaultLog``: a bounded ring of fault transitions (raised / cleared, with the
  wall time the sampler saw them) and a count of each fault raised, for the
  page and the ``evse_faults_total`` metric. The station keeps only the faults
  active now; the page must show the recent ones too.
* ``PowerPlot``: power and offered current, one point every few seconds,
  over the last hour (a ring trimmed by age) and over the current session (a
  list that halves its resolution when full, so a session of any length fits
  in a bounded number of points).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from typing import Any, Final, Literal

import trio

#: Fault transitions kept for the page.
FAULT_RING: Final = 50
#: Points of the session plot before it halves its resolution.
SESSION_POINTS: Final = 720


@dataclass(frozen=True)
class FaultEvent:
    at: datetime
    fault: str
    change: Literal["raised", "cleared"]
    info: str

    def to_json(self) -> dict[str, str]:
        return {
            "at": self.at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "fault": self.fault,
            "change": self.change,
            "info": self.info,
        }


class FaultLog:
    def __init__(self, size: int = FAULT_RING) -> None:
        self.events: deque[FaultEvent] = deque(maxlen=size)
        self.counts: dict[str, int] = {}
        self.active: dict[str, str] = {}
        #: Bumped on every transition: the page's stream sends the ring again.
        self.version = 0

    def update(self, faults: Mapping[str, Any], at: datetime) -> bool:
        """Record what changed since the last view; True if anything did."""
        now = {str(name): _info_text(info) for name, info in faults.items()}
        changed = False
        for name, info in now.items():
            if name not in self.active:
                self.events.append(FaultEvent(at, name, "raised", info))
                self.counts[name] = self.counts.get(name, 0) + 1
                changed = True
        for name, info in self.active.items():
            if name not in now:
                self.events.append(FaultEvent(at, name, "cleared", info))
                changed = True
        self.active = now
        if changed:
            self.version += 1
        return changed

    def recent(self) -> list[FaultEvent]:
        """Newest first."""
        return list(reversed(self.events))


def _info_text(info: Any) -> str:
    if info is None:
        return ""
    if isinstance(info, Mapping):
        return ", ".join(f"{k}={v}" for k, v in info.items())
    return str(info)


@dataclass(frozen=True)
class Point:
    #: Seconds since the epoch (wall time: the browser draws against its clock).
    t: float
    power_w: float | None
    offered_a: float
    transaction: int | None

    def to_json(self) -> list[Any]:
        power = None if self.power_w is None else round(self.power_w, 1)
        return [round(self.t, 1), power, round(self.offered_a, 2), self.transaction]


class PowerPlot:
    def __init__(
        self,
        *,
        interval: float = 5.0,
        history: float = 3600.0,
        session_points: int = SESSION_POINTS,
    ) -> None:
        self.interval = interval
        self.history = history
        self.session_points = session_points
        self.hour: deque[Point] = deque(maxlen=int(history / interval) + 2)
        self.session: list[Point] = []
        self.session_tx: int | None = None
        self._session_stride = 1
        self._session_skipped = 0
        #: Bumped on every point added.
        self.version = 0

    def add(self, point: Point) -> None:
        self.hour.append(point)
        while self.hour and self.hour[0].t < point.t - self.history:
            self.hour.popleft()
        if point.transaction is not None:
            if point.transaction != self.session_tx:
                # A new session: its plot starts empty at full resolution.
                self.session_tx = point.transaction
                self.session = []
                self._session_stride = 1
                self._session_skipped = 0
            self._add_session(point)
        self.version += 1

    def _add_session(self, point: Point) -> None:
        self._session_skipped += 1
        if self._session_skipped < self._session_stride:
            return
        self._session_skipped = 0
        self.session.append(point)
        if len(self.session) > self.session_points:
            self.session = self.session[::2]
            self._session_stride *= 2

    def to_json(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "hour": [p.to_json() for p in self.hour],
            "session": [p.to_json() for p in self.session],
            "session_tx": self.session_tx,
        }


def point_from_view(view: Mapping[str, Any] | None, t: float) -> Point:
    """The plot point of a station view (no station yet: nothing offered, no reading)."""
    if view is None:
        return Point(t, None, 0.0, None)
    power = view.get("power_w")
    offered = view.get("offered_a")
    tx = view.get("transaction")
    return Point(
        t,
        float(power) if isinstance(power, int | float) else None,
        float(offered) if isinstance(offered, int | float) else 0.0,
        int(tx["id"]) if isinstance(tx, Mapping) and isinstance(tx.get("id"), int) else None,
    )


class Changes:
    """A version number and a way to wait for it to move (one per kind of news).

    Any number of event-stream clients wait on it; ``bump`` wakes them all.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, version: int) -> None:
        """Return once ``self.version`` is past ``version``."""
        while self.version <= version:
            await self._event.wait()


@dataclass
class WebState:
    """What the web service knows, shared by the sampler, the app and /metrics.

    ``supervisor`` is the running station's (``supervisor.station`` is None
    while it starts); the counts are refreshed by the sampler off the trio
    thread (SQLite), so a page or a scrape never waits on the disk.
    """

    supervisor: Any  # evse.supervisor.Supervisor (Any: tests pass a stand-in holder)
    version: str
    faults: FaultLog = dataclass_field(default_factory=FaultLog)
    plot: PowerPlot = dataclass_field(default_factory=PowerPlot)
    queue_depth: int | None = None
    dead_letters: int | None = None
    fields: dict[str, str] = dataclass_field(default_factory=dict)
    transactions: list[list[str]] = dataclass_field(default_factory=list)
    #: Bumped when the transaction list changed.
    transactions_version: int = 0
    #: Bumped after every sample that changed anything (fields, faults, plot,
    #: transactions): the event streams wake and send what moved.
    news: Changes = dataclass_field(default_factory=Changes)
    #: Set when the server shuts down: the event streams end.
    closing: trio.Event = dataclass_field(default_factory=trio.Event)
    #: Open event streams: someone is watching, so the sampler looks more often.
    watchers: int = 0

    def view(self) -> dict[str, Any] | None:
        """The station's view now (None while it starts)."""
        station = self.supervisor.station
        if station is None:
            return None
        view: dict[str, Any] = station.view()
        return view
