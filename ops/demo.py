"""``evse demo``: the simulator plus a probe of every device on it.

Until the charging core lands this is the firmware's main job on the embedded
default: it starts the simulator (Modbus TCP and RTU on a pty), plugs a
simulated EV, commands a charging current through the board driver, and reads
every meter model and the board over both transports, printing a live line
per second. It exits 0 when every read succeeded and the energy counted up.
"""

from __future__ import annotations

import json
import sys

import trio

from fieldbus.boards import BOARD_MODELS, Board
from fieldbus.master import ModbusMaster
from fieldbus.meters import METER_MODELS, Meter
from ops.sim.app import DeviceSpec, SimConfig, Simulator

BOARD_UNIT = 1


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(*, seconds: float = 3.0, amps: float = 16.0) -> int:
    devices = [DeviceSpec("evse-din", BOARD_UNIT)]
    devices += [DeviceSpec(kind, 10 + i) for i, kind in enumerate(sorted(METER_MODELS))]
    sim = Simulator(SimConfig(devices=devices, tcp_port=0, control_port=0))
    board_model = BOARD_MODELS["evse-din"]
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(sim.run)
        assert endpoints.tcp is not None and endpoints.rtu is not None
        _say(
            f"simulator: Modbus TCP {endpoints.tcp}, RTU {endpoints.rtu}, "
            f"control {endpoints.control}"
        )
        tcp = ModbusMaster.for_port(endpoints.tcp)
        rtu = ModbusMaster.for_port(endpoints.rtu)
        async with tcp, rtu:
            board = Board(tcp, BOARD_UNIT, board_model)
            sim.set_ev({"plugged": True, "wants": "C", "phases": 3})
            status = await board.read_status()
            _say(f"EV plugged: pilot {status.pilot}, cable limit {status.cable_limit_a} A")
            written = await board.set_current(amps)
            _say(f"board: allowed current set to {written:g} A")
            meters = {
                (name, kind): Meter(master, spec.unit, METER_MODELS[kind])
                for spec in devices[1:]
                for name, master in (("tcp", tcp), ("rtu", rtu))
                if (kind := spec.kind)
            }
            start_energy: float | None = None
            last_energy: float | None = None
            for tick in range(max(1, round(seconds))):
                await trio.sleep(1.0)
                status = await board.read_status()
                readings = {key: await meter.read() for key, meter in meters.items()}
                main = readings[("tcp", "sdm630")]
                if start_energy is None:
                    start_energy = main.energy_import_wh
                last_energy = main.energy_import_wh
                _say(
                    f"[{tick + 1:>2}s] pilot {status.pilot} offered {status.offered_a:g} A | "
                    f"power {main.power_total or 0:,.0f} W | energy {last_energy or 0:.2f} Wh | "
                    f"{len(readings)} meter reads over TCP+RTU ok"
                )
            await board.set_current(0)
            status = await board.read_status()
            _say(f"board: current 0 A, pilot {status.pilot}")
            for (transport, kind), reading in sorted(readings.items()):
                _say(f"  {transport} {kind:8} {json.dumps(reading.to_json())}")
        nursery.cancel_scope.cancel(reason="demo finished")
    ok = start_energy is not None and last_energy is not None and last_energy > start_energy
    _say("demo finished: ok" if ok else "demo finished: energy did not count up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(trio.run(run_demo))
