"""``evse demo``: the whole firmware on the simulator, one charging session.

Nothing to configure: it starts the device simulator (an EVSE DIN board and
an SDM630 meter over Modbus TCP, or RTU on a pseudo-terminal), runs the
station on it exactly as ``evse run`` would (supervisor, store, safety),
plugs in a simulated EV, presents a tag, shows a live status line while it
charges, presents the tag again to stop, unplugs and exits 0 when the
transaction is on disk with the energy it delivered.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import trio

from evse.station import Station
from evse.store import TransactionRecord
from evse.supervisor import Supervisor
from ops.run import plan_from_config, sim_config
from ops.sim.app import DeviceSpec, SimConfig, Simulator

DEMO_TAG = "DEMOTAG1"


def _say(text: str) -> None:
    print(text, flush=True)


def _line(view: dict[str, object]) -> str:
    power = view.get("power_w") or 0.0
    tx = view.get("transaction")
    delivered = tx.get("energy_wh") if isinstance(tx, dict) else None
    return (
        f"{view['status']:<14} pilot {view['pilot']}  offered {view['offered_a']:>4} A  "
        f"power {float(power):>7,.0f} W  session {float(delivered or 0):7.2f} Wh"  # type: ignore[arg-type]
    )


async def _until(predicate: object, within: float = 10.0) -> None:
    assert callable(predicate)
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - state spread over tasks
            await trio.sleep(0.02)


async def _session(
    sim: Simulator, station: Station, seconds: float
) -> tuple[list[TransactionRecord], list[dict[str, object]]]:
    await _until(lambda: station.meter_reading is not None)
    _say(f"station:   {_line(station.view())}")
    sim.set_ev({"plugged": True, "wants": "C", "phases": 3, "max_current": 16.0})
    _say("EV plugged in (3 phases, up to 16 A)")
    await _until(lambda: station.connector.status.value == "Preparing")
    result = await station.present_id_tag(DEMO_TAG, source="demo")
    _say(f"tag {DEMO_TAG}: {result.status.value} ({result.source})")
    await _until(lambda: station.connector.status.value == "Charging")
    for _ in range(max(1, round(seconds * 2))):
        _say(f"  {_line(station.view())}")
        await trio.sleep(0.5)
    await station.present_id_tag(DEMO_TAG, source="demo")
    _say("tag presented again: stop")
    await _until(lambda: station.connector.status.value == "Finishing")
    sim.set_ev({"plugged": False})
    await _until(lambda: station.connector.status.value == "Available")
    _say(f"EV unplugged: {station.view()['status']}")
    await _until(lambda: station.tx is None)
    records = await trio.to_thread.run_sync(lambda: station.store.transactions(limit=1))
    writes = [e["fields"] for e in sim.events if e["event"] == "write"]
    return records, writes


async def run_demo(*, seconds: float = 4.0, transport: str = "tcp") -> int:
    sim = Simulator(
        SimConfig(devices=[DeviceSpec("evse-din", 1), DeviceSpec("sdm630", 2)], control_port=0)
    )
    with tempfile.TemporaryDirectory(prefix="evse-demo-") as tmp:
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(sim.run)
            port = endpoints.tcp if transport == "tcp" else endpoints.rtu
            assert port is not None
            config = sim_config(port, Path(tmp))
            _say(f"simulator: board evse-din unit 1, meter sdm630 unit 2 on {port}")
            _say(f"           control interface {endpoints.control}")
            supervisor = Supervisor(plan_from_config(config))
            # The station in a nursery of its own: it switches off and ends
            # before the simulator it talks to is stopped.
            async with trio.open_nursery() as station_nursery:
                station = await station_nursery.start(supervisor.run)
                records, writes = await _session(sim, station, seconds)
                await supervisor.shutdown()
            nursery.cancel_scope.cancel(reason="demo finished")
    tx = records[0] if records else None
    if tx is None or tx.meter_stop_wh is None:
        _say("demo failed: no finished transaction on disk")
        return 1
    delivered = tx.meter_stop_wh - tx.meter_start_wh
    _say(
        json.dumps(
            {
                "transaction": tx.id,
                "id_tag": tx.id_tag,
                "stop_reason": tx.stop_reason,
                "meter_start_wh": round(tx.meter_start_wh, 2),
                "meter_stop_wh": round(tx.meter_stop_wh, 2),
                "board_writes": writes,
            }
        )
    )
    ok = tx.stop_reason == "Local" and delivered > 0
    _say(f"demo finished: {delivered:.2f} Wh delivered, " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(trio.run(run_demo))
