"""Incoming-CALL handling: our charge point vs the ``ocpp`` package's asyncio ChargePoint.

What is measured is the charge-point side of a central system's request:
GetConfiguration (all keys), ChangeConfiguration (one key) and
RemoteStartTransaction, each sent one at a time (OCPP-J 1.6 section 4.1.1:
one CALL outstanding per direction), p50 / p99 of the round trip and the
calls per second that one-at-a-time allows.

Setup, on one machine, in one run:

* The driver (this process, asyncio + ``websockets``, no ``ocpp`` package)
  is the central system: a plain websocket server that answers the charge
  points' own CALLs with canned results and times its CALLs from just before
  the send to the matching CALLRESULT. It parses and builds frames with
  ``json`` and validates nothing, the same for both sides.
* (a) ours: the firmware as an operator runs it, ``evse run --sim
  --csms-url ws://127.0.0.1:PORT/ocpp/ --id CP-1`` (its own process; the
  device simulator and the station's Modbus polling run in it as well).
* (b) theirs: a minimal charge point on ``ocpp.v16.ChargePoint`` (its own
  asyncio process, ``python -m bench.ocpp_calls baseline ...``), ``@on``
  handlers doing the equivalent work: GetConfiguration answers the key list
  copied once from ours (identical answers are checked before measuring),
  ChangeConfiguration validates the value and writes it to an SQLite file
  with the durability ours uses (WAL, ``synchronous=FULL``, one committed
  transaction), RemoteStartTransaction checks the connector and
  AuthorizeRemoteTxRequests and accepts. The package validates every
  request and response against the OCPP 1.6 JSON schemas, as shipped
  (``ASYNC_VALIDATION``: in a worker thread).

Neither side compresses (the driver offers no permessage-deflate; trio-websocket
never does). A round trip includes both sides' websocket stacks and the
driver's: the same driver for both, so the difference is the charge point's.

RemoteStartTransaction: AuthorizeRemoteTxRequests is set to false by a
ChangeConfiguration on both sides before measuring, so neither sends an
Authorize.req first. Ours still does the real work: the request goes through
the station loop and the connector state machine (Available -> Preparing the
first time, then "a second card while waiting": the ConnectionTimeOut timer
restarts), the baseline only answers.

Rounds alternate between the two charge points (the order flips each round);
latencies of all rounds are pooled per side and call, throughput is the
median of the rounds'. CPU per call is the charge point process's CPU time
(/proc, all threads) over a round divided by its calls, minus what the
process burns idle over the same time (measured before the rounds: ours polls
its simulated board and meter all the time).

``python -m bench.ocpp_calls [--quick]`` runs this alone (results go to
``$BENCH_RESULTS``, which it overwrites).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from bench.results import RESULTS, Recorder, compare

ROOT = Path(__file__).resolve().parent.parent
OURS, THEIRS = "CP-1", "CP-BASE"
TAG = "04A2B3C4"
#: A key with no side effect in either charge point; toggled true/false.
CHANGE_KEY = "StopTransactionOnInvalidId"
ACTIONS = ("GetConfiguration", "ChangeConfiguration", "RemoteStartTransaction")
TARGET_P99_MS = 5.0
#: How long one CALL may take before the bench gives up.
CALL_LIMIT = 10.0
BOOT_LIMIT = 30.0
WARMUP = 20
IDLE_WINDOW = 2.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def answer_for(action: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The driver's answer to a charge point's own CALL (boot, status, heartbeat ...)."""
    if action == "BootNotification":
        return {"currentTime": utc_now(), "interval": 3600, "status": "Accepted"}
    if action == "Heartbeat":
        return {"currentTime": utc_now()}
    if action == "Authorize":
        return {"idTagInfo": {"status": "Accepted"}}
    if action == "StartTransaction":
        return {"transactionId": 1, "idTagInfo": {"status": "Accepted"}}
    if action == "DataTransfer":
        return {"status": "UnknownVendorId"}
    return {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- the driver: a bare websocket central system ---------------------------------------


class Peer:
    """One connected charge point, from the driver's side."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.waiting: dict[str, asyncio.Future[list[Any]]] = {}
        self.booted = asyncio.Event()
        self.their_calls: Counter[str] = Counter()
        self._next = 0

    async def serve(self) -> None:
        """Answer the charge point's CALLs; hand CALLRESULTs to ``call``."""
        async for text in self.connection:
            frame = json.loads(text)
            if frame[0] == 2:
                action = frame[2]
                self.their_calls[action] += 1
                reply = [3, frame[1], answer_for(action, frame[3])]
                await self.connection.send(json.dumps(reply))
                if action == "BootNotification":
                    self.booted.set()
                continue
            future = self.waiting.pop(frame[1], None)
            if future is not None and not future.done():
                future.set_result(frame)

    async def call(self, action: str, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """One CALL: (its CALLRESULT payload, round trip in ns). Raises on a CALLERROR."""
        self._next += 1
        unique_id = str(self._next)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting[unique_id] = future
        async with asyncio.timeout(CALL_LIMIT):
            start = time.perf_counter_ns()
            await self.connection.send(json.dumps([2, unique_id, action, payload]))
            frame = await future
            elapsed = time.perf_counter_ns() - start
        if frame[0] != 3:
            raise RuntimeError(f"{action}: CALLERROR {frame[2:]}")
        return cast(dict[str, Any], frame[2]), elapsed


@dataclass
class Sample:
    """One side's results for one call type, over all rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def request_for(action: str, i: int) -> tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]:
    """The i-th request of a kind, and the check its answer must pass."""
    if action == "GetConfiguration":
        return {}, lambda r: len(r.get("configurationKey", [])) > 20 and "unknownKey" not in r
    if action == "ChangeConfiguration":
        value = "true" if i % 2 == 0 else "false"
        return {"key": CHANGE_KEY, "value": value}, lambda r: r == {"status": "Accepted"}
    return {"connectorId": 1, "idTag": TAG}, lambda r: r == {"status": "Accepted"}


async def one_round(
    peer: Peer, pid: int, action: str, n: int, idle_cpu_per_s: float, into: Sample
) -> None:
    for i in range(WARMUP):
        payload, check = request_for(action, i)
        answer, _ = await peer.call(action, payload)
        if not check(answer):
            raise RuntimeError(f"{action}: unexpected answer {answer}")
    latencies: list[int] = []
    answers: list[dict[str, Any]] = []
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    for i in range(n):
        payload, _ = request_for(action, i)
        answer, elapsed = await peer.call(action, payload)
        latencies.append(elapsed)
        answers.append(answer)
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds(pid) - cpu0
    for i, answer in enumerate(answers):
        if not request_for(action, i)[1](answer):
            raise RuntimeError(f"{action}: unexpected answer {answer}")
    into.latencies_ns.extend(latencies)
    into.rates.append(n / wall)
    into.cpu_us.append((cpu - idle_cpu_per_s * wall) / n * 1e6)


@dataclass
class Outcome:
    ours: dict[str, Sample]
    theirs: dict[str, Sample]
    idle_cpu: dict[str, float]
    keys: int
    load: float


@contextlib.asynccontextmanager
async def child(argv: list[str], log: IO[str]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def wait_booted(peers: dict[str, Peer], cp: str, proc: asyncio.subprocess.Process) -> Peer:
    deadline = time.monotonic() + BOOT_LIMIT
    while time.monotonic() < deadline:
        peer = peers.get(cp)
        if peer is not None and peer.booted.is_set():
            return peer
        if proc.returncode is not None:
            raise RuntimeError(f"{cp} exited with {proc.returncode} before it booted")
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{cp} sent no BootNotification within {BOOT_LIMIT} s")


async def idle_rate(pid: int) -> float:
    """CPU seconds per second the process burns while nobody calls it."""
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(IDLE_WINDOW)
    return (cpu_seconds(pid) - cpu0) / (time.perf_counter() - wall0)


async def duel(
    sock: socket.socket, work: Path, logs: dict[str, IO[str]], n: int, rounds: int
) -> Outcome:
    from websockets.asyncio.server import serve  # noqa: PLC0415 - asyncio only here
    from websockets.typing import Subprotocol  # noqa: PLC0415

    peers: dict[str, Peer] = {}

    async def handler(connection: Any) -> None:
        cp = str(connection.request.path).rstrip("/").rsplit("/", 1)[-1]
        peer = Peer(connection)
        peers[cp] = peer
        with contextlib.suppress(Exception):
            await peer.serve()

    port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ocpp/"
    async with serve(
        handler,
        sock=sock,
        subprotocols=[Subprotocol("ocpp1.6")],
        compression=None,
        ping_interval=None,
        max_size=2**20,
    ):
        ours_argv = [
            sys.executable,
            "-m",
            "ops.cli",
            "run",
            "--sim",
            "--sim-control-port",
            "0",
            "--data-dir",
            str(work / "station"),
            "--csms-url",
            url,
            "--id",
            OURS,
        ]
        async with child(ours_argv, logs[OURS]) as ours_proc:
            ours = await wait_booted(peers, OURS, ours_proc)
            answer, _ = await ours.call(
                "ChangeConfiguration", {"key": "AuthorizeRemoteTxRequests", "value": "false"}
            )
            if answer != {"status": "Accepted"}:
                raise RuntimeError(f"AuthorizeRemoteTxRequests=false refused: {answer}")
            reference, _ = await ours.call("GetConfiguration", {})
            keys = reference["configurationKey"]
            theirs_argv = [
                sys.executable,
                "-m",
                "bench.ocpp_calls",
                "baseline",
                "--url",
                url + THEIRS,
                "--db",
                str(work / "baseline.sqlite"),
                "--keys",
                json.dumps(keys),
            ]
            async with child(theirs_argv, logs[THEIRS]) as theirs_proc:
                theirs = await wait_booted(peers, THEIRS, theirs_proc)
                copy, _ = await theirs.call("GetConfiguration", {})
                if copy != reference:
                    raise RuntimeError("the baseline's GetConfiguration differs from ours")
                idle = {
                    OURS: await idle_rate(ours_proc.pid),
                    THEIRS: await idle_rate(theirs_proc.pid),
                }
                sides = [(OURS, ours, ours_proc.pid), (THEIRS, theirs, theirs_proc.pid)]
                samples: dict[str, dict[str, Sample]] = {
                    OURS: {a: Sample() for a in ACTIONS},
                    THEIRS: {a: Sample() for a in ACTIONS},
                }
                for r in range(rounds):
                    for name, peer, pid in sides if r % 2 == 0 else sides[::-1]:
                        for action in ACTIONS:
                            await one_round(peer, pid, action, n, idle[name], samples[name][action])
                # Both made the same changes: their configurations still agree.
                final_ours, _ = await ours.call("GetConfiguration", {})
                final_theirs, _ = await theirs.call("GetConfiguration", {})
                if final_ours != final_theirs:
                    raise RuntimeError("the configurations drifted apart during the bench")
                for name, proc in ((OURS, ours_proc), (THEIRS, theirs_proc)):
                    if proc.returncode is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode} during the bench")
    return Outcome(samples[OURS], samples[THEIRS], idle, len(keys), os.getloadavg()[0])


def run(rec: Recorder, *, quick: bool = False) -> None:
    n, rounds = (200, 3) if quick else (1000, 5)
    with tempfile.TemporaryDirectory(prefix="bench-ocpp-calls-") as tmp:
        work = Path(tmp)
        (work / "station").mkdir()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        with (
            sock,
            open(work / "ours.log", "w") as ours_log,
            open(work / "theirs.log", "w") as theirs_log,
        ):
            try:
                outcome = asyncio.run(
                    duel(sock, work, {OURS: ours_log, THEIRS: theirs_log}, n, rounds)
                )
            except BaseException:
                for path in (work / "ours.log", work / "theirs.log"):
                    sys.stderr.write(f"--- {path.name} (tail)\n{path.read_text()[-4000:]}\n")
                raise
    emit(rec, outcome, n, rounds)


def emit(rec: Recorder, outcome: Outcome, n: int, rounds: int) -> None:
    setup = (
        f"{rounds} interleaved rounds x {n} calls per side; one CALL at a time from a bare "
        "websockets driver; round trip includes both websocket stacks; 1-min load "
        f"{outcome.load:.1f} on {os.cpu_count()} CPUs"
    )
    what = {
        "GetConfiguration": f"all {outcome.keys} keys, identical answers",
        "ChangeConfiguration": f"{CHANGE_KEY} toggled, persisted to SQLite (WAL, FULL) on both",
        "RemoteStartTransaction": "AuthorizeRemoteTxRequests=false on both (no Authorize.req); "
        "ours runs the station loop and connector state machine",
    }
    for action in ACTIONS:
        mine, base = outcome.ours[action], outcome.theirs[action]
        ms_mine = sorted(x / 1e6 for x in mine.latencies_ns)
        ms_base = sorted(x / 1e6 for x in base.latencies_ns)
        slug = {
            "GetConfiguration": "get_configuration",
            "ChangeConfiguration": "change_configuration",
            "RemoteStartTransaction": "remote_start",
        }[action]
        for q in (50, 99):
            rec.emit(
                compare(
                    f"ocpp_{slug}_p{q}",
                    percentile(ms_mine, q),
                    percentile(ms_base, q),
                    "ms",
                    higher_is_better=False,
                    target=f"p{q} <= {TARGET_P99_MS:g} ms, ratio >= 1.0"
                    if q == 99
                    else "ratio >= 1.0",
                    note=f"{action} ({what[action]}) round trip, ours vs ocpp.v16.ChargePoint "
                    f"(asyncio); {setup}",
                )
            )
        rec.emit(
            compare(
                f"ocpp_{slug}_throughput",
                statistics.median(mine.rates),
                statistics.median(base.rates),
                "calls/s",
                target="ratio >= 1.0",
                note=f"{action}, one at a time (OCPP-J 4.1.1), median of {rounds} rounds",
            )
        )
        rec.emit(
            compare(
                f"ocpp_{slug}_cpu_per_call",
                statistics.median(mine.cpu_us),
                statistics.median(base.cpu_us),
                "us",
                higher_is_better=False,
                note="charge point process CPU per call (/proc, 10 ms ticks) minus its idle "
                f"rate (ours {outcome.idle_cpu[OURS] * 1e3:.0f} ms/s: simulator + polling; "
                f"theirs {outcome.idle_cpu[THEIRS] * 1e3:.0f} ms/s)",
            )
        )


# -- the baseline: ocpp.v16.ChargePoint, asyncio -----------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def baseline(url: str, db: Path, keys: list[dict[str, Any]]) -> None:
    """A minimal charge point on the ocpp package, answering the three calls."""
    from ocpp.routing import on  # noqa: PLC0415 - only the baseline process needs these
    from ocpp.v16 import ChargePoint, call, call_result, datatypes  # noqa: PLC0415
    from ocpp.v16.enums import Action  # noqa: PLC0415
    from websockets.asyncio.client import connect  # noqa: PLC0415
    from websockets.typing import Subprotocol  # noqa: PLC0415

    def handles(action: Any) -> Callable[[_F], _F]:
        return cast(Callable[[_F], _F], on(action))

    conn = sqlite3.connect(db, isolation_level=None)
    if str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower() != "wal":
        raise RuntimeError("no WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT)")
    values = {k["key"]: k.get("value") for k in keys}
    readonly = {k["key"]: bool(k["readonly"]) for k in keys}
    order = [k["key"] for k in keys]

    class Baseline(ChargePoint):  # type: ignore[misc]  # ocpp ships no type hints
        @handles(Action.get_configuration)
        def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> Any:
            names = key or order
            known = [n for n in names if n in values]
            return call_result.GetConfiguration(
                configuration_key=[
                    datatypes.KeyValue(key=n, readonly=readonly[n], value=values[n]) for n in known
                ],
                unknown_key=[n for n in names if n not in values] or None,
            )

        @handles(Action.change_configuration)
        def on_change_configuration(self, key: str, value: str, **_: Any) -> Any:
            if key not in values:
                return call_result.ChangeConfiguration(status="NotSupported")
            if readonly[key] or (
                values[key] in ("true", "false") and value.lower() not in ("true", "false")
            ):
                return call_result.ChangeConfiguration(status="Rejected")
            text = value.lower() if values[key] in ("true", "false") else value
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (key, text),
            )
            conn.execute("COMMIT")
            values[key] = text
            return call_result.ChangeConfiguration(status="Accepted")

        @handles(Action.remote_start_transaction)
        def on_remote_start_transaction(
            self, id_tag: str, connector_id: int | None = None, **_: Any
        ) -> Any:
            if connector_id not in (None, 1):
                return call_result.RemoteStartTransaction(status="Rejected")
            if values.get("AuthorizeRemoteTxRequests") == "true":
                # Would need an Authorize.req first; the bench turns this off on both sides.
                return call_result.RemoteStartTransaction(status="Rejected")
            return call_result.RemoteStartTransaction(status="Accepted")

    async def main() -> None:
        async with connect(
            url, subprotocols=[Subprotocol("ocpp1.6")], compression=None
        ) as connection:
            cp = Baseline(url.rsplit("/", 1)[-1], connection)
            runner = asyncio.create_task(cp.start())
            await cp.call(
                call.BootNotification(charge_point_model="baseline", charge_point_vendor="bench")
            )
            await runner

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ocpp_calls")
    parser.add_argument("--quick", action="store_true")
    sub = parser.add_subparsers(dest="command")
    b = sub.add_parser("baseline", help="(internal) the ocpp-package charge point")
    b.add_argument("--url", required=True)
    b.add_argument("--db", required=True, type=Path)
    b.add_argument("--keys", required=True, help="GetConfiguration's configurationKey, JSON")
    args = parser.parse_args()
    if args.command == "baseline":
        baseline(args.url, args.db, json.loads(args.keys))
        return
    run(Recorder(RESULTS), quick=args.quick)


if __name__ == "__main__":
    main()
