"""Fault -> off-command latency, measured at the simulator.

The station (``Supervisor`` from a config through ``ops.run.plan_from_config``)
and the simulator (``ops.sim.app.Simulator``) run in one trio process, over
real Modbus TCP on loopback, as in ``tests/station_harness.py``; both stamp
their events with the same trio clock. For each fault kind the EV is brought
to Charging (free-charging mode: plugging in authorizes), the fault is
injected through ``Simulator.set_fault`` after a random delay (so the
injection falls at a random phase of the board and meter polls), and the
latency runs from the fault's instant to the simulator's record of the first
board write of command 0 (its ``t``). Then the fault is cleared, the EV
unplugged, Available awaited, and the next injection armed.

Headline setup: the Phoenix EV-CC board (``ev-cc``, Modbus TCP, no request
gap) polled every 20 ms, an SDM630 meter polled every 200 ms on the same
connection, board_timeout 0.2 s, meter_timeout 1 s, overcurrent_time 0.5 s.
The rcd_trip case runs once more on the EVSE DIN board, whose driver keeps
100 ms between two requests to it, to show what that gap costs.

A fault the bench did not inject (a loaded machine can starve a poll) is
recorded in the note and its injection not counted. A welded contactor is
not measured: the EV-CC has no contactor feedback, and with the EV no longer
drawing after the stop there is no current to see it by.

``python -m bench.fault_latency [--n N] [--case KEY ...]`` runs this alone
(results go to ``$BENCH_RESULTS``, default bench-results/results.jsonl,
which it overwrites).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.results import RESULTS, Recorder, Result, compare
from evse.central import Standalone
from evse.connector import ErrorCode, Fault, Status
from evse.station import Station
from evse.supervisor import Supervisor
from ops.config import Config, config_from_dict
from ops.run import plan_from_config
from ops.sim.app import DeviceSpec as SimDevice
from ops.sim.app import SimConfig, Simulator

#: The 100 ms switch-off figure of IEC 61851-1, used as the reference (ratio
#: = 100 ms / value) for every fault -> off latency.
IEC_OFF_MS = 100.0
TARGET = "p99 <= 50 ms"

BOARD_POLL = 0.02
METER_POLL = 0.2
BOARD_TIMEOUT = {"ev-cc": 0.2, "evse-din": 0.5}
METER_TIMEOUT = 1.0
OVERCURRENT_TIME = 0.5
WELDED_TIME = 0.3
#: How long one step (fault -> off, clear -> Available, plug -> Charging) may take.
STEP_LIMIT = 10.0
#: Faults the bench did not inject, tolerated per case before it gives up.
SPURIOUS_LIMIT = 20


def station_config(port: str, data_dir: Path, board: str) -> Config:
    """The bench station: validated like any installer's config."""
    data: dict[str, Any] = {
        "station": {"serial": "BENCH-0001", "id": "CP-BENCH", "data_dir": str(data_dir)},
        "limits": {"installer_max": 16.0, "fallback": 6.0},
        "board": {
            "kind": board,
            "port": port,
            "unit": 1,
            "poll_interval": BOARD_POLL,
            "timeout": 0.1,
        },
        "meter": {
            "kind": "sdm630",
            "port": port,
            "unit": 2,
            "poll_interval": METER_POLL,
            "timeout": 0.1,
        },
        "authorization": {"mode": "free", "free_id_tag": "FREECHARGING"},
        "safety": {
            "board_timeout": BOARD_TIMEOUT[board],
            "meter_timeout": METER_TIMEOUT,
            "overcurrent_time": OVERCURRENT_TIME,
            "welded_time": WELDED_TIME,
        },
    }
    return config_from_dict(data, source="<bench>")


class StatusProbe(Standalone):
    """No central system, but a probe: when each status was reported (trio clock).

    The station reports a status after the effects before it (the off write
    first), so a report is also the sign that those have been carried out.
    """

    def __init__(self) -> None:
        self.reports: list[tuple[float, Status]] = []
        #: (status, error code, info) of each report, for error messages.
        self.details: list[tuple[Status, ErrorCode, str]] = []
        self._changed = trio.Event()

    async def status_changed(
        self, connector_id: int, status: Status, error_code: ErrorCode, info: str
    ) -> None:
        self.reports.append((trio.current_time(), status))
        self.details.append((status, error_code, info))
        self._changed.set()
        self._changed = trio.Event()

    def mark(self) -> int:
        return len(self.reports)

    def explain(self, index: int) -> str:
        status, code, info = self.details[index]
        return f"{status.value} ({code.value}: {info})" if info else status.value

    async def wait_any(self, wanted: set[Status], since: int, what: str) -> tuple[float, int]:
        """Time and index of the first report of one of ``wanted`` at or after ``since``."""
        with trio.move_on_after(STEP_LIMIT):
            while True:
                for index in range(since, len(self.reports)):
                    at, reported = self.reports[index]
                    if reported in wanted:
                        return at, index
                await self._changed.wait()
        seen = [self.explain(i) for i in range(since, len(self.reports))]
        names = " or ".join(sorted(s.value for s in wanted))
        raise RuntimeError(f"{what}: no {names} within {STEP_LIMIT:g} s (saw {seen})")


def faults_in(info: str) -> set[str]:
    """The faults a Faulted report names (its info is "fault: detail, fault: detail")."""
    return {f.value for f in Fault if info == f.value or f"{f.value}:" in info}


@dataclass
class Rig:
    sim: Simulator
    station: Station
    probe: StatusProbe
    board: str
    #: Faults the bench did not inject (a stalled machine can starve a poll),
    #: with what the station said; their injections are not counted.
    spurious: list[str] = field(default_factory=list)

    def off_after(self, seq: int) -> float | None:
        """The simulator's time of the first command-0 board write after event ``seq``."""
        first: float | None = None
        for event in reversed(self.sim.events):
            if event["seq"] <= seq:
                break
            if event["event"] == "write" and event.get("fields", {}).get("command") == 0:
                first = event["t"]
        return first

    async def arm(self) -> None:
        """Plug in (free charging authorizes) and wait for Charging."""
        for _ in range(3):
            mark = self.probe.mark()
            self.sim.set_ev({"plugged": True, "wants": "C"})
            wanted = {Status.CHARGING, Status.FAULTED}
            _, index = await self.probe.wait_any(wanted, mark, "plug in")
            if self.probe.reports[index][1] is Status.CHARGING:
                return
            self.spurious.append(f"while re-arming: {self.probe.explain(index)}")
            await self.unplug(mark, "a fault while re-arming")
        raise RuntimeError(f"no Charging after three attempts: {self.spurious[-3:]}")

    def inject(self, fault: str, params: Mapping[str, Any]) -> tuple[float, int]:
        """Inject ``fault``: its instant on the simulator's clock and its event number."""
        self.sim.set_fault(fault, True, dict(params))
        event = self.sim.events[-1]
        assert event["event"] == "fault"
        return event["t"], event["seq"]

    async def unplug(self, mark: int, what: str) -> None:
        """Unplug and wait for Available (every fault has cleared)."""
        self.sim.set_ev({"plugged": False})
        await self.probe.wait_any({Status.AVAILABLE}, mark, f"after {what}")


async def with_station(board: str, body: Callable[[Rig], Awaitable[None]]) -> None:
    sim = Simulator(
        SimConfig(
            devices=[SimDevice(board, 1), SimDevice("sdm630", 2)], rtu=False, control_port=None
        )
    )
    with tempfile.TemporaryDirectory(prefix="evse-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(sim.run)
            assert endpoints.tcp is not None
            probe = StatusProbe()
            supervisor = Supervisor(
                plan_from_config(station_config(endpoints.tcp, Path(tmp), board)), central=probe
            )
            async with trio.open_nursery() as station_nursery:
                station: Station = await station_nursery.start(supervisor.run)
                with trio.fail_after(STEP_LIMIT):
                    while station.meter_reading is None:  # noqa: ASYNC110 - no event to wait on
                        await trio.sleep(0.01)
                await body(Rig(sim, station, probe, board))
                # The station only: the simulator answers its last off write.
                station_nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


# -- the cases ----------------------------------------------------------------------------


@dataclass
class Samples:
    ms: list[float] = field(default_factory=list)
    #: Seconds of wall time per injection, re-arming included.
    cycle: list[float] = field(default_factory=list)
    #: Free-form extra figures for the note (e.g. latency from the injection instant).
    extra: list[float] = field(default_factory=list)
    #: Faults the bench did not inject (see ``Rig.spurious``).
    spurious: list[str] = field(default_factory=list)
    #: The machine's 1-minute load average at the start and at the end.
    load: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Case:
    key: str
    board: str
    fault: str
    params: Mapping[str, Any]
    #: What the latency is measured from, for the note.
    meaning: str
    #: Injections in a full and in a quick run.
    n_full: int
    n_quick: int
    #: Once Charging (reached right after a board poll), the injection waits a
    #: random time in [0, phase): two poll periods of whatever detects the fault,
    #: so it lands at a uniformly random phase of that poll. (The meter's phase
    #: relative to the board's drifts from one re-arm to the next.)
    phase: float
    #: "off": fault -> off write (IEC baseline); "faulted": -> Faulted report.
    measure: str = "off"
    #: The fault the station must name (default: the one injected).
    expect: str = ""

    @property
    def detected(self) -> str:
        return self.expect or self.fault


#: One injection of a board-detected fault on the EV-CC takes ~0.1 s with
#: re-arming; the others wait out their allowance (overcurrent_time,
#: meter_timeout, board_timeout) or the EVSE DIN's 100 ms gaps: 0.7..1.2 s
#: each, so a full run does fewer of them to stay near ten minutes (the note
#: says how many; ``python -m bench.fault_latency --n 1000`` does them all).
FAST_N, FAST_N_QUICK = 1000, 50
SLOW_N, SLOW_N_QUICK = 100, 20

CASES: tuple[Case, ...] = (
    Case(
        "rcd_trip",
        "ev-cc",
        "rcd_trip",
        {},
        "from the injection (the EV-CC has no RCD flag: the simulated board shows the trip "
        "as pilot state E)",
        FAST_N,
        FAST_N_QUICK,
        2 * BOARD_POLL,
        expect="pilot_error",
    ),
    *(
        Case(
            f"pilot_error_{state.lower()}",
            "ev-cc",
            "pilot_error",
            {"state": state},
            "from the injection",
            FAST_N,
            FAST_N_QUICK,
            2 * BOARD_POLL,
        )
        for state in "EF"
    ),
    Case(
        "overdraw",
        "ev-cc",
        "overdraw",
        {"amps": 5.0},
        f"from injection + overcurrent_time ({OVERCURRENT_TIME:g} s); the EV draws 5 A above "
        "the 16 A offer; includes the wait for the next meter reading to see it (up to one "
        "meter period) and the safety check's 50 ms interval",
        expect="over_current",
        phase=2 * METER_POLL,
        n_full=SLOW_N,
        n_quick=SLOW_N_QUICK,
    ),
    Case(
        "meter_silent",
        "ev-cc",
        "meter_silent",
        {},
        f"from the station's last good meter reading + meter_timeout ({METER_TIMEOUT:g} s), "
        "the instant the fault exists by its definition (measured from injection + "
        "meter_timeout it would come out up to one meter period smaller, mostly negative); "
        "dominated by the safety check's 50 ms interval (the meter's retries, 0.1 s timeouts "
        "0.2/0.4/0.5 s apart, leave the bus free at the 1 s mark with these settings)",
        phase=2 * METER_POLL,
        n_full=SLOW_N,
        n_quick=SLOW_N_QUICK,
    ),
    Case(
        "rcd_trip_evse_din",
        "evse-din",
        "rcd_trip",
        {},
        "from the injection, EVSE DIN board (RCD flag in register 1007), same settings "
        f"except board_timeout {BOARD_TIMEOUT['evse-din']:g} s: the driver keeps 100 ms "
        "between two requests to this board, so the off write waits 100 ms after the poll "
        "that saw the trip, and then competes with the poller for each next 100 ms slot",
        phase=0.2,
        n_full=SLOW_N,
        n_quick=SLOW_N_QUICK,
    ),
    Case(
        "board_silent_to_faulted",
        "ev-cc",
        "board_silent",
        {},
        "NOT an off latency (a silent board cannot take the off write): injection -> the "
        f"connector reporting Faulted; includes board_timeout ({BOARD_TIMEOUT['ev-cc']:g} s), "
        "the safety check's 50 ms interval, a poll timing out on the bus (0.1 s x 2 attempts) "
        "and the off write failing the same way before the report",
        measure="faulted",
        phase=2 * BOARD_POLL,
        n_full=SLOW_N,
        n_quick=SLOW_N_QUICK,
    ),
)


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def run_case(case: Case, n: int, seed: int) -> Samples:
    rng = random.Random(seed)
    samples = Samples()
    load = os.getloadavg()[0]

    async def body(rig: Rig) -> None:
        safety = rig.station.settings.safety
        while len(samples.ms) < n:
            if len(rig.spurious) > SPURIOUS_LIMIT:
                raise RuntimeError(f"{case.key}: too many faults not injected: {rig.spurious[:5]}")
            started = time.perf_counter()
            await rig.arm()
            await trio.sleep(rng.uniform(0.0, case.phase))
            mark = rig.probe.mark()
            if rig.station.connector.status is not Status.CHARGING:
                rig.spurious.append(f"before the injection: {rig.probe.explain(mark - 1)}")
                await rig.unplug(mark, "a fault before the injection")
                continue
            t0, seq = rig.inject(case.fault, case.params)
            faulted, index = await rig.probe.wait_any({Status.FAULTED}, mark, case.key)
            valid = faults_in(rig.probe.details[index][2]) == {case.detected}
            if not valid:
                rig.spurious.append(f"with {case.key}: {rig.probe.explain(index)}")
            elif case.measure == "faulted":
                samples.ms.append((faulted - t0) * 1e3)
            else:
                off = rig.off_after(seq)
                if off is None:
                    raise RuntimeError(f"{case.key}: Faulted, but no off write reached the board")
                if case.fault == "overdraw":
                    reference = t0 + safety.overcurrent_time
                elif case.fault == "meter_silent":
                    assert rig.station.monitor is not None
                    reference = rig.station.monitor.meter_seen + safety.meter_timeout
                    samples.extra.append((off - t0 - safety.meter_timeout) * 1e3)
                else:
                    reference = t0
                samples.ms.append((off - reference) * 1e3)
            rig.sim.set_fault(case.fault, False)
            await rig.unplug(mark, case.key)
            if valid:
                samples.cycle.append(time.perf_counter() - started)
        samples.spurious = rig.spurious

    await with_station(case.board, body)
    samples.load = (load, os.getloadavg()[0])
    return samples


def results_for(case: Case, samples: Samples, n: int) -> list[Result]:
    p50 = _percentile(samples.ms, 0.5)
    p99 = _percentile(samples.ms, 0.99)
    worst = max(samples.ms)
    cycle = sum(samples.cycle) / len(samples.cycle)
    base = (
        f"{case.meaning}. {n} injections ({cycle:.2f} s each with re-arming); station and "
        "simulator in one trio process over Modbus TCP on loopback, times on their shared "
        f"trio clock. Board {case.board} polled every {BOARD_POLL * 1e3:g} ms, sdm630 every "
        f"{METER_POLL * 1e3:g} ms"
    )
    if samples.extra:
        base += (
            f"; from injection + meter_timeout: min {min(samples.extra):.1f} ms, "
            f"max {max(samples.extra):.1f} ms"
        )
    start, end = samples.load
    base += f"; machine load average {start:.1f} at the start, {end:.1f} at the end"
    if samples.spurious:
        shown = "; ".join(samples.spurious[:3])
        base += (
            f"; {len(samples.spurious)} fault(s) the bench did not inject (not counted): {shown}"
        )
    out: list[Result] = []
    prefix = (
        f"fault_{case.key}_ms" if case.measure == "faulted" else f"fault_off_latency_{case.key}"
    )
    for stat, value in (("p50", p50), ("p99", p99), ("max", worst)):
        name = f"{prefix}_{stat}"
        target = TARGET if stat == "p99" and case.measure == "off" else ""
        if case.measure == "off" and value > 0:
            out.append(
                compare(
                    name,
                    value,
                    IEC_OFF_MS,
                    "ms",
                    higher_is_better=False,
                    target=target,
                    note=base,
                )
            )
        else:
            out.append(Result(name, value, "ms", None, None, target, base))
    return out


@contextlib.contextmanager
def quiet_station() -> Iterator[None]:
    """The station logs every fault it handles; a thousand of them are not news here."""
    loggers = [logging.getLogger(name) for name in ("evse", "fieldbus", "ops")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run(
    rec: Recorder, *, quick: bool = False, n: int | None = None, keys: list[str] | None = None
) -> None:
    with quiet_station():
        for i, case in enumerate(CASES):
            if keys and case.key not in keys:
                continue
            count = n if n is not None else (case.n_quick if quick else case.n_full)
            samples = trio.run(run_case, case, count, 61851 + i)
            for result in results_for(case, samples, count):
                rec.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fault_latency")
    parser.add_argument("--quick", action="store_true", help="far fewer injections")
    parser.add_argument("--n", type=int, help="injections per case (default: the case's own)")
    parser.add_argument(
        "--case", action="append", choices=[c.key for c in CASES], help="only this case"
    )
    args = parser.parse_args()
    run(Recorder(RESULTS), quick=args.quick, n=args.n, keys=args.case)


if __name__ == "__main__":
    main()
