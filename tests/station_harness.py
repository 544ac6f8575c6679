"""A station under test over real sockets: the supervisor against the in-process simulator.

Real Modbus (TCP or RTU on a pty), a real SQLite file, real timers on trio's
clock; timeouts are shortened so each fault shows within a second. For the
wiring tests only (tests/test_station.py): behaviour and timing are tested on
the virtual clock with ``tests/vclock_rig.py``, which needs no wall-clock
margins.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from evse.auth import AuthStatus, FreeCharging, LocalTagList
from evse.central import CentralSystemPort
from evse.rfid import RfidConfig
from evse.safety import SafetySettings
from evse.station import Station, StationSettings
from evse.supervisor import DeviceSpec, Plan, Service, Supervisor
from ops.sim.app import DeviceSpec as SimDevice
from ops.sim.app import SimConfig, Simulator

TAG = "04A2B3C4"

FAST_SAFETY = SafetySettings(
    board_timeout=0.8,  # margin for a loaded test machine
    meter_timeout=1.0,
    overcurrent_margin=2.0,
    overcurrent_time=0.5,
    welded_time=0.3,
)

FAST = StationSettings(
    installer_max=16.0,
    fallback=6.0,
    connection_timeout=2.0,
    board_poll=0.05,
    meter_poll=0.2,
    persist_interval=0.2,
    safety=FAST_SAFETY,
)


@dataclass
class Rig:
    sim: Simulator
    supervisor: Supervisor
    station: Station
    db: Path
    nursery: trio.Nursery

    def writes(self) -> list[dict[str, Any]]:
        """Every current command the board received, in order."""
        return [
            e for e in self.sim.events if e["event"] == "write" and "command" in e.get("fields", {})
        ]

    def commands(self) -> list[float]:
        return [w["fields"]["command"] for w in self.writes()]

    def db_rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the store's file through a connection of our own, as another process would."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    async def until(self, predicate: Any, within: float = 5.0, what: str = "condition") -> None:
        """Poll ``predicate`` (state spread over tasks and a file: no event to wait on)."""
        with trio.move_on_after(within) as scope:
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.01)
        if scope.cancelled_caught:
            view = self.station.view()
            raise AssertionError(
                f"timed out waiting for {what}; station: {view['status']} {view['faults']} "
                f"{view['error_code']} commands {self.commands()}"
            )

    async def status(self, status: str, within: float = 5.0) -> None:
        await self.until(lambda: self.station.connector.status.value == status, within, status)

    async def charge(self, tag: str = TAG) -> None:
        """Plug in, present the tag, wait for Charging."""
        self.sim.set_ev({"plugged": True, "wants": "C"})
        await self.status("Preparing")
        result = await self.station.present_id_tag(tag)
        assert result.accepted, result
        await self.status("Charging")


@asynccontextmanager
async def station_rig(
    tmp_path: Path,
    *,
    board: str = "evse-din",
    meter: str = "sdm630",
    transport: str = "tcp",
    settings: StationSettings = FAST,
    free: bool = False,
    services: Sequence[Service] = (),
    central: CentralSystemPort | None = None,
    db: Path | None = None,
    rfid: RfidConfig | None = None,
) -> AsyncIterator[Rig]:
    sim = Simulator(
        SimConfig(devices=[SimDevice(board, 1), SimDevice(meter, 2)], control_port=None)
    )
    db = db or tmp_path / "station.sqlite"
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(sim.run)
        port = endpoints.tcp if transport == "tcp" else endpoints.rtu
        assert port is not None
        steps = (
            [FreeCharging("FREECHARGING")]
            if free
            else [LocalTagList({TAG: AuthStatus.ACCEPTED, "BLOCKED1": AuthStatus.BLOCKED})]
        )
        plan = Plan(
            board=DeviceSpec(board, port, 1, timeout=0.2, retries=1),
            # A silent meter must not hold the shared bus longer than the
            # board's staleness budget allows (board_timeout 0.8 s).
            meter=DeviceSpec(meter, port, 2, timeout=0.1, retries=0),
            store_path=db,
            station=replace(settings, free_id_tag="FREECHARGING" if free else None),
            auth_steps=steps,
            off_deadline=1.0,
            services=services,
            rfid=rfid,
        )
        supervisor = Supervisor(plan, central=central)
        async with trio.open_nursery() as station_nursery:
            station = await station_nursery.start(supervisor.run)
            rig = Rig(sim, supervisor, station, db, station_nursery)
            # The first readings are in: the station knows the EV and the meter.
            await rig.until(lambda: station.meter_reading is not None, what="first meter reading")
            yield rig
            # Cancel the station only: the simulator must still answer its last off write.
            station_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
