"""Offline backlog replay: N queued transaction messages against a central system with RTT R.

The station was offline while transactions ran: its queue (``ocpp16.queue``,
in the data directory's ``station.sqlite``) holds, per transaction, a
StartTransaction, MeterValues and a StopTransaction, with placeholder
transactionIds, exactly as ``ocpp16.chargepoint`` enqueues them. The bench
writes that backlog with ``TransactionQueue`` itself before the station
starts (the file is first created by ``evse.store.Store``, as ``evse run``
opens it), then runs ``evse run --sim`` against ``python -m ops.csms
--rtt-ms R`` (which holds every CALLRESULT back R ms).

Measured at the central system, from its record (``t``: message received,
``responded_t``: CALLRESULT sent, both ``time.monotonic()`` of its process):
the span from the first queued message received to the last one answered,
against N x R, the floor one-at-a-time delivery allows (OCPP-J 1.6 4.1.1).
Where the excess goes is split into the central system's share (received ->
answered, minus R: its handler, schema validation and timer overshoot) and
the charge point's turnaround (answer sent -> next message received: the
station reads the answer, commits the delivery to disk with an fsync, reads
the next head and sends it).

Two points: R = 5 ms with 10,000 messages (1,000 transactions), where the
per-message costs on both sides show, and R = 50 ms with 1,000 (a cellular
link, ``_rtt50``). Quick mode: a tenth of the messages at 5 ms, 200 at 50 ms.

Checked: every queued message arrived exactly once (by its OCPP-J message
id), in queue order, and every StopTransaction and MeterValues carried the
transactionId the central system gave its StartTransaction; the queue is
empty afterwards.

``python -m bench.offline_replay [--quick]`` runs this alone (results go to
``$BENCH_RESULTS``, which it overwrites).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.results import RESULTS, Recorder, Result
from evse.store import Store
from ocpp16.metering import MeterSnapshot, format_time, meter_value
from ocpp16.queue import TransactionQueue
from tests.csms_peer import Csms, health, messages, running_csms

ROOT = Path(__file__).resolve().parent.parent
CP = "CP-1"
TAG = "04A2B3C4"
#: MeterValues per transaction: with its Start and Stop, 10 messages each.
METER_VALUES_PER_TX = 8
TARGET_RATIO = 1.2
IDLE_WINDOW = 2.0


@dataclass(frozen=True)
class Queued:
    unique_id: str
    action: str
    local_tx_id: int


def fill_queue(path: Path, transactions: int) -> list[Queued]:
    """The backlog, as the charge point enqueues it; queue order."""
    Store.open(path).close()  # the station's own tables first, as open_central does
    out: list[Queued] = []
    begin = datetime.now(UTC) - timedelta(days=30)
    energy = 1_000_000.0
    with TransactionQueue.open(path) as queue:
        for local in range(1, transactions + 1):
            at = begin + timedelta(hours=local)
            start = {
                "connectorId": 1,
                "idTag": TAG,
                "meterStart": round(energy),
                "timestamp": format_time(at),
            }
            m = queue.enqueue(
                "StartTransaction", start, local_tx_id=local, dedupe_key=f"start:{local}"
            )
            out.append(Queued(m.unique_id, m.action, local))
            for _ in range(METER_VALUES_PER_TX):
                at += timedelta(minutes=5)
                energy += 900.0
                snapshot = MeterSnapshot(
                    energy_wh=energy,
                    power_w=11_000.0,
                    current_a=(16.0, 16.0, 16.0),
                    voltage_v=(230.0, 230.0, 230.0),
                    offered_a=16.0,
                    timestamp=at,
                )
                value = meter_value(snapshot, ["Energy.Active.Import.Register"], "Sample.Periodic")
                payload = {"connectorId": 1, "transactionId": -local, "meterValue": [value]}
                m = queue.enqueue("MeterValues", payload, local_tx_id=local)
                out.append(Queued(m.unique_id, m.action, local))
            at += timedelta(minutes=5)
            stop = {
                "transactionId": -local,
                "meterStop": round(energy),
                "timestamp": format_time(at),
                "reason": "EVDisconnected",
            }
            m = queue.enqueue(
                "StopTransaction", stop, local_tx_id=local, dedupe_key=f"stop:{local}"
            )
            out.append(Queued(m.unique_id, m.action, local))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Progress:
    """Polls during the replay: (monotonic s, frames received at the central system,
    station CPU s, central system CPU s); then the station's CPU s per s while idle."""

    polls: list[tuple[float, int, float, float]]
    station_idle: float = 0.0

    def cpu_per_message(self) -> tuple[float, float]:
        """CPU ms per message, mid-replay: the station's (less its idle rate), the csms's."""
        busy = [p for p in self.polls if p[1] > 50]
        if len(busy) < 2:
            return (float("nan"), float("nan"))
        (t0, n0, s0, c0), (t1, n1, s1, c1) = busy[0], busy[-1]
        count = max(1, n1 - n0)
        station = s1 - s0 - self.station_idle * (t1 - t0)
        return (station / count * 1e3, (c1 - c0) / count * 1e3)


def received(
    csms: Csms, wanted: set[str], deadline: float, station_pid: int, progress: Progress
) -> list[dict[str, Any]]:
    """The central system's records of the queued messages, once all are answered.

    Polls the cheap /health count meanwhile: fetching the record is work for
    the central system's event loop, which would delay its answers.
    """
    base = len(wanted)
    while True:
        count = int(health(csms)["messages"])  # frames received, of every kind
        progress.polls.append(
            (time.monotonic(), count, cpu_seconds(station_pid), cpu_seconds(csms.process.pid))
        )
        if count >= base:
            records = [
                m
                for m in messages(csms, CP)
                if m.get("type") == "CALL" and m.get("uniqueId") in wanted
            ]
            if len(records) >= base and all("response" in m for m in records):
                # What the station burns with nothing to send (simulator, polling).
                cpu, start = cpu_seconds(station_pid), time.monotonic()
                time.sleep(IDLE_WINDOW)
                progress.station_idle = (cpu_seconds(station_pid) - cpu) / (
                    time.monotonic() - start
                )
                return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"the backlog was not delivered by the deadline ({base} messages)")
        time.sleep(0.5)


def verify(queued: list[Queued], records: list[dict[str, Any]]) -> None:
    ids = [m["uniqueId"] for m in records]
    if len(ids) != len(set(ids)) or any(m.get("duplicate") for m in records):
        raise AssertionError("a queued message arrived more than once")
    if ids != [q.unique_id for q in queued]:
        raise AssertionError("the queued messages did not arrive in queue order")
    by_id = {q.unique_id: q for q in queued}
    real: dict[int, int] = {}
    for m in records:
        q = by_id[m["uniqueId"]]
        if m["action"] != q.action:
            raise AssertionError(f"{q.unique_id}: {m['action']} arrived, {q.action} was queued")
        if q.action == "StartTransaction":
            real[q.local_tx_id] = m["response"]["payload"]["transactionId"]
        elif m["payload"]["transactionId"] != real.get(q.local_tx_id):
            carried, given = m["payload"]["transactionId"], real.get(q.local_tx_id)
            raise AssertionError(
                f"{q.action} of local transaction {q.local_tx_id} carried transactionId "
                f"{carried}, its StartTransaction got {given}"
            )
    if len(set(real.values())) != len(real):
        raise AssertionError("two transactions got the same transactionId")


@dataclass
class Replay:
    n: int
    transactions: int
    rtt_ms: float
    span: float
    fill_s: float
    load: float
    #: Per message: central system received -> answered, minus the RTT (ms).
    central: list[float]
    #: Per message: answer sent -> next message received (ms).
    turnaround: list[float]
    station_cpu_ms: float
    csms_cpu_ms: float


def replay(transactions: int, rtt_ms: float) -> Replay:
    n = transactions * (METER_VALUES_PER_TX + 2)
    load = os.getloadavg()[0]
    progress = Progress([])
    with tempfile.TemporaryDirectory(prefix="bench-offline-replay-") as tmp:
        work = Path(tmp)
        data_dir = work / "station"
        data_dir.mkdir()
        t0 = time.perf_counter()
        queued = fill_queue(data_dir / "station.sqlite", transactions)
        fill_s = time.perf_counter() - t0
        with (
            running_csms("--rtt-ms", f"{rtt_ms:g}", "--boot-interval", "3600") as csms,
            open(work / "station.log", "w") as log,
        ):
            station = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ops.cli",
                    "run",
                    "--sim",
                    "--sim-control-port",
                    "0",
                    "--data-dir",
                    str(data_dir),
                    "--csms-url",
                    csms.ws,
                    "--id",
                    CP,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
            )
            try:
                deadline = time.monotonic() + 60 + n * rtt_ms / 1000 * 5
                wanted = {q.unique_id for q in queued}
                records = received(csms, wanted, deadline, station.pid, progress)
            except BaseException:
                sys.stderr.write((work / "station.log").read_text()[-4000:])
                raise
            finally:
                if station.poll() is None:
                    station.send_signal(signal.SIGTERM)
                try:
                    station.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    station.kill()
                    station.wait()
        records.sort(key=lambda m: m["seq"])
        verify(queued, records)
        with TransactionQueue.open(data_dir / "station.sqlite") as queue:
            left = queue.pending_count()
        if left:
            raise AssertionError(f"{left} messages still queued after the replay")
    station_cpu, csms_cpu = progress.cpu_per_message()
    return Replay(
        n=n,
        transactions=transactions,
        rtt_ms=rtt_ms,
        span=records[-1]["responded_t"] - records[0]["t"],
        fill_s=fill_s,
        load=load,
        central=[(m["responded_t"] - m["t"]) * 1e3 - rtt_ms for m in records],
        turnaround=[(b["t"] - a["responded_t"]) * 1e3 for a, b in itertools.pairwise(records)],
        station_cpu_ms=station_cpu,
        csms_cpu_ms=csms_cpu,
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def emit(rec: Recorder, r: Replay, suffix: str) -> None:
    ideal = r.n * r.rtt_ms / 1000
    setup = (
        f"{r.n} queued messages ({r.transactions} transactions x Start + "
        f"{METER_VALUES_PER_TX} MeterValues + Stop), ops.csms --rtt-ms {r.rtt_ms:g}; "
        f"all arrived once, in order, with real transactionIds; 1-min load {r.load:.1f}"
    )
    per_message = r.span / r.n * 1e3
    rec.emit(
        Result(
            f"offline_replay_time_over_n_rtt{suffix}",
            r.span / ideal,
            "x N*RTT",
            None,
            None,
            target=f"<= {TARGET_RATIO}",
            note=f"{r.span:.2f} s for N*RTT = {ideal:.2f} s: {per_message:.2f} ms per message = "
            f"RTT {r.rtt_ms:g} + central system {statistics.fmean(r.central):.2f} (mean) + "
            f"charge point turnaround {statistics.fmean(r.turnaround):.2f} (mean); {setup}",
        )
    )
    rec.emit(
        Result(
            f"offline_replay_throughput{suffix}",
            r.n / r.span,
            "msg/s",
            None,
            None,
            target=f">= {1000 / r.rtt_ms / TARGET_RATIO:.0f} msg/s",
            note=f"first queued message received to last answered; floor 1/RTT = "
            f"{1000 / r.rtt_ms:.0f} msg/s; queue filled in {r.fill_s:.1f} s beforehand",
        )
    )
    rec.emit(
        Result(
            f"offline_replay_cp_turnaround_p50{suffix}",
            _pct(r.turnaround, 50),
            "ms",
            None,
            None,
            note="charge point's share per message: CALLRESULT sent -> next message received "
            f"(mean {statistics.fmean(r.turnaround):.2f}, p99 {_pct(r.turnaround, 99):.2f} ms): "
            "response parsed and validated, delivered() committed (fsync), next head read, "
            f"request validated and sent; station CPU {r.station_cpu_ms:.2f} ms per message "
            "(less its idle rate)",
        )
    )
    rec.emit(
        Result(
            f"offline_replay_csms_overhead_p50{suffix}",
            _pct(r.central, 50),
            "ms",
            None,
            None,
            note="central system's share per message beyond the RTT: received -> answered "
            f"minus {r.rtt_ms:g} ms (mean {statistics.fmean(r.central):.2f}, p99 "
            f"{_pct(r.central, 99):.2f} ms): ocpp package routing, schema validation in "
            f"worker threads, asyncio timer overshoot; its CPU {r.csms_cpu_ms:.2f} ms per message",
        )
    )


def run(rec: Recorder, *, quick: bool = False) -> None:
    # 5 ms: the headline (the backlog's own cost shows); 50 ms: a cellular link.
    emit(rec, replay(100 if quick else 1000, 5.0), "")
    emit(rec, replay(20 if quick else 100, 50.0), "_rtt50")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.offline_replay")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(Recorder(RESULTS), quick=args.quick)


if __name__ == "__main__":
    main()
