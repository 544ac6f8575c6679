"""Boot time: ``evse run --sim --csms-url ...`` spawned -> BootNotification at the central system.

The clock starts just before the process is spawned, so the Python
interpreter's own start-up and every import are included: that is what an
operator waits for after ``systemctl restart``. It stops at the central
system's record of the BootNotification (``python -m ops.csms``; its ``t`` is
``time.monotonic()`` of that process, the same clock as ours on Linux).
Between the two: interpreter start, imports, the device simulator starting
(``--sim`` runs it in the station's process; the station prints its ready
line then), opening the SQLite file, the supervisor's first device polls, the
TCP and WebSocket handshakes and the BootNotification itself.

Each run starts a new process on the same data directory (a restart, not a
first installation) after one unmeasured warm-up run. The children get a
bytecode cache of their own (``PYTHONPYCACHEPREFIX`` in a temporary
directory, written by the warm-up run), as an installed package has its
``.pyc`` files; a second series runs with no bytecode at all (an empty cache
that is never written: every module compiled from source at every start),
the worst case. ``python -X importtime`` of the modules ``run --sim`` loads
says how much of the start-up is imports, and which.

``python -m bench.boot_time [--quick]`` runs this alone (results go to
``$BENCH_RESULTS``, which it overwrites).
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.results import RESULTS, Recorder, Result
from tests.csms_peer import Csms, health, running_csms, wait_for

ROOT = Path(__file__).resolve().parent.parent
CP = "CP-1"
TARGET_S = 1.0
#: What ``evse run --sim`` imports (ops.cli imports the rest lazily).
RUN_IMPORTS = "import ops.cli, ops.run, ops.config, ops.sim.app"


@dataclass(frozen=True)
class Boot:
    total: float  # spawn -> BootNotification received
    ready: float  # spawn -> the station's ready line (interpreter, imports, simulator up)


def child_env(cache: Path, *, write: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _line(stream: IO[str], within: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(within):
            raise TimeoutError(f"no ready line within {within} s")
    return stream.readline()


def boot_once(csms: Csms, data_dir: Path, env: dict[str, str], log: IO[str]) -> Boot:
    since = int(health(csms)["messages"])
    argv = [
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
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        if not _line(proc.stdout, 60).startswith('{"ready"'):
            raise RuntimeError(f"the station exited with {proc.wait()} before it was ready")
        ready = time.monotonic()
        boot = wait_for(csms, CP, "BootNotification", within=60, since=since, poll=0.01)
        return Boot(total=boot["t"] - start, ready=ready - start)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _importtime(env: dict[str, str]) -> tuple[float, list[tuple[str, float]]]:
    """One ``-X importtime`` run: (imports s, [(top-level package, its modules' own s)])."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", RUN_IMPORTS],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    total = 0.0
    top: dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match is None:
            continue
        own, _, _, name = match.groups()
        total += int(own) / 1e6
        root = name.split(".")[0]
        top[root] = top.get(root, 0.0) + int(own) / 1e6
    return total, sorted(top.items(), key=lambda item: -item[1])


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def import_profile(env: dict[str, str]) -> tuple[float, float, list[tuple[str, float]]]:
    """(bare interpreter start s, imports s, [(top-level package, its modules' own s)])."""
    bare = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
        bare.append(time.perf_counter() - start)
    profiles = sorted((_importtime(env) for _ in range(3)), key=lambda p: p[0])
    total, ranked = profiles[1]  # the median run: one start-up is noisy on a busy machine
    return statistics.median(bare), total, ranked


def run(rec: Recorder, *, quick: bool = False) -> None:
    runs, cold_runs = (3, 1) if quick else (5, 2)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-boot-time-") as tmp:
        work = Path(tmp)
        data_dir = work / "station"
        data_dir.mkdir()
        cached = child_env(work / "pycache", write=True)
        with (
            running_csms("--boot-interval", "3600") as csms,
            open(work / "station.log", "w") as log,
        ):
            try:
                first = boot_once(csms, data_dir, cached, log)  # writes the bytecode cache
                boots = [boot_once(csms, data_dir, cached, log) for _ in range(runs)]
                cold = [
                    boot_once(csms, data_dir, child_env(work / f"empty{i}", write=False), log)
                    for i in range(cold_runs)
                ]
            except BaseException:
                sys.stderr.write((work / "station.log").read_text()[-4000:])
                raise
        bare, imports, ranked = import_profile(cached)
    totals = [b.total for b in boots]
    median = statistics.median(totals)
    ready = statistics.median(b.ready for b in boots)
    phases = (
        f"spawn -> ready line {ready:.2f} s (interpreter, imports, simulator), "
        f"ready -> BootNotification {median - ready:.2f} s (store, supervisor, connect, boot)"
    )
    rec.emit(
        Result(
            "boot_to_bootnotification_median",
            median,
            "s",
            None,
            None,
            target=f"<= {TARGET_S:g} s",
            note=f"evse run --sim spawned -> BootNotification at ops.csms, interpreter start "
            f"included, bytecode cached; median of {runs} restarts (max {max(totals):.2f} s; "
            f"first run, new data dir {first.total:.2f} s); {phases}; 1-min load {load:.1f}",
        )
    )
    rec.emit(
        Result(
            "boot_to_bootnotification_max",
            max(totals),
            "s",
            None,
            None,
            target=f"<= {TARGET_S:g} s",
            note=f"worst of {runs} restarts, bytecode cached",
        )
    )
    rec.emit(
        Result(
            "boot_to_bootnotification_no_bytecode",
            statistics.median(b.total for b in cold),
            "s",
            None,
            None,
            note=f"median of {cold_runs} starts with no .pyc anywhere (every module compiled "
            "at start): the worst case, e.g. PYTHONDONTWRITEBYTECODE on a fresh checkout",
        )
    )
    leaders = ", ".join(f"{name} {seconds * 1e3:.0f}" for name, seconds in ranked[:8])
    rec.emit(
        Result(
            "boot_import_time",
            imports * 1e3,
            "ms",
            None,
            None,
            note=f"python -X importtime -c '{RUN_IMPORTS}', bytecode cached, median of 3: sum of "
            "self times; "
            f"by package (its modules' own import ms): {leaders}; bare interpreter start "
            f"(python -c pass) {bare * 1e3:.0f} ms",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.boot_time")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(Recorder(RESULTS), quick=args.quick)


if __name__ == "__main__":
    main()
