"""Fault -> off-write latency, measured at the simulator's write log.

Three parts (``--part``, default all):

``matrix``: every fault kind x every board model (evse-din, heidelberg,
ev-cc) x Modbus TCP and RTU at 9600 baud, at the defaults of
``evse.station.StationSettings`` (board polled every 0.1 s, meter every
1 s), on the virtual-clock rig, ``--n`` injections each (default 1,000) at
random phases of the polls. What is injected, what each latency counts
from, and the target, ideal and bound: ``bench/fault_vclock.py``.

``loads``: the same on a loaded station (``--load-n`` injections per case,
default ``N_LOAD``: the OCPP flood, whose simulated CPU costs real CPU, 100; a
slow disk 200 (the allowance kinds, 5-7 virtual s each, at most 100); a dropped
bus 300; a bus outage 1,000): a
central system flooding GetConfiguration / ChangeConfiguration with calls
through the station loop, a slow disk, a dropped bus, a bus outage
(``bench/fault_vclock.py`` says how each is made).

``real``: the agreement check, over real sockets: the station
(``ops.run.plan_from_config`` of a config with the default poll intervals
and device timeouts) and ``ops.sim.app.Simulator`` in one trio process, as in
``tests/station_harness.py``, over Modbus TCP on loopback, and over RTU on the
simulator's pseudo-terminal; both stamp events with the same trio clock.
``--real-n`` RCD-trip injections per case (default 200): Charging (free
charging), then just after a board read of the pilot register a random
delay over one poll cycle, the trip injected through
``Simulator.set_fault``, the latency from the fault's instant to the
simulator's record of the first command-0 write; then cleared, unplugged,
Available. Each is set next to the same case on the rig: for TCP the matrix's
own case, for the pty a rig RTU line with the pty's timing (t3.5 of 9600
baud, as the master keeps it, but no time per byte and no device
turnaround: a pty moves bytes at once), ``--n`` injections.

``python -m bench.fault_latency [--n N] [--load-n N] [--real-n N] [--jobs J]
[--part P ...] [--kind K ...] [--board B ...] [--transport T ...] [--load L
...]`` runs this alone (results go to ``$BENCH_RESULTS``, default
bench-results/results.jsonl, which it overwrites); ``--jobs`` runs the
virtual-clock cases in that many processes (their results do not depend on
wall time); the real-socket cases always run alone, after them. A summary
table goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from pymodbus.pdu import ModbusPDU

from bench import fault_vclock as fv
from bench.results import RESULTS, Recorder, Result, compare
from evse.central import Standalone
from evse.connector import ErrorCode, Fault, Status
from evse.station import Station
from evse.supervisor import Supervisor
from fieldbus.boards import BOARD_MODELS
from fieldbus.registers import Table
from ops.config import Config, config_from_dict
from ops.run import plan_from_config
from ops.sim.app import DeviceSpec as SimDevice
from ops.sim.app import SimConfig, Simulator

#: How long one real-socket step (fault -> off, clear -> Available, plug -> Charging) may take.
STEP_LIMIT = 10.0
#: Faults the bench did not inject, tolerated per real-socket case before it gives up.
SPURIOUS_LIMIT = 20
BOARD_UNIT, METER_UNIT = 1, 2
PARTS = ("matrix", "loads", "real")
#: Processes for the virtual-clock cases (their results do not depend on wall time).
JOBS = min(2, os.cpu_count() or 1)
#: Injections per case: matrix, real sockets (full; quick).
N_MATRIX, N_REAL = 1000, 200
N_MATRIX_QUICK, N_REAL_QUICK = 50, 20
#: Injections per loaded case (full; quick). The flood costs real CPU for the CPU
#: it simulates; the allowance kinds take 5-7 virtual s per injection.
N_LOAD = {"ocpp_flood": 100, "slow_disk": 200, "bus_drop": 300, "bus_outage": 1000}
N_LOAD_QUICK = {"ocpp_flood": 10, "slow_disk": 20, "bus_drop": 20, "bus_outage": 20}
#: At most this many per loaded case of an allowance kind (5-7 virtual s each).
N_ALLOWANCE = 100

_READ_FUNCTIONS = {Table.COIL: 1, Table.DISCRETE_INPUT: 2, Table.HOLDING: 3, Table.INPUT: 4}


# -- real sockets -----------------------------------------------------------------------


@dataclass(frozen=True)
class RealCase:
    board: str
    #: "tcp" (loopback) or "rtu" (the simulator's pseudo-terminal).
    transport: str
    kind: str = "rcd_trip"

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.board.replace('-', '_')}_{self.transport}"

    @property
    def twin(self) -> fv.VCase:
        """The same case on the virtual-clock rig."""
        wire = "pty" if self.transport == "rtu" else ""
        return fv.VCase(self.kind, self.board, self.transport, "idle", wire)


REAL_CASES = (RealCase("ev-cc", "tcp"), RealCase("evse-din", "tcp"), RealCase("ev-cc", "rtu"))


def station_config(port: str, data_dir: Path, board: str) -> Config:
    """The bench station, validated like any installer's config: every interval,
    timeout and safety setting at its default."""
    data: dict[str, Any] = {
        "station": {"serial": "BENCH-0001", "id": "CP-BENCH", "data_dir": str(data_dir)},
        "board": {"kind": board, "port": port, "unit": BOARD_UNIT},
        "meter": {"kind": "sdm630", "port": port, "unit": METER_UNIT},
        "authorization": {"mode": "free", "free_id_tag": "FREECHARGING"},
    }
    return config_from_dict(data, source="<bench>")


class StatusProbe(Standalone):
    """No central system, but a probe: when each status was reported (trio clock)."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, Status]] = []
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
class RealRig:
    sim: Simulator
    station: Station
    probe: StatusProbe
    board: str
    #: Trio times of the board reads of the pilot register the simulator served.
    pilot_reads: list[float] = field(default_factory=list)
    pilot_read: trio.Event = field(default_factory=trio.Event)
    spurious: list[str] = field(default_factory=list)

    def instrument(self) -> None:
        server = self.sim.server
        served = server.on_request
        pilot = BOARD_MODELS[self.board].pilot
        code = _READ_FUNCTIONS[pilot.table]

        def on_request(unit: int, request: ModbusPDU) -> None:
            if served is not None:
                served(unit, request)
            address = getattr(request, "address", 0)
            count = getattr(request, "count", 0) or 0
            if (
                unit == BOARD_UNIT
                and request.function_code == code
                and address <= pilot.address < address + count
            ):
                self.pilot_reads.append(trio.current_time())
                self.pilot_read.set()
                self.pilot_read = trio.Event()

        server.on_request = on_request

    def cycle(self) -> float:
        times = self.pilot_reads[-21:]
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        return gaps[len(gaps) // 2] if gaps else 0.1

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
            _, index = await self.probe.wait_any({Status.CHARGING, Status.FAULTED}, mark, "plug")
            if self.probe.reports[index][1] is Status.CHARGING:
                return
            self.spurious.append(f"while arming: {self.probe.explain(index)}")
            await self.unplug(mark, "a fault while arming")
        raise RuntimeError(f"no Charging after three attempts: {self.spurious[-3:]}")

    async def unplug(self, mark: int, what: str) -> None:
        self.sim.set_ev({"plugged": False})
        await self.probe.wait_any({Status.AVAILABLE}, mark, f"after {what}")


async def with_station(case: RealCase, body: Callable[[RealRig], Awaitable[None]]) -> None:
    rtu = case.transport == "rtu"
    sim = Simulator(
        SimConfig(
            devices=[SimDevice(case.board, BOARD_UNIT), SimDevice("sdm630", METER_UNIT)],
            tcp_port=None if rtu else 0,
            rtu=rtu,
            control_port=None,
        )
    )
    with tempfile.TemporaryDirectory(prefix="evse-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(sim.run)
            port = endpoints.rtu if rtu else endpoints.tcp
            assert port is not None
            probe = StatusProbe()
            config = station_config(port, Path(tmp), case.board)
            supervisor = Supervisor(plan_from_config(config), central=probe)
            async with trio.open_nursery() as station_nursery:
                station: Station = await station_nursery.start(supervisor.run)
                rig = RealRig(sim, station, probe, case.board)
                rig.instrument()
                with trio.fail_after(STEP_LIMIT):
                    while station.meter_reading is None:  # noqa: ASYNC110 - no event to wait on
                        await trio.sleep(0.01)
                await body(rig)
                # The station only: the simulator answers its last off write.
                station_nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


@dataclass
class RealSamples:
    ms: list[float] = field(default_factory=list)
    cycle: list[float] = field(default_factory=list)
    spurious: list[str] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)
    wall: float = 0.0


async def run_real(case: RealCase, n: int, seed: int) -> RealSamples:
    rng = random.Random(seed)
    samples = RealSamples()
    load = os.getloadavg()[0]
    begun = time.perf_counter()

    async def body(rig: RealRig) -> None:
        expected = fv.EXPECTED[case.kind]
        while len(samples.ms) < n:
            if len(rig.spurious) > SPURIOUS_LIMIT:
                raise RuntimeError(f"{case.key}: too many faults not injected: {rig.spurious[:5]}")
            started = time.perf_counter()
            await rig.arm()
            with trio.fail_after(STEP_LIMIT):
                await rig.pilot_read.wait()
            await trio.sleep(rng.uniform(0.0, rig.cycle()))
            mark = rig.probe.mark()
            if rig.station.connector.status is not Status.CHARGING:
                rig.spurious.append(f"before the injection: {rig.probe.explain(mark - 1)}")
                await rig.unplug(mark, "a fault before the injection")
                continue
            rig.sim.set_fault(case.kind, True, {})
            event = rig.sim.events[-1]
            assert event["event"] == "fault"
            t0, seq = float(event["t"]), int(event["seq"])
            _, index = await rig.probe.wait_any({Status.FAULTED}, mark, case.key)
            named = faults_in(rig.probe.details[index][2])
            if not named or named - expected:
                rig.spurious.append(f"with {case.key}: {rig.probe.explain(index)}")
            else:
                # The report does not wait for the bus: the off-write may still be
                # on its way (its time is the simulator's record, not this poll's).
                with trio.move_on_after(STEP_LIMIT):
                    while (off := rig.off_after(seq)) is None:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                if off is None:
                    raise RuntimeError(f"{case.key}: Faulted, but no off write reached the board")
                samples.ms.append((off - t0) * 1e3)
                samples.cycle.append(time.perf_counter() - started)
            rig.sim.set_fault(case.kind, False)
            await rig.unplug(mark, case.key)
        samples.spurious = rig.spurious

    await with_station(case, body)
    samples.load = (load, os.getloadavg()[0])
    samples.wall = time.perf_counter() - begun
    return samples


# -- results ----------------------------------------------------------------------------


def _stats(ms: list[float]) -> tuple[float, float, float]:
    return fv.percentile(ms, 0.5), fv.percentile(ms, 0.99), max(ms)


def _fmt(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _name(case: fv.VCase) -> str:
    board = case.board.replace("-", "_")
    load = "" if case.load == "idle" else f"_{case.load}"
    wire = f"_{case.wire}" if case.wire else ""
    if case.kind == "board_silent":
        return f"fault_board_silent_to_faulted_vclock_{board}_{case.transport}{wire}{load}"
    if case.load == "bus_outage":
        return f"fault_off_after_bus_outage_vclock_{case.kind}_{board}_{case.transport}{wire}"
    return f"fault_off_latency_vclock_{case.kind}_{board}_{case.transport}{wire}{load}"


MEANING = {
    "rcd_trip": "from the RCD trip's injection (the EV-CC has no RCD flag: the simulated board "
    "shows it as pilot state E; the Heidelberg's and EVSE DIN's flags are read)",
    "pilot_E": "from the injection of control-pilot state E",
    "pilot_F": "from the injection of control-pilot state F",
    "overdraw": "from the end of the over-current allowance (first meter reading above offer + "
    "margin, + overcurrent_time 5 s)",
    "welded": "from the first meter reading showing current max(welded_time, overcurrent_time) "
    "= 5 s after the acknowledged off of a stop (the weld as that off lands)",
    "meter_silent": "from the last good meter reading + meter_timeout (5 s)",
    "board_silent": "NOT an off latency (a silent board hears nothing): from the board's last "
    "answer to Faulted reported to the central-system port; target board_timeout (1 s) + 10 ms",
    "stop": "from Station.request_stop (a remote stop from outside)",
}

LOAD_MEANING = {
    "idle": "no load",
    "ocpp_flood": "a central system flooding GetConfiguration (all keys) + ChangeConfiguration "
    "(ConnectionTimeOut), back to back, one CALL outstanding, each pair followed by "
    "set_availability(True) and inputs_changed through the station loop; the charge point's "
    "CPU for each CALL (real RpcSession + Configuration, time.thread_time) charged to the "
    "virtual clock as a stall of the whole trio thread",
    "slow_disk": "every SQLite call of the station delayed 50-200 virtual ms (uniform)",
    "bus_drop": "the shared board+meter link dropped at a random instant in the poll cycle "
    "before the injection (reconnect in progress or just done)",
    "bus_outage": "the shared link unreachable for 0.1-0.8 s (TCP: connects hang to the 0.5 s "
    "request deadline; RTU: the port cannot be opened), a remote stop at a random instant in "
    "it; measured from the link's return",
}


def vclock_results(s: fv.VSamples) -> list[Result]:
    case = s.case
    ms = [x * 1e3 for x in s.latency]
    p50, p99, worst = _stats(ms)
    target, ideal, bound = s.target * 1e3, s.ideal * 1e3, s.bound * 1e3
    verdict = "MET" if p99 <= target + 1e-9 else "NOT met"
    if case.kind == "board_silent":
        bounds = f"target {target:.1f} ms ({verdict})"
    else:
        tested = "met" if p99 <= bound + 1e-9 else "NOT met"
        bounds = (
            f"target (poll {s.board_poll * 1e3:g} + one request + 10) {target:.1f} ms: "
            f"p99 {verdict}; ideal (off_ideal) {ideal:.1f} ms, meter in flight "
            f"{s.in_flight * 1e3:.1f} ms, test bound max(target, ideal + in flight + 10) "
            f"{bound:.1f} ms: p99 {tested}"
        )
        if ideal + s.in_flight + 10.0 > target:
            bounds += " (the target is below what the wire allows here: the bound applies)"
        over = sum(1 for x in ms if x > bound + 1e-9)
        if over:
            bounds += f"; {over} of {len(ms)} injections above the test bound"
    note = (
        f"{MEANING[case.kind]}. Load: {LOAD_MEANING[case.load]}. {len(ms)} injections at random "
        f"phases, virtual-clock rig (bench/fault_vclock.py), {case.board} + sdm630 on one "
        f"{'Modbus TCP link' if case.transport == 'tcp' else 'RTU line at 9600 baud'}"
        f"{' with a pty timing (no byte time, no turnaround)' if case.wire == 'pty' else ''}, "
        f"StationSettings defaults (poll cycle as run {s.cycle * 1e3:.1f} ms). {bounds}. "
        f"{s.virtual:.0f} virtual s in {s.wall:.1f} s wall"
    )
    if s.from_request:
        from_request = _stats([x * 1e3 for x in s.from_request])
        note += f"; from the stop request p50/p99/max {_fmt(from_request)} ms"
        if s.board_silent_too:
            note += f"; board_silent reported too in {s.board_silent_too} injections"
    if case.load == "ocpp_flood" and s.flood_virtual > 0:
        per = {a: s.cpu_by_action[a] / s.calls_by_action[a] * 1e3 for a in s.cpu_by_action}
        note += (
            f"; flood: {s.calls} CALLs + {s.loop_calls} loop calls in {s.flood_virtual:.1f} "
            f"virtual s ({s.calls / s.flood_virtual:.0f} CALLs/s), charge-point CPU "
            f"{s.cpu / s.flood_virtual * 100:.0f}% of the flood's time; per CALL "
            + ", ".join(f"{a} {v:.2f} ms" for a, v in sorted(per.items()))
        )
    if case.kind == "welded" and BOARD_MODELS[case.board].capabilities.stop_by_disable:
        late = sum(1 for x in ms if x > 900.0)
        note += (
            f"; on this board the station's acknowledged off is the disable write that "
            f"follows command 0, while the rig's reference counts from command 0's "
            f"acknowledgement (tests/vclock_rig.py ack_time): a reading that falls between "
            f"the two is the rig's reference but not yet the station's, and the verdict comes "
            f"one meter period later ({late} of {len(ms)} injections)"
        )
    if case.kind == "board_silent" and s.not_off_first:
        note += f"; first write after the silence NOT the off in {s.not_off_first} injections"
    if s.anomalies:
        note += f"; {len(s.anomalies)} injection(s) not counted: " + "; ".join(s.anomalies[:3])
    out: list[Result] = []
    for stat, value in (("p50", p50), ("p99", p99), ("max", worst)):
        goal = f"p99 <= {target:.1f} ms" if stat == "p99" else ""
        name = f"{_name(case)}_{stat}"
        if value > 0:
            out.append(
                compare(name, value, target, "ms", higher_is_better=False, target=goal, note=note)
            )
        else:
            out.append(Result(name, value, "ms", target, None, goal, note))
    return out


def real_results(case: RealCase, real: RealSamples, twin: fv.VSamples) -> list[Result]:
    p50, p99, worst = _stats(real.ms)
    vms = [x * 1e3 for x in twin.latency]
    v50, v99, vmax = _stats(vms)
    target = twin.target * 1e3
    where = (
        "Modbus TCP on loopback"
        if case.transport == "tcp"
        else "RTU on the simulator's pseudo-terminal (9600 baud configured: the master keeps "
        "t3.5 = 3.65 ms, the pty moves bytes at once)"
    )
    cycle = sum(real.cycle) / len(real.cycle)
    start, end = real.load
    note = (
        f"from the RCD trip's injection; real sockets: station (plan_from_config, default poll "
        f"intervals and timeouts) and ops.sim.app.Simulator in one trio process over {where}, "
        f"{case.board} + sdm630; {len(real.ms)} injections at random phases ({cycle:.2f} s "
        f"wall each with re-arming, {real.wall:.0f} s in all). Virtual-clock rig, same case"
        f"{' with a pty timing' if case.transport == 'rtu' else ''}: {len(vms)} injections, "
        f"p50/p99/max {v50:.1f}/{v99:.1f}/{vmax:.1f} ms against real {p50:.1f}/{p99:.1f}/"
        f"{worst:.1f} ms (differences: p50 {p50 - v50:+.1f}, p99 {p99 - v99:+.1f}). Target "
        f"{target:.1f} ms. Machine load average {start:.1f} at the start, {end:.1f} at the end"
    )
    if real.spurious:
        note += f"; {len(real.spurious)} fault(s) not injected (not counted): " + "; ".join(
            real.spurious[:3]
        )
    out: list[Result] = []
    for stat, value in (("p50", p50), ("p99", p99), ("max", worst)):
        goal = f"p99 <= {target:.1f} ms" if stat == "p99" else ""
        name = f"fault_off_latency_real_{case.key}_{stat}"
        out.append(
            compare(name, value, target, "ms", higher_is_better=False, target=goal, note=note)
        )
    return out


# -- running ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_station() -> Iterator[None]:
    """The station logs every fault it handles; a thousand of them are not news here."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass(frozen=True)
class Selection:
    kinds: tuple[str, ...] = fv.KINDS
    boards: tuple[str, ...] = fv.BOARDS
    transports: tuple[str, ...] = fv.TRANSPORTS
    loads: tuple[str, ...] = fv.LOADS[1:]

    def keep(self, case: fv.VCase) -> bool:
        return (
            case.kind in self.kinds
            and case.board in self.boards
            and case.transport in self.transports
        )


def _run_safely(case: fv.VCase, n: int, keep: Path | None) -> fv.VSamples | str:
    """One case; a failure is reported (and the run goes on), not raised. With
    ``keep``, a case already done (its samples saved there) is not run again."""
    saved = keep / f"{case.key}-{n}.json" if keep is not None else None
    if saved is not None and saved.exists():
        return fv.VSamples.from_json(json.loads(saved.read_text()))
    try:
        samples = fv.run_vcase(case, n)
    except Exception as exc:
        return f"{case.key}: {type(exc).__name__}: {str(exc)[:2000]}"
    if saved is not None:
        part = saved.with_suffix(".part")
        part.write_text(json.dumps(samples.to_json()))
        part.replace(saved)
    return samples


def _run_pool(
    work: list[tuple[fv.VCase, int]], jobs: int, keep: Path | None
) -> Iterable[fv.VSamples | str]:
    if jobs <= 1:
        with quiet_station():
            for case, n in work:
                yield _run_safely(case, n, keep)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_safely, case, n, keep) for case, n in work]
        for future in futures:
            yield future.result()


def run(
    rec: Recorder,
    *,
    quick: bool = False,
    n: int | None = None,
    load_n: int | None = None,
    real_n: int | None = None,
    jobs: int = JOBS,
    parts: tuple[str, ...] = PARTS,
    selection: Selection | None = None,
    summary: list[tuple[str, str]] | None = None,
    keep: Path | None = None,
) -> None:
    sel = selection or Selection()
    n_matrix = n or (N_MATRIX_QUICK if quick else N_MATRIX)
    n_real = real_n or (N_REAL_QUICK if quick else N_REAL)
    work: list[tuple[fv.VCase, int]] = []
    if "matrix" in parts:
        work += [(c, n_matrix) for c in fv.cases_for("idle") if sel.keep(c)]
    real_cases = [c for c in REAL_CASES if sel.keep(c.twin)] if "real" in parts else []
    matrix_keys = {c.key for c, _ in work}
    work += [(c.twin, n_matrix) for c in real_cases if c.twin.key not in matrix_keys]
    if "loads" in parts:
        for load in sel.loads:
            count = load_n or (N_LOAD_QUICK if quick else N_LOAD)[load]
            work += [
                (c, min(count, N_ALLOWANCE) if c.kind in fv.ALLOWANCE_KINDS else count)
                for c in fv.cases_for(load)
                if sel.keep(c)
            ]
    twins: dict[str, fv.VSamples] = {}
    failed: list[str] = []
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    for samples in _run_pool(work, jobs, keep):
        if isinstance(samples, str):
            failed.append(samples)
            print(f"FAILED {samples}", file=sys.stderr, flush=True)
            continue
        twins[samples.case.key] = samples
        for result in vclock_results(samples):
            rec.emit(result)
            if summary is not None and result.name.endswith("_p99"):
                summary.append((result.name, _row(samples)))
    with quiet_station():
        for i, case in enumerate(real_cases):
            real = trio.run(run_real, case, n_real, 61851 + i)
            twin = twins.get(case.twin.key)
            if twin is None:
                continue
            for result in real_results(case, real, twin):
                rec.emit(result)
            if summary is not None:
                rig_stats = _fmt(_stats([x * 1e3 for x in twin.latency]))
                summary.append((f"real {case.key}", f"{_fmt(_stats(real.ms))} (rig {rig_stats})"))

    if failed:
        raise RuntimeError(f"{len(failed)} case(s) failed: {'; '.join(failed)[:4000]}")


def _row(s: fv.VSamples) -> str:
    ms = [x * 1e3 for x in s.latency]
    p50, p99, worst = _stats(ms)
    met = "yes" if p99 <= s.target * 1e3 + 1e-9 else "no"
    bound = "yes" if p99 <= s.bound * 1e3 + 1e-9 else "no"
    return (
        f"{len(ms):5d} {p50:8.1f} {p99:8.1f} {worst:8.1f} | target {s.target * 1e3:7.1f} {met:3s}"
        f" | ideal {s.ideal * 1e3:6.1f} bound {s.bound * 1e3:7.1f} {bound:3s}"
        f" | {s.wall:6.1f} s wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fault_latency")
    parser.add_argument("--quick", action="store_true", help="far fewer injections")
    parser.add_argument("--n", type=int, help=f"injections per matrix case ({N_MATRIX})")
    parser.add_argument("--load-n", type=int, help=f"injections per loaded case ({N_LOAD})")
    parser.add_argument("--real-n", type=int, help=f"injections per real-socket case ({N_REAL})")
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help=f"processes for the rig cases ({JOBS})"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="save each rig case's samples in this directory, and reuse them (resume a run)",
    )
    parser.add_argument("--part", action="append", choices=PARTS)
    parser.add_argument("--kind", action="append", choices=fv.KINDS)
    parser.add_argument("--board", action="append", choices=fv.BOARDS)
    parser.add_argument("--transport", action="append", choices=fv.TRANSPORTS)
    parser.add_argument("--load", action="append", choices=fv.LOADS[1:])
    args = parser.parse_args()
    selection = Selection(
        kinds=tuple(args.kind or fv.KINDS),
        boards=tuple(args.board or fv.BOARDS),
        transports=tuple(args.transport or fv.TRANSPORTS),
        loads=tuple(args.load or fv.LOADS[1:]),
    )
    summary: list[tuple[str, str]] = []
    begun = time.perf_counter()
    try:
        run(
            Recorder(RESULTS),
            quick=args.quick,
            n=args.n,
            load_n=args.load_n,
            real_n=args.real_n,
            jobs=args.jobs,
            parts=tuple(args.part or PARTS),
            selection=selection,
            summary=summary,
            keep=args.keep,
        )
    finally:
        _print_summary(summary, begun)


def _print_summary(summary: list[tuple[str, str]], begun: float) -> None:
    width = max((len(name) for name, _ in summary), default=0)
    print(f"{'case':{width}}     n      p50      p99      max   (ms)", file=sys.stderr)
    for name, row in summary:
        print(f"{name:{width}} {row}", file=sys.stderr)
    print(f"wall time {time.perf_counter() - begun:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
