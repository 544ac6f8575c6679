"""Kill -9 soak: the station killed at random moments, checked at an independent central system.

One central system (``python -m evse_lab.csms``, its record of every message it
received, payloads included) and one device simulator (``python -m ops.cli
sim``: an EVSE DIN board and an SDM630 meter over Modbus TCP, an EV driven
through its HTTP control interface) run for the whole soak. The station is
``python -m ops.cli run --config FILE`` (authorization mode free: plugging in
authorizes; MeterValueSampleInterval 5 s; its data directory, and so its
SQLite file, is the same across restarts), relaunched after every kill, with
its fsync/fdatasync slowed on about half the launches by an LD_PRELOAD shim
(``bench/slowfsync.c``, compiled with gcc into the work directory; without
gcc the slow half is skipped and the summary says so). Station, simulator
and ``evse config`` run from a copy of the firmware's packages taken when the
soak starts (``snapshot``; the summary's ``source`` names the commit and the
uncommitted files it held), so edits to the working tree while the soak runs
neither break a relaunch nor mix versions.

Sessions (plug in, charge for a random time, unplug) run one after another;
each has one ``kill -9`` of the station, at a random moment of the phase it
was dealt (phases come in shuffled decks of four, so each gets about a
quarter of the kills):

* ``start``: right after the plug-in (the transaction's record, its
  StartTransaction, the contactor closing);
* ``charging``: at a random time while charging (MeterValues flowing); the
  EV is unplugged while the station is dead half the time;
* ``stop``: right after the unplug (the stop record and its StopTransaction);
* ``replay``: the central system refuses the station for a while (connection
  aborted, handshakes answered 503) so the queue fills, the station is
  killed, then relaunched with the central system holding every answer
  back 150-400 ms, and killed again right after it has connected, at a
  random point of the drain (the queue's length, read from the file just
  before the kill, is the evidence: ``replay_kills_with_backlog``).

After the last kill the EV is unplugged, the station is restarted cleanly
(SIGTERM, relaunch), the bench waits until its queue is empty and stops it
with SIGTERM. Then, from the station's SQLite file (read here, with sqlite3,
by this process: ``transactions``, ``ocpp_tx_ids``, ``ocpp_delivered``,
``ocpp_queue``, ``ocpp_dead_letters``) and the central system's record:

* every transaction of the station's file has exactly one StartTransaction
  and exactly one StopTransaction at the central system, counted by distinct
  OCPP message id (a resend of the same message id is not a duplicate; resends
  are counted apart), the Stop and every MeterValues carrying the
  transactionId the central system gave the Start; nothing else arrived (no
  Start the station's file does not know, no message for an unknown
  transactionId) and nothing is left queued or dead;
* stamped in order: Start.timestamp <= each MeterValues timestamp <=
  Stop.timestamp, MeterValues timestamps never going back in the order sent,
  and delivered in order (Start, its MeterValues, then its Stop);
* meterStart <= every Energy.Active.Import.Register value <= meterStop, the
  values never decreasing in the order sent. meterStart and meterStop are
  whole Wh (rounded), sampled values have 3 decimals: a value is compared at
  the Wh resolution of the two fields (rounded), and the cases that only the
  rounding explains are counted apart (``sub_wh_rounding``), not as
  violations.

Every violation is listed with its transaction, message ids, timestamps and
energies. The process exits non-zero if anything was lost, duplicated, out of
order or decreasing.

``python -m bench.kill_soak [--kills N] [--seed S] [--slow-fsync-ms MS]
[--keep]`` runs this alone (results go to ``$BENCH_RESULTS``, which it
overwrites); ``nox -s bench`` runs it with 150 kills (``--quick``: 20).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from bench.results import RESULTS, Recorder, Result
from tests.csms_peer import Csms, chargepoints, configure, disconnect, messages, running_csms

ROOT = Path(__file__).resolve().parent.parent
CP = "CP-SOAK"
PHASES = ("start", "charging", "stop", "replay")
TX_ACTIONS = ("StartTransaction", "StopTransaction", "MeterValues")
ENERGY = "Energy.Active.Import.Register"
SAMPLE_INTERVAL_S = 5
DEFAULT_SLOW_MS = 100
READY_WITHIN = 90.0
DRAIN_WITHIN = 180.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SoakError(Exception):
    """The soak could not go on (a process failed to start, a deadline passed)."""


# -- the slow disk ---------------------------------------------------------------------


def build_shim(work: Path) -> tuple[Path | None, str]:
    """Compile bench/slowfsync.c into ``work``; (the .so or None, why not)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None, "gcc not found: the slowed-fsync half of the starts was skipped"
    out = work / "slowfsync.so"
    done = subprocess.run(
        [
            gcc,
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            str(out),
            str(ROOT / "bench" / "slowfsync.c"),
            "-ldl",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None, f"gcc failed ({done.stderr.strip()[:200]}): the slowed half was skipped"
    return out, ""


_PROBE = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE IF NOT EXISTS t (x)")
t = time.perf_counter()
for i in range(3):
    c.execute("INSERT INTO t VALUES (?)", (i,))
print((time.perf_counter() - t) / 3)
"""


def commit_seconds(work: Path, env: dict[str, str]) -> float:
    """Mean time of one SQLite commit (WAL, synchronous=FULL) in a child with ``env``."""
    db = work / f"probe-{len(env)}-{time.monotonic_ns()}.sqlite"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(db)], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


# -- the code under test ------------------------------------------------------------------

#: What the station, the simulator and ``evse config`` import.
PACKAGES = ("evse", "ocpp16", "fieldbus", "ops")


def snapshot(work: Path, attempts: int = 6) -> tuple[Path, dict[str, Any]]:
    """A copy of the firmware's packages to run every launch from; what was copied.

    The working tree changes while the soak runs (other work goes on in it), and
    every relaunch imports the firmware afresh: a half-saved file would end the
    soak, two launches could run different code. So the station and the
    simulator run from a copy taken at the start (children run ``-m`` with the
    copy as their working directory, which comes before the editable install
    on ``sys.path``), checked to compile and import, taken again if it does not.
    """
    dest = work / "src"
    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(10)
        shutil.rmtree(dest, ignore_errors=True)
        for package in PACKAGES:
            shutil.copytree(
                ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        compiled = subprocess.run(
            [sys.executable, "-m", "compileall", "-q", *PACKAGES],
            cwd=dest,
            capture_output=True,
            text=True,
            check=False,
        )
        imported = subprocess.run(
            [sys.executable, "-c", "import ops.cli, ops.run, ops.sim.app, ops.config"],
            cwd=dest,
            capture_output=True,
            text=True,
            check=False,
        )
        if compiled.returncode == 0 and imported.returncode == 0:
            return dest, _source_info()
        last = (compiled.stdout + compiled.stderr + imported.stderr).strip()[-600:]
    raise SoakError(f"the working tree did not compile and import in {attempts} tries: {last}")


def _source_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.rstrip() if done.returncode == 0 else ""

    status = git("status", "--porcelain", "--", *PACKAGES)
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted": sorted(line[3:] for line in status.splitlines() if line),
        "copied_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- the processes -----------------------------------------------------------------------


def _http(url: str, method: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            raise SoakError(f"{method} {url}: HTTP {error.code} {error.read()[:200]!r}") from None


def _ready_line(process: subprocess.Popen[str], within: float, what: str) -> dict[str, Any]:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(within):
            raise SoakError(f"{what} printed nothing within {within} s")
    line = process.stdout.readline()
    if not line:
        raise SoakError(f"{what} exited with {process.wait()} before it was ready")
    return dict(json.loads(line)["ready"])


@contextmanager
def running_sim(log: IO[str], cwd: Path) -> Iterator[dict[str, Any]]:
    """``python -m ops.cli sim`` on free ports, Modbus TCP only; its ready line."""
    argv = [sys.executable, "-m", "ops.cli", "sim", "--tcp-port", "0", "--control-port", "0"]
    process = subprocess.Popen(
        [*argv, "--no-rtu"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=cwd,
    )
    try:
        yield _ready_line(process, 30, "the simulator")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask_station(path: Path, method: str, resource: str, timeout: float = 5.0) -> Any | None:
    """The station's control socket's JSON answer; None if nobody answers (or 503)."""
    connection = _UnixHTTPConnection(str(path), timeout)
    try:
        connection.request(method, resource, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def pending_in_file(db: Path) -> int | None:
    """Messages in the station's queue, read straight from its file (None if unreadable)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            return int(conn.execute("SELECT count(*) FROM ocpp_queue").fetchone()[0])
    except sqlite3.Error:
        return None


def write_config(path: Path, data_dir: Path, modbus: str) -> None:
    path.write_text(
        f"""# evse run --config for the kill -9 soak (bench/kill_soak.py)
[station]
serial = "SOAK-0001"
id = "{CP}"
data_dir = "{data_dir}"

[limits]
installer_max = 16.0

[board]
kind = "evse-din"
port = "{modbus}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{modbus}"
unit = 2
timeout = 0.3

[authorization]
mode = "free"

[safety]
persist_interval = 2.0
"""
    )


@dataclass
class Station:
    """``evse run --config``, relaunched after every kill, on one data directory."""

    config: Path
    data_dir: Path
    csms: Csms
    log: IO[str]
    shim: Path | None
    slow_ms: int
    lock_dir: Path
    src: Path
    process: subprocess.Popen[bytes] | None = None
    launches: int = 0
    slowed: int = 0
    boot_seconds: list[float] = field(default_factory=list)
    launched_at: float = 0.0

    @property
    def socket(self) -> Path:
        return self.data_dir / "control.sock"

    @property
    def db(self) -> Path:
        return self.data_dir / "station.sqlite"

    def launch(self, *, slow: bool) -> int:
        """Start it; the central system's message count just before (for ``wait_*``)."""
        assert self.process is None or self.process.poll() is not None
        since = int(messages_last(self.csms))
        env = dict(os.environ)
        env["EVSE_LOCK_DIR"] = str(self.lock_dir)
        slow = slow and self.shim is not None
        if slow:
            assert self.shim is not None
            env["LD_PRELOAD"] = str(self.shim)
            env["SLOWFSYNC_MS"] = str(self.slow_ms)
            self.slowed += 1
        self.launches += 1
        self.log.write(f"\n=== launch {self.launches} slow_fsync={slow} at {time.time():.3f}\n")
        self.log.flush()
        argv = [sys.executable, "-m", "ops.cli", "run", "--config", str(self.config)]
        argv += ["--csms-url", self.csms.ws, "--id", CP]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, cwd=self.src, env=env
        )
        self.launched_at = time.monotonic()
        return since

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            code = None if self.process is None else self.process.returncode
            raise SoakError(f"the station exited with {code} while {what}")

    def wait_connected(self, since: int, within: float = READY_WITHIN) -> None:
        """Until the central system has answered a BootNotification of this launch."""
        deadline = time.monotonic() + within
        while True:
            self._check_alive("the bench waited for its BootNotification")
            boots = messages(self.csms, CP, since, "BootNotification")
            if any(m.get("type") == "CALL" and "response" in m for m in boots):
                self.boot_seconds.append(time.monotonic() - self.launched_at)
                return
            if time.monotonic() > deadline:
                raise SoakError(f"no BootNotification within {within} s of launch {self.launches}")
            time.sleep(0.05)

    def wait_ready(self, since: int, within: float = READY_WITHIN) -> dict[str, Any]:
        """Connected, and its control socket answers: its status."""
        self.wait_connected(since, within)
        deadline = time.monotonic() + within
        while True:
            self._check_alive("the bench waited for its control socket")
            status = ask_station(self.socket, "GET", "/status")
            if status is not None:
                return dict(status)
            if time.monotonic() > deadline:
                raise SoakError(f"no control socket within {within} s of launch {self.launches}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self._check_alive("the bench was about to kill it")
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.write(f"=== killed at {time.time():.3f}\n")
        self.log.flush()

    def terminate(self, within: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise SoakError(f"the station did not stop within {within} s of SIGTERM") from None


def messages_last(csms: Csms) -> int:
    """The central system's record length (its last ``seq``)."""
    return int(_http(csms.control + "/messages?since=1000000000", "GET")["last"])


# -- the soak --------------------------------------------------------------------------


@dataclass
class Soak:
    rng: random.Random
    sim: dict[str, Any]
    station: Station
    csms: Csms
    kills: Counter[str] = field(default_factory=Counter)
    replay_backlogs: list[int] = field(default_factory=list)
    plugged: bool = False

    def ev(self, path: str, body: Any = None) -> None:
        _http(self.sim["control"] + path, "POST", body if body is not None else {})

    def plug(self) -> None:
        self.ev("/plug", {"phases": self.rng.choice((1, 3)), "wants": "C"})
        self.plugged = True

    def unplug(self) -> None:
        self.ev("/unplug")
        self.plugged = False

    def sleep(self, low: float, high: float) -> None:
        time.sleep(self.rng.uniform(low, high))

    def slow_coin(self) -> bool:
        return self.rng.random() < 0.5

    def kill(self, phase: str) -> None:
        self.station.kill()
        self.kills[phase] += 1

    def relaunch(self) -> int:
        time.sleep(self.rng.uniform(0.0, 0.5))  # systemd's restart delay, shortened
        return self.station.launch(slow=self.slow_coin())

    def restart(self) -> None:
        self.station.wait_ready(self.relaunch())

    def session(self, phase: str) -> None:
        getattr(self, f"_{phase}")()
        if self.plugged:
            self.sleep(1.0, 10.0)
            self.unplug()
        self.sleep(0.3, 1.5)

    def _start(self) -> None:
        self.plug()
        self.sleep(0.0, 1.2)
        self.kill("start")
        self.restart()

    def _charging(self) -> None:
        self.plug()
        self.sleep(2.0, 16.0)
        self.kill("charging")
        if self.rng.random() < 0.5:
            self.sleep(0.0, 1.0)
            self.unplug()  # the driver leaves while the station is down
        self.restart()

    def _stop(self) -> None:
        self.plug()
        self.sleep(2.0, 14.0)
        self.unplug()
        self.sleep(0.0, 0.8)
        self.kill("stop")
        self.restart()

    def _replay(self) -> None:
        self.plug()
        self.sleep(1.0, 6.0)
        configure(self.csms, refuse_for=3600)
        if CP in chargepoints(self.csms)["connected"]:
            disconnect(self.csms, CP, abort=True)
        self.sleep(6.0, 14.0)  # offline: MeterValues queue up
        if self.rng.random() < 0.5:
            self.unplug()  # and the Stop
            self.sleep(0.2, 1.5)
        self.kill("replay-offline")
        rtt = self.rng.uniform(150.0, 400.0)
        configure(self.csms, refuse_for=0, rtt_ms=rtt)
        since = self.relaunch()
        self.station.wait_connected(since)
        # Somewhere in the drain: each queued message takes at least one RTT.
        queued = pending_in_file(self.station.db) or 0
        self.sleep(0.0, max(0.3, queued * rtt / 1000))
        backlog = pending_in_file(self.station.db)
        self.kill("replay")
        self.replay_backlogs.append(-1 if backlog is None else backlog)
        configure(self.csms, rtt_ms=0)
        self.restart()


# -- the check ---------------------------------------------------------------------------


def _parse(stamp: Any) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def _ms(span: timedelta) -> str:
    return f"{span.total_seconds() * 1e3:.0f}"


def _energy_wh(meter_values: Any) -> list[tuple[str, float]]:
    """(timestamp, Wh) of every Energy.Active.Import.Register sample, in order."""
    out: list[tuple[str, float]] = []
    for value in meter_values or ():
        if not isinstance(value, dict):
            continue
        for sample in value.get("sampledValue") or ():
            if sample.get("measurand", ENERGY) != ENERGY:
                continue
            try:
                wh = float(sample["value"])
            except (KeyError, TypeError, ValueError):
                continue
            if sample.get("unit") == "kWh":
                wh *= 1000.0
            out.append((str(value.get("timestamp")), wh))
    return out


@dataclass
class Message:
    """One distinct OCPP message (by message id) as the central system received it."""

    unique_id: str
    action: str
    payload: dict[str, Any]
    seq: int  # first receipt
    received: int  # frames with this id
    answer: dict[str, Any] | None
    reused: bool  # the same id came with another action or payload

    def brief(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.unique_id, "action": self.action, "seq": self.seq}
        p = self.payload
        for key in ("transactionId", "timestamp", "meterStart", "meterStop", "reason"):
            if key in p:
                out[key] = p[key]
        if self.action == "MeterValues":
            out["energy"] = [[t, wh] for t, wh in _energy_wh(p.get("meterValue"))]
        if self.received > 1:
            out["received"] = self.received
        return out


def distinct_messages(records: list[dict[str, Any]]) -> list[Message]:
    by_id: dict[str, Message] = {}
    for m in sorted(records, key=lambda r: int(r["seq"])):
        if m.get("type") != "CALL" or m.get("action") not in TX_ACTIONS:
            continue
        uid = str(m["uniqueId"])
        payload = m.get("payload") if isinstance(m.get("payload"), dict) else {}
        assert isinstance(payload, dict)
        answer = m.get("response", {}).get("payload") if "response" in m else None
        first = by_id.get(uid)
        if first is None:
            by_id[uid] = Message(uid, str(m["action"]), payload, int(m["seq"]), 1, answer, False)
            continue
        first.received += 1
        if (first.action, first.payload) != (m["action"], payload):
            first.reused = True
        if first.answer is None:
            first.answer = answer
    return sorted(by_id.values(), key=lambda x: x.seq)


@dataclass
class StationFile:
    transactions: list[dict[str, Any]]
    tx_ids: dict[int, int]  # local -> central transactionId
    delivered: dict[str, tuple[str, int]]  # unique id -> (action, local)
    pending: list[dict[str, Any]]
    dead: list[dict[str, Any]]


def read_station_file(db: Path) -> StationFile:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM transactions ORDER BY id")]
        ids = {
            int(r[0]): int(r[1])
            for r in conn.execute("SELECT local_tx_id, transaction_id FROM ocpp_tx_ids")
        }
        delivered = {
            str(r[0]): (str(r[1]), int(r[2]))
            for r in conn.execute("SELECT unique_id, action, local_tx_id FROM ocpp_delivered")
        }
        pending = [
            dict(r)
            for r in conn.execute(
                "SELECT seq, action, local_tx_id, unique_id, attempts FROM ocpp_queue"
            )
        ]
        dead = [
            dict(r)
            for r in conn.execute(
                "SELECT seq, action, local_tx_id, unique_id, attempts, reason"
                " FROM ocpp_dead_letters"
            )
        ]
    return StationFile(rows, ids, delivered, pending, dead)


@dataclass
class Verdict:
    transactions: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    energy_decreasing: int = 0
    sub_wh_rounding: int = 0
    record_mismatch: int = 0
    violations: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)
    resends: dict[str, int] = field(default_factory=dict)
    stop_reasons: dict[str, int] = field(default_factory=dict)
    meter_values_per_tx_max: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.duplicated or self.out_of_order or self.energy_decreasing)


def _round_wh(value: float) -> int:
    return round(value)


def check(station: StationFile, records: list[dict[str, Any]]) -> Verdict:
    v = Verdict(transactions=len(station.transactions))
    msgs = distinct_messages(records)
    for action in TX_ACTIONS:
        v.messages[action] = sum(1 for m in msgs if m.action == action)
        v.resends[action] = sum(m.received - 1 for m in msgs if m.action == action)
    v.stop_reasons = dict(Counter(str(t["stop_reason"]) for t in station.transactions))
    central_to_local = {c: loc for loc, c in station.tx_ids.items()}
    rows = {int(t["id"]): t for t in station.transactions}

    def violation(kind: str, local: int | None, **details: Any) -> None:
        v.violations.append({"kind": kind, "local_tx": local, **details})

    for m in msgs:
        if m.reused:
            v.duplicated += 1
            violation("message id reused for another message", None, message=m.brief())
        if m.answer is None:
            violation("never answered", None, message=m.brief())
    # Each distinct StartTransaction: its central transactionId and the station's transaction.
    starts_of: dict[int, list[Message]] = {}
    central_of_start: dict[str, int] = {}
    for m in msgs:
        if m.action != "StartTransaction":
            continue
        tid = m.answer.get("transactionId") if m.answer else None
        if isinstance(tid, int):
            central_of_start[m.unique_id] = tid
        local: int | None = None
        if m.unique_id in station.delivered:
            local = station.delivered[m.unique_id][1]
        elif isinstance(tid, int) and tid in central_to_local:
            local = central_to_local[tid]
        else:
            for row in station.transactions:  # same start as a known one: a second copy
                if (
                    m.payload.get("meterStart") == _round_wh(row["meter_start_wh"])
                    and str(m.payload.get("timestamp", ""))[:19] == str(row["started_at"])[:19]
                ):
                    local = int(row["id"])
        if local is None or local not in rows:
            v.duplicated += 1
            violation(
                "StartTransaction of no transaction in the station's file", local, message=m.brief()
            )
            continue
        starts_of.setdefault(local, []).append(m)
    known_central = set(central_of_start.values())
    followers: dict[int, list[Message]] = {}
    for m in msgs:
        if m.action == "StartTransaction":
            continue
        tid = m.payload.get("transactionId")
        if not isinstance(tid, int) or tid not in known_central:
            v.lost += 1
            violation(f"{m.action} for an unknown transactionId", None, message=m.brief())
            continue
        followers.setdefault(tid, []).append(m)

    for row in station.transactions:
        local = int(row["id"])
        record = {
            "started_at": row["started_at"],
            "meter_start_wh": row["meter_start_wh"],
            "stopped_at": row["stopped_at"],
            "meter_stop_wh": row["meter_stop_wh"],
            "stop_reason": row["stop_reason"],
        }
        starts = starts_of.get(local, [])
        if row["stop_reason"] is None:
            v.lost += 1
            violation(
                "transaction still running after the final clean restart", local, record=record
            )
            continue
        if not starts:
            v.lost += 1
            violation("no StartTransaction at the central system", local, record=record)
            continue
        if len(starts) > 1:
            v.duplicated += 1
            violation(
                f"{len(starts)} distinct StartTransactions",
                local,
                record=record,
                messages=[s.brief() for s in starts],
            )
        start = starts[0]
        tid = central_of_start.get(start.unique_id)
        if tid is None:
            v.lost += 1
            violation("StartTransaction never answered", local, record=record, start=start.brief())
            continue
        if station.tx_ids.get(local) != tid:
            violation(
                "the station's transactionId differs from its Start's",
                local,
                station=station.tx_ids.get(local),
                central=tid,
            )
        mine = followers.get(tid, [])
        stops = [m for m in mine if m.action == "StopTransaction"]
        values = [m for m in mine if m.action == "MeterValues"]
        v.meter_values_per_tx_max = max(v.meter_values_per_tx_max, len(values))
        if not stops:
            v.lost += 1
            violation(
                "no StopTransaction at the central system",
                local,
                transactionId=tid,
                record=record,
                start=start.brief(),
                meter_values=[m.brief() for m in values],
            )
            continue
        if len(stops) > 1:
            v.duplicated += 1
            violation(
                f"{len(stops)} distinct StopTransactions",
                local,
                transactionId=tid,
                record=record,
                messages=[s.brief() for s in stops],
            )
        stop = stops[0]
        # The station's record against what was sent (meters: whole Wh).
        if start.payload.get("meterStart") != _round_wh(row["meter_start_wh"]) or stop.payload.get(
            "meterStop"
        ) != _round_wh(row["meter_stop_wh"]):
            v.record_mismatch += 1
            v.notes.append(
                {
                    "kind": "sent meters differ from the station's record",
                    "local_tx": local,
                    "record": record,
                    "start": start.brief(),
                    "stop": stop.brief(),
                }
            )
        _order(v, local, tid, record, start, values, stop)
    return v


def _order(
    v: Verdict,
    local: int,
    tid: int,
    record: dict[str, Any],
    start: Message,
    values: list[Message],
    stop: Message,
) -> None:
    problems: list[str] = []
    energy_problems: list[str] = []
    t_start, t_stop = _parse(start.payload.get("timestamp")), _parse(stop.payload.get("timestamp"))
    if t_start is None or t_stop is None:
        problems.append("a Start or Stop timestamp is unreadable")
    elif t_stop < t_start:
        problems.append(
            f"Stop stamped {(t_start - t_stop).total_seconds() * 1e3:.0f} ms before Start"
        )
    previous: datetime | None = None
    for m in values:
        if m.seq < start.seq or m.seq > stop.seq:
            problems.append(
                f"MeterValues {m.unique_id} delivered outside Start..Stop (seq {m.seq})"
            )
        for mv in m.payload.get("meterValue") or ():
            at = _parse(mv.get("timestamp")) if isinstance(mv, dict) else None
            if at is None:
                problems.append(f"MeterValues {m.unique_id}: unreadable timestamp")
                continue
            if t_start is not None and at < t_start:
                problems.append(
                    f"MeterValues {m.unique_id} stamped {_ms(t_start - at)} ms before Start"
                )
            if t_stop is not None and at > t_stop:
                problems.append(
                    f"MeterValues {m.unique_id} stamped {_ms(at - t_stop)} ms after Stop"
                )
            if previous is not None and at < previous:
                problems.append(f"MeterValues {m.unique_id} stamped before the one sent before it")
            previous = at
    if stop.seq < start.seq:
        problems.append("Stop delivered before Start")
    meter_start, meter_stop = start.payload.get("meterStart"), stop.payload.get("meterStop")
    series = [wh for m in values for _, wh in _energy_wh(m.payload.get("meterValue"))]
    series += [wh for _, wh in _energy_wh(stop.payload.get("transactionData"))]
    rounding = False
    if not isinstance(meter_start, int) or not isinstance(meter_stop, int):
        energy_problems.append("meterStart or meterStop missing")
    else:
        if meter_stop < meter_start:
            energy_problems.append(f"meterStop {meter_stop} < meterStart {meter_start}")
        for wh in series:
            if _round_wh(wh) < meter_start:
                energy_problems.append(f"value {wh} Wh below meterStart {meter_start}")
            elif _round_wh(wh) > meter_stop:
                energy_problems.append(f"value {wh} Wh above meterStop {meter_stop}")
            elif wh < meter_start or wh > meter_stop:
                rounding = True
    for a, b in itertools.pairwise(series):
        if b < a:
            energy_problems.append(f"value {b} Wh after {a} Wh")
    if rounding:
        v.sub_wh_rounding += 1
    if problems or energy_problems:
        v.out_of_order += bool(problems)
        v.energy_decreasing += bool(energy_problems)
        v.violations.append(
            {
                "kind": "out of order" if problems else "energy",
                "local_tx": local,
                "transactionId": tid,
                "problems": problems + energy_problems,
                "record": record,
                "start": start.brief(),
                "meter_values": [m.brief() for m in values],
                "stop": stop.brief(),
            }
        )


# -- the run ---------------------------------------------------------------------------


@dataclass
class Outcome:
    summary: dict[str, Any]
    verdict: Verdict
    work: Path


def soak(kills: int, seed: int, slow_ms: int, keep: bool) -> Outcome:
    rng = random.Random(seed)
    wall0 = time.monotonic()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-kill-soak-"))
    data_dir, lock_dir = work / "station", work / "locks"
    data_dir.mkdir()
    lock_dir.mkdir()
    src, source = snapshot(work)
    shim, shim_note = build_shim(work)
    slow_effect = ""
    if shim is not None:
        plain = commit_seconds(work, dict(os.environ))
        slowed = commit_seconds(
            work, {**os.environ, "LD_PRELOAD": str(shim), "SLOWFSYNC_MS": str(slow_ms)}
        )
        if slowed - plain < slow_ms / 2000:
            shim_note = (
                f"the shim did not slow SQLite's commits ({plain * 1e3:.1f} -> "
                f"{slowed * 1e3:.1f} ms): the slowed half was skipped"
            )
            shim = None
        else:
            slow_effect = f"{plain * 1e3:.1f} ms -> {slowed * 1e3:.1f} ms per SQLite commit"
    config = work / "evse.toml"
    failure: BaseException | None = None
    with (
        open(work / "station.log", "a") as log,
        running_csms("--boot-interval", "3600", "--log", str(work / "csms.jsonl")) as csms,
        running_sim(log, src) as sim,
    ):
        write_config(config, data_dir, str(sim["tcp"]))
        subprocess.run(
            [
                *(sys.executable, "-m", "ops.cli", "config", "set", "MeterValueSampleInterval"),
                *(str(SAMPLE_INTERVAL_S), "--config", str(config)),
            ],
            check=True,
            cwd=src,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "EVSE_LOCK_DIR": str(lock_dir)},
        )
        station = Station(config, data_dir, csms, log, shim, slow_ms, lock_dir, src)
        run = Soak(rng, sim, station, csms)
        deck: list[str] = []
        try:
            station.wait_ready(station.launch(slow=run.slow_coin()))
            while sum(run.kills.values()) < kills:
                if not deck:
                    deck = list(PHASES)
                    rng.shuffle(deck)
                run.session(deck.pop())
                done = sum(run.kills.values())
                print(f"kill_soak: {done}/{kills} kills", file=sys.stderr, flush=True)
            if run.plugged:
                run.unplug()
            # The final clean restart; then until the queue is empty.
            configure(csms, refuse_for=0, rtt_ms=0)
            code = station.terminate()
            if code != 0:
                raise SoakError(
                    f"the station exited with {code} on SIGTERM before the final restart"
                )
            station.wait_ready(station.launch(slow=False))
            deadline = time.monotonic() + DRAIN_WITHIN
            while True:
                queue = ask_station(station.socket, "GET", "/queue")
                status = ask_station(station.socket, "GET", "/status")
                if (
                    queue is not None
                    and status is not None
                    and not queue["pending"]
                    and status.get("transaction") is None
                ):
                    break
                if time.monotonic() > deadline:
                    raise SoakError(f"the queue did not drain within {DRAIN_WITHIN} s: {queue}")
                time.sleep(0.2)
            code = station.terminate()
            if code != 0:
                raise SoakError(f"the station exited with {code} on the final SIGTERM")
            records = messages(csms, CP)
        except BaseException as exc:
            failure = exc
            if station.alive():
                try:
                    station.terminate()
                except SoakError as also:
                    sys.stderr.write(f"kill_soak: {also}\n")
        if failure is not None:
            sys.stderr.write(f"kill_soak: failed; work directory kept: {work}\n")
            sys.stderr.write((work / "station.log").read_text()[-4000:])
            raise failure
    file = read_station_file(data_dir / "station.sqlite")
    verdict = check(file, records)
    if file.pending:
        verdict.lost += len(file.pending)
        verdict.violations.append({"kind": "left in the queue", "messages": file.pending})
    if file.dead:
        verdict.lost += len(file.dead)
        verdict.violations.append({"kind": "dead letters", "messages": file.dead})
    wall = time.monotonic() - wall0
    boots = sorted(station.boot_seconds)
    summary: dict[str, Any] = {
        "kills": sum(run.kills.values()),
        "kills_by_phase": {p: run.kills[p] for p in ("start", "charging", "stop")}
        | {"replay_offline": run.kills["replay-offline"], "replay_draining": run.kills["replay"]},
        "replay_kills_with_backlog": sum(1 for b in run.replay_backlogs if b > 0),
        "launches": station.launches,
        "slowed_starts": station.slowed,
        "slow_fsync_ms": slow_ms if shim is not None else None,
        "slow_fsync": slow_effect or shim_note,
        "transactions": verdict.transactions,
        "stop_reasons": verdict.stop_reasons,
        "messages": verdict.messages,
        "resends": verdict.resends,
        "meter_values_per_tx_max": verdict.meter_values_per_tx_max,
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "out_of_order": verdict.out_of_order,
        "energy_decreasing": verdict.energy_decreasing,
        "sub_wh_rounding": verdict.sub_wh_rounding,
        "record_mismatch": verdict.record_mismatch,
        "other_violations": sum(1 for x in verdict.violations if x["kind"] in ("never answered",)),
        "boot_to_bootnotification_s": {
            "median": round(boots[len(boots) // 2], 2) if boots else None,
            "max": round(boots[-1], 2) if boots else None,
        },
        "seed": seed,
        "source": source,
        "wall_time_s": round(wall, 1),
        "load_1min_at_start": round(load, 2),
    }
    if verdict.failed or verdict.violations or keep:
        summary["work_dir"] = str(work)
        (work / "violations.json").write_text(
            json.dumps({"violations": verdict.violations, "notes": verdict.notes}, indent=2)
        )
    else:
        shutil.rmtree(work, ignore_errors=True)
    return Outcome(summary, verdict, work)


def emit(rec: Recorder, out: Outcome) -> None:
    s = out.summary
    phases = ", ".join(f"{k} {n}" for k, n in s["kills_by_phase"].items())
    setup = (
        f"{s['kills']} kill -9 ({phases}), {s['launches']} launches, {s['slowed_starts']} "
        f"with fsync slowed ({s['slow_fsync']}); {s['transactions']} transactions checked at "
        f"evse_lab.csms; wall {s['wall_time_s']:.0f} s"
    )
    for key, unit in (
        ("lost", "transactions"),
        ("duplicated", "messages"),
        ("out_of_order", "transactions"),
        ("energy_decreasing", "transactions"),
    ):
        rec.emit(
            Result(f"kill_soak_{key}", float(s[key]), unit, None, None, target="0", note=setup)
        )
    rec.emit(
        Result(
            "kill_soak_kills",
            float(s["kills"]),
            "kills",
            None,
            None,
            target=">= 150",
            note=json.dumps(s, separators=(",", ":")),
        )
    )


def run(
    rec: Recorder,
    *,
    quick: bool = False,
    kills: int | None = None,
    seed: int | None = None,
    slow_ms: int = DEFAULT_SLOW_MS,
    keep: bool = False,
) -> Outcome:
    """The soak; its results recorded; AssertionError (after recording) on any violation."""
    n = kills if kills is not None else (20 if quick else 150)
    s = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
    out = soak(n, s, slow_ms, keep)
    print(json.dumps({"kill_soak": out.summary}), flush=True)
    emit(rec, out)
    if out.verdict.failed:
        for violation in out.verdict.violations:
            sys.stderr.write(json.dumps(violation) + "\n")
        raise AssertionError(
            f"kill soak: lost {out.verdict.lost}, duplicated {out.verdict.duplicated}, out of "
            f"order {out.verdict.out_of_order}, energy {out.verdict.energy_decreasing}; details in "
            f"{out.work / 'violations.json'}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kill_soak")
    parser.add_argument("--kills", type=int, default=None, help="kills (default 150, --quick 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one)")
    parser.add_argument("--quick", action="store_true", help="20 kills")
    parser.add_argument(
        "--slow-fsync-ms", type=int, default=DEFAULT_SLOW_MS, help="fsync delay on slowed starts"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    try:
        run(
            Recorder(RESULTS),
            quick=args.quick,
            kills=args.kills,
            seed=args.seed,
            slow_ms=args.slow_fsync_ms,
            keep=args.keep,
        )
    except AssertionError as failed:
        print(f"kill_soak: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
