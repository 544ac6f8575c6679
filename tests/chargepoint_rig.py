"""An in-process rig for ``ocpp16.chargepoint.ChargePoint``: no sockets, exact virtual time.

The charge point runs its per-connection coroutine ``ChargePoint._session`` on a
``FakeConnection`` (two trio memory channels); the central system is a second,
sans-I/O ``RpcSession`` driven by ``CentralSystem``, so every frame the charge
point sends is also checked against the OCPP 1.6 request schemas. The station
is ``FakeStation``; the configuration and the transaction queue are the real
ones, on one SQLite file.

Time: ``MockClock`` with ``ThreadAwareAutojump`` instead of
``autojump_threshold=0``. The charge point does its SQLite work in worker
threads (``trio.to_thread.run_sync``), and trio's own autojump treats a task
waiting for a thread as blocked: it would jump the clock (to the next 0.5 s
poll of the call timer, or to a 30 s call timeout) while a queue write is in
progress. This autojump jumps only when every task is blocked AND no worker
thread is running, so virtual time advances only by waiting, exactly.

Wall time: ``ChargePoint`` reads ``datetime.now(UTC)`` itself (in ``now()``
and ``set_clock``); there is no constructor seam for a wall clock.
``WallClockChargePoint`` overrides the public ``now()`` to follow trio's
clock from a fixed epoch, for the tests that need exact wall time
(clock-aligned meter values, sample timestamps).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
import trio.testing

from evse.store import Store
from ocpp16.chargepoint import ChargePoint, Identity
from ocpp16.config import Configuration
from ocpp16.errors import ConnectionLost
from ocpp16.local_auth import AuthSettings, LocalAuth
from ocpp16.metering import MeterSnapshot, format_time
from ocpp16.queue import TransactionQueue
from ocpp16.rpc import (
    CallErrorReceived,
    CallResultReceived,
    IncomingCall,
    ProtocolProblem,
    RpcSession,
)
from ocpp16.transport import Connection

IDENTITY = Identity(
    vendor="Example",
    model="AC-22",
    serial="SN-0001",
    firmware_version="1.2.3",
    meter_type="MID meter with a very long type name",
)
#: The wall time at trio time 0 for ``WallClockChargePoint``.
EPOCH = datetime(2026, 5, 1, 8, 58, 20, tzinfo=UTC)

Answer = CallResultReceived | CallErrorReceived
Responder = Callable[[IncomingCall], dict[str, Any]]


# --------------------------------------------------------------------------- time


async def thread_aware_autojump(clock: trio.testing.MockClock) -> None:
    """Jump ``clock`` to the next deadline whenever everything waits and no thread runs."""
    limiter = trio.to_thread.current_default_thread_limiter()

    def threads_busy() -> bool:
        return limiter.borrowed_tokens > 0

    while True:
        if threads_busy():
            # A worker thread is busy: real time passes, virtual time must not.
            await trio.testing.wait_all_tasks_blocked(0.0005)
            continue
        await trio.testing.wait_all_tasks_blocked()
        if threads_busy():
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)
        elif jump == math.inf:
            # Nothing will ever happen; avoid a hot loop (a test's fail_after
            # normally keeps a deadline pending).
            await trio.testing.wait_all_tasks_blocked(0.01)


async def settle(predicate: Callable[[], object], what: str, real_limit: float = 5.0) -> None:
    """Wait, WITHOUT letting virtual time pass, until ``predicate()`` is true.

    For outcomes that need only worker threads and scheduling (a queue write)
    to finish. Spinning on checkpoints keeps a task runnable, so the autojump
    never moves the clock meanwhile.
    """
    give_up = time.monotonic() + real_limit
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"not reached without time passing: {what}")
        await trio.lowlevel.checkpoint()


# ------------------------------------------------------------------- connection


class FakeConnection(Connection):
    """``transport.Connection`` without a websocket: text frames on memory channels."""

    def __init__(self) -> None:  # no super().__init__: there is no websocket
        self._to_cs, self.from_cp = trio.open_memory_channel[str](math.inf)
        self._to_cp, self._from_cs = trio.open_memory_channel[str](math.inf)
        self.dropped = False

    async def receive(self) -> str:
        try:
            return await self._from_cs.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionLost("dropped by the test") from None

    async def send(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.dropped:
            raise ConnectionLost("dropped by the test")
        self._to_cs.send_nowait(text)

    async def close(self, code: int = 1000, reason: str = "", grace: float = 0.0) -> None:
        await trio.lowlevel.checkpoint()
        self.drop()

    def push(self, text: str) -> None:
        """A frame from the central system to the charge point."""
        self._to_cp.send_nowait(text)

    def drop(self) -> None:
        """The connection breaks: the charge point's receive() raises ConnectionLost."""
        if not self.dropped:
            self.dropped = True
            self._to_cp.close()
            self._to_cs.close()


# --------------------------------------------------------------- central system


def _now_text() -> str:
    return format_time(datetime.now(UTC))


def boot_answer(status: str = "Accepted", interval: int = 3600) -> Responder:
    def answer(call: IncomingCall) -> dict[str, Any]:
        return {"status": status, "currentTime": _now_text(), "interval": interval}

    return answer


class CentralSystem:
    """The peer: a second RpcSession on the other end of a FakeConnection.

    Calls whose action has a responder in ``auto`` are answered at once;
    the others wait for the test in ``expect``. Everything received is in
    ``log`` with its virtual time. A frame of the charge point that the peer
    refuses (schema fault) is kept in ``refused``.
    """

    def __init__(self, conn: FakeConnection, auto: Mapping[str, Responder]) -> None:
        self.conn = conn
        self.rpc = RpcSession(call_timeout=1e9)
        self.auto: dict[str, Responder] = dict(auto)
        self.log: list[tuple[float, IncomingCall]] = []
        self.refused: list[str] = []
        self.problems: list[str] = []
        self._calls_in, self._calls = trio.open_memory_channel[IncomingCall](math.inf)
        self._answers_in, self._answers = trio.open_memory_channel[Answer](math.inf)
        self._strays_in, self._strays = trio.open_memory_channel[str](math.inf)

    async def run(self) -> None:
        async for text in self.conn.from_cp:
            now = trio.current_time()
            frames, events = self.rpc.receive(text, now)
            if frames:
                self.refused.append(text)
                for frame in frames:
                    self.conn.push(frame)
            useful = False
            for event in events:
                if isinstance(event, IncomingCall):
                    useful = True
                    self.log.append((now, event))
                    responder = self.auto.get(event.action)
                    if responder is not None:
                        self.answer(event, responder(event))
                    else:
                        self._calls_in.send_nowait(event)
                elif isinstance(event, CallResultReceived | CallErrorReceived):
                    useful = True
                    self._answers_in.send_nowait(event)
                elif isinstance(event, ProtocolProblem):
                    self.problems.append(event.description)
            if not useful and not frames:
                self._strays_in.send_nowait(text)

    # -- the charge point's calls

    async def expect(self, action: str) -> IncomingCall:
        """The next call not answered automatically; it must be ``action``."""
        call = await self._calls.receive()
        assert call.action == action, f"expected {action}, got {call.action} {call.payload}"
        return call

    def answer(self, call: IncomingCall, payload: dict[str, Any]) -> None:
        if not self.conn.dropped:
            self.conn.push(self.rpc.reply(call.unique_id, payload))

    def error(self, call: IncomingCall, code: str = "InternalError", text: str = "") -> None:
        if not self.conn.dropped:
            self.conn.push(self.rpc.reply_error(call.unique_id, code, text))

    def times(self, action: str) -> list[float]:
        return [t for t, call in self.log if call.action == action]

    def payloads(self, action: str) -> list[dict[str, Any]]:
        return [call.payload for _, call in self.log if call.action == action]

    def actions(self) -> list[str]:
        return [call.action for _, call in self.log]

    # -- the central system's calls

    def send_call(self, action: str, payload: dict[str, Any]) -> str:
        uid = f"cs-{len(self.log)}-{trio.current_time():g}-{action}"[:36]
        self.conn.push(self.rpc.send_call(action, payload, trio.current_time(), unique_id=uid))
        return uid

    async def answer_to_call(self) -> Answer:
        return await self._answers.receive()

    async def call(self, action: str, payload: dict[str, Any]) -> Answer:
        """Send a CALL and wait for its answer (the charge point's own calls keep flowing)."""
        self.send_call(action, payload)
        return await self.answer_to_call()

    async def result(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        answer = await self.call(action, payload)
        assert isinstance(answer, CallResultReceived), answer
        return answer.payload

    def send_raw(self, text: str) -> None:
        self.conn.push(text)

    async def stray(self) -> list[Any]:
        """The next frame that was neither a CALL nor an answer to our CALL (parsed)."""
        frame: list[Any] = json.loads(await self._strays.receive())
        return frame


# ---------------------------------------------------------------------- station


def snapshot(
    energy_wh: float = 1500.0,
    *,
    power_w: float | None = 7200.0,
    at: datetime = EPOCH,
) -> MeterSnapshot:
    return MeterSnapshot(
        energy_wh=energy_wh,
        power_w=power_w,
        current_a=(10.5, None, None),
        voltage_v=(230.1, None, None),
        offered_a=16.0,
        timestamp=at,
        temperature_c=31.0,
    )


@dataclass
class FakeStation:
    """``StationControl``: records what the charge point asks, answers as configured."""

    connector_ids: tuple[int, ...] = (1,)
    statuses: dict[int, tuple[str, str, str]] = field(
        default_factory=lambda: {0: ("Available", "NoError", ""), 1: ("Available", "NoError", "")}
    )
    snapshots: dict[int, MeterSnapshot | None] = field(default_factory=dict)
    running: dict[int, int] = field(default_factory=dict)
    remote_start_result: bool = True
    remote_stop_result: bool = True
    availability_result: str = "Accepted"
    unlock_result: str = "Unlocked"
    unlock_raises: bool = False
    clear_cache_result: bool = True
    #: (virtual time, what, arguments) of every request of the charge point.
    calls: list[tuple[float, str, tuple[Any, ...]]] = field(default_factory=list)
    link_changes: list[float] = field(default_factory=list)

    def _record(self, what: str, *args: Any) -> None:
        self.calls.append((trio.current_time(), what, args))

    def called(self, what: str) -> list[tuple[Any, ...]]:
        return [args for _, name, args in self.calls if name == what]

    def status_of(self, connector_id: int) -> tuple[str, str, str]:
        return self.statuses[connector_id]

    def meter_snapshot(self, connector_id: int) -> MeterSnapshot | None:
        return self.snapshots.get(connector_id)

    def running_transaction(self, connector_id: int) -> int | None:
        return self.running.get(connector_id)

    async def remote_start(self, id_tag: str, connector_id: int | None) -> bool:
        await trio.lowlevel.checkpoint()
        self._record("remote_start", id_tag, connector_id)
        return self.remote_start_result

    async def remote_stop(self, local_tx_id: int) -> bool:
        await trio.lowlevel.checkpoint()
        self._record("remote_stop", local_tx_id)
        return self.remote_stop_result

    async def change_availability(self, connector_id: int, operative: bool) -> str:
        await trio.lowlevel.checkpoint()
        self._record("change_availability", connector_id, operative)
        return self.availability_result

    async def unlock(self, connector_id: int) -> str:
        await trio.lowlevel.checkpoint()
        self._record("unlock", connector_id)
        if self.unlock_raises:
            raise RuntimeError("the lock motor driver crashed")
        return self.unlock_result

    async def reset(self, hard: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._record("reset", hard)

    async def deauthorize(self, local_tx_id: int) -> None:
        await trio.lowlevel.checkpoint()
        self._record("deauthorize", local_tx_id)

    async def suspend_transaction(self, local_tx_id: int) -> None:
        await trio.lowlevel.checkpoint()
        self._record("suspend_transaction", local_tx_id)

    async def clear_cache(self) -> bool:
        await trio.lowlevel.checkpoint()
        self._record("clear_cache")
        return self.clear_cache_result

    def link_changed(self) -> None:
        self.link_changes.append(trio.current_time())


# ------------------------------------------------------------------ charge point


class WallClockChargePoint(ChargePoint):
    """A ChargePoint whose wall time follows trio's clock: ``EPOCH`` at time 0.

    Stands in for the missing wall-clock seam (see the module docstring).
    ``wall_step`` moves the wall clock as a correction would (NTP, or a new
    clock offset from a Heartbeat's currentTime).
    """

    wall_step = timedelta(0)

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time()) + self.wall_step


def wall(t: float) -> str:
    """The OCPP text of the wall time at virtual time ``t`` (WallClockChargePoint)."""
    return format_time(EPOCH + timedelta(seconds=t))


@dataclass
class Rig:
    cp: ChargePoint
    station: FakeStation
    config: Configuration
    queue: TransactionQueue
    nursery: trio.Nursery
    sessions: list[CentralSystem] = field(default_factory=list)
    session_ends: list[tuple[float, str]] = field(default_factory=list)

    async def connect(self, **auto: Responder | None) -> CentralSystem:
        """A new connection and central system; ``_session`` runs on it.

        By default BootNotification (Accepted, 3600 s), StatusNotification and
        Heartbeat are answered automatically; ``Action=None`` turns one off,
        ``Action=responder`` replaces it.
        """
        responders: dict[str, Responder | None] = {
            "BootNotification": boot_answer(),
            "StatusNotification": lambda call: {},
            "Heartbeat": lambda call: {"currentTime": _now_text()},
        }
        responders.update(auto)
        conn = FakeConnection()
        cs = CentralSystem(conn, {k: v for k, v in responders.items() if v is not None})
        self.sessions.append(cs)
        self.nursery.start_soon(cs.run)
        self.nursery.start_soon(self._session, conn)
        await trio.lowlevel.checkpoint()
        return cs

    async def _session(self, conn: FakeConnection) -> None:
        try:
            await self.cp._session(conn)
        except* ConnectionLost as group:
            self.session_ends.append((trio.current_time(), f"lost: {group.exceptions[0]!r}"))
        except* Exception as group:
            # Link.run logs "OCPP session failed", closes the connection and reconnects.
            self.session_ends.append((trio.current_time(), f"failed: {group.exceptions[0]!r}"))
        finally:
            conn.drop()

    def set_status(self, connector_id: int, status: str, error: str = "NoError") -> None:
        self.station.statuses[connector_id] = (status, error, "")
        self.cp.status_changed()

    async def start_transaction(
        self, local_id: int = 1, *, id_tag: str = "TAG1", begin: MeterSnapshot | None = None
    ) -> None:
        await self.cp.transaction_started(
            local_id=local_id,
            connector_id=1,
            id_tag=id_tag,
            meter_start_wh=1000.4,
            timestamp=EPOCH,
            begin=begin,
        )

    async def end_transaction(
        self, local_id: int = 1, *, end: MeterSnapshot | None = None, reason: str = "Local"
    ) -> None:
        await self.cp.transaction_ended(
            local_id=local_id,
            connector_id=1,
            id_tag="TAG1",
            meter_start_wh=1000.4,
            started_at=EPOCH,
            meter_stop_wh=2500.6,
            stopped_at=EPOCH + timedelta(hours=1),
            reason=reason,
            stop_id_tag=None,
            end=end,
        )


@asynccontextmanager
async def open_rig(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    *,
    settings: Mapping[str, str] | None = None,
    station: FakeStation | None = None,
    cp_class: type[ChargePoint] = ChargePoint,
    time_limit: float = 100_000.0,
    local_auth: bool = False,
) -> AsyncIterator[Rig]:
    """The charge point on a real Configuration and TransactionQueue in ``tmp_path``
    (``local_auth``: and the local list and cache, ``cp.local_auth``)."""
    path = tmp_path / "station.db"
    store = Store.open(path)
    queue: TransactionQueue | None = None
    auth: LocalAuth | None = None
    try:
        config = Configuration(store)
        if settings:
            result = config.change_many(dict(settings), source="installer")
            assert result.ok, result
        queue = TransactionQueue.open(path)
        if local_auth:
            live = config
            auth = LocalAuth.open(path, settings=lambda: AuthSettings.from_keys(live.get_bool))
        cp = cp_class(
            config=config,
            queue=queue,
            station=station or FakeStation(),
            identity=IDENTITY,
            connection_settings=lambda: None,
            local_auth=auth,
        )
        with trio.fail_after(time_limit):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(thread_aware_autojump, clock)
                # What ChargePoint.run() sets up around its sessions (the charge
                # point subscribes to configuration changes itself).
                cp._nursery_for_background = nursery
                nursery.start_soon(cp._sampler)
                nursery.start_soon(cp._aligned_sampler)
                assert isinstance(cp.station, FakeStation)
                rig = Rig(cp, cp.station, config, queue, nursery)
                try:
                    yield rig
                finally:
                    nursery.cancel_scope.cancel()
        failed = [end for end in rig.session_ends if end[1].startswith("failed")]
        assert failed == [], f"a session failed: {failed}"
        for cs in rig.sessions:
            assert cs.refused == [], f"the central system refused frames: {cs.refused}"
    finally:
        if auth is not None:
            auth.close()
        if queue is not None:
            queue.close()
        store.close()
