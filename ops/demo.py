"""``evse demo``: the whole firmware on the simulator, with a central system, one session.

Nothing to configure: it starts the device simulator (an EVSE DIN board and
an SDM630 meter over Modbus TCP, or RTU on a pseudo-terminal) and a local
OCPP 1.6J central system (evse_lab.csms, the ocpp package's asyncio runtime, in
a process of its own), runs the station on them exactly as ``evse run``
would, and plays one session: plug in, present a tag, charge with a live
status line, present the tag again to stop, unplug. The OCPP exchange is
shown as the central system sees it. Exit 0 when the transaction is on disk
with the energy it delivered and the central system got its StopTransaction.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from evse.station import Station
from evse.supervisor import Supervisor
from ops.httpjson import HTTPError, request_json
from ops.run import Central, run_station, sim_config
from ops.sim.app import DeviceSpec, SimConfig, Simulator

DEMO_TAG = "DEMOTAG1"
#: The demo stopped by a signal before its session ended (128 + SIGINT).
EXIT_INTERRUPTED = 130
CP_ID = "DEMO-CP"


#: The bench central system lives in the evse-lab package (lab/), outside the
#: firmware's wheel: a gateway never installs it, a checkout does.
LAB_MISSING = (
    "the demo's central system (package evse-lab) is not installed; "
    "in the firmware's checkout: pip install -c constraints.txt -e ./lab"
)


def _lab_csms() -> str | None:
    """The central system's module, or None when evse-lab is not installed.

    Only looked up, not imported: it is asyncio code and runs in its own process.
    """
    try:
        found = importlib.util.find_spec("evse_lab.csms")
    except (ImportError, ValueError):
        # ValueError: a module set to None in sys.modules (how tests hide it).
        return None
    return None if found is None else "evse_lab.csms"


def _say(text: str) -> None:
    print(text, flush=True)


def _line(view: dict[str, Any]) -> str:
    power = view.get("power_w") or 0.0
    tx = view.get("transaction")
    delivered = tx.get("energy_wh") if isinstance(tx, dict) else None
    return (
        f"{view['status']:<14} pilot {view['pilot']}  offered {view['offered_a']:>4} A  "
        f"power {float(power):>7,.0f} W  session {float(delivered or 0):7.2f} Wh"
    )


async def _until(predicate: object, within: float = 15.0) -> None:
    assert callable(predicate)
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - state spread over tasks
            await trio.sleep(0.02)


class CentralSystemView:
    """Prints what the central system receives and answers, as it happens."""

    def __init__(self, control: str) -> None:
        url = urlsplit(control)
        assert url.hostname is not None and url.port is not None
        self.host, self.port = url.hostname, url.port
        self.seen = 0
        self.stops = 0

    async def get(self, path: str) -> Any:
        return await request_json(self.host, self.port, "GET", path)

    async def follow(self) -> None:
        while True:
            try:
                answer = await self.get(f"/messages?since={self.seen}")
            except (OSError, HTTPError, trio.TooSlowError):
                # It ended (a Ctrl-C in the terminal reaches it too): the
                # station goes on without it, and queues what it cannot send.
                _say("central system: no longer answering")
                return
            for m in answer["messages"]:
                self.seen = max(self.seen, m["seq"])
                if m["type"] != "CALL":
                    continue
                response = m.get("response", {}).get("payload")
                payload = json.dumps(m["payload"], separators=(",", ":"))
                _say(f"  ocpp  -> {m['action']} {payload[:110]}")
                if response is not None:
                    _say(f"  ocpp  <- {json.dumps(response, separators=(',', ':'))[:110]}")
                if m["action"] == "StopTransaction":
                    self.stops += 1
            await trio.sleep(0.1)


async def _session(sim: Simulator, station: Station, seconds: float) -> None:
    await _until(lambda: station.meter_reading is not None)
    _say(f"station:  {_line(station.view())}")
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


async def run_demo(*, seconds: float = 4.0, transport: str = "tcp") -> int:
    # The demo's own lines are the show; the station's log stays for warnings.
    logging.getLogger().setLevel(logging.WARNING)
    sim = Simulator(
        SimConfig(devices=[DeviceSpec("evse-din", 1), DeviceSpec("sdm630", 2)], control_port=0)
    )
    outcome: dict[str, Any] = {}
    csms_module = _lab_csms()
    if csms_module is None:
        print(f"evse demo: error: {LAB_MISSING}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="evse-demo-") as tmp:
        csms = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                csms_module,
                "--port",
                "0",
                "--control-port",
                "0",
                "--quiet",
                "--boot-interval",
                "60",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            ready = await _ready_line(csms)
            cs_view = CentralSystemView(ready["control"])
            _say(f"central system: {ready['ws']} (ocpp package, its own process)")
            async with trio.open_nursery() as nursery:
                endpoints = await nursery.start(sim.run)
                port = endpoints.tcp if transport == "tcp" else endpoints.rtu
                assert port is not None
                _say(f"simulator: board evse-din unit 1, meter sdm630 unit 2 on {port}")
                config = sim_config(port, Path(tmp))
                nursery.start_soon(cs_view.follow)

                async def driver(supervisor: Supervisor, central: Central) -> None:
                    station = supervisor.station
                    assert station is not None
                    await _until(lambda: central.port.chargepoint.online)
                    await _session(sim, station, seconds)
                    await _until(lambda: cs_view.stops >= 1)
                    records = await trio.to_thread.run_sync(
                        lambda: station.store.transactions(limit=1)
                    )
                    outcome["record"] = records[0] if records else None

                code = await run_station(
                    config,
                    settings={"CentralSystemAddress": ready["ws"], "ChargePointId": CP_ID},
                    driver=driver,
                )
                nursery.cancel_scope.cancel(reason="demo finished")
        finally:
            csms.terminate()
            with trio.move_on_after(5):
                await csms.wait()
            if csms.stdout is not None:
                await csms.stdout.aclose()
    record = outcome.get("record")
    if code == 0 and "record" not in outcome:
        # SIGINT/SIGTERM: the station stopped as `evse run` does (off, Reboot).
        _say("demo stopped before its session ended; the station switched off")
        return EXIT_INTERRUPTED
    if code != 0 or record is None or record.meter_stop_wh is None:
        _say("demo FAILED: no finished transaction on disk")
        return 1
    delivered = record.meter_stop_wh - record.meter_start_wh
    ok = record.stop_reason == "Local" and delivered > 0
    _say(
        f"transaction {record.id} for {record.id_tag}: {record.stop_reason}, "
        f"{delivered:.2f} Wh delivered; demo finished: " + ("ok" if ok else "FAILED")
    )
    return 0 if ok else 1


async def _ready_line(process: trio.Process) -> dict[str, Any]:
    assert process.stdout is not None
    data = b""
    with trio.fail_after(20):
        while b"\n" not in data:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError("the central system did not start")
            data += chunk
    ready: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])["ready"]
    return ready


if __name__ == "__main__":
    sys.exit(trio.run(run_demo))
