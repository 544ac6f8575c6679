"""Memory and CPU of the station alone while an EV charges.

Two processes, as on a real installation where the devices are hardware:

* the simulator, ``python -m ops.cli sim --tcp-port 0 --control-port 0
  --no-rtu`` (its ready JSON line on stdout names its Modbus TCP port and
  HTTP control address);
* the station, ``python -m ops.cli run --config FILE``: an EVSE DIN board and
  an SDM630 meter on the simulator's Modbus TCP port, every setting at its
  default (board polled every 0.1 s, meter every 1 s, 0.5 s timeouts, meter
  readings persisted every 5 s), free charging (plugging in authorizes), no
  central system.

The EV is plugged in through the simulator's control interface; once the
station's control socket reports Charging, and after a settling time, the
station's VmRSS (``/proc/PID/status``) is sampled every half second over the
window and its CPU time (``utime + stime`` of all its threads, from
``/proc/PID/stat``) taken at both ends. VmHWM (the peak RSS since start) and
the anonymous / file-backed split (``/proc/PID/smaps_rollup``) go in the
note, and so does the simulator's own CPU over the same window. SIGTERM at
the end must stop the station with exit code 0.

The station runs with the installer's page off (``web.enabled = false``),
then once more with it served on localhost and visited once before the
window (``_web`` in the result names): what the page costs (issue 9).

Both processes run as installed, not as this checkout would by itself:

* from bytecode. pip compiles every module at install, and the unit's
  ProtectSystem=strict leaves nothing writable to compile into at run time;
  here PYTHONDONTWRITEBYTECODE is usually set and the firmware's own packages
  have no ``.pyc``, so each start would compile them (about 1 MB more
  resident, and CPU). ``PYTHONPYCACHEPREFIX`` points at a tree that
  ``compileall`` fills first from the standard library, site-packages and
  the firmware's packages (kept in the temporary directory between runs:
  only what changed is compiled again);
* with the unit's ``Environment=`` (``ops/systemd/evse.service``, e.g.
  ``MALLOC_ARENA_MAX``), for the station.

Targets (issue 7): RSS <= 35 MB, CPU <= 1 % of one core.

``python -m bench.footprint [--quick] [--window S]`` runs this alone (results
go to ``$BENCH_RESULTS``, which it overwrites).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from bench.results import RESULTS, Recorder, Result
from ops.control import query
from ops.httpjson import request_json

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RSS_TARGET_MB = 35.0
CPU_TARGET_PERCENT = 1.0
BOARD, METER = "evse-din", "sdm630"
#: Charging for this long before the window opens (start-up work, first persist).
SETTLE = 5.0
#: The installed unit, whose Environment= the station runs with.
UNIT = ROOT / "ops" / "systemd" / "evse.service"
#: The firmware's packages (the rest of the checkout is not installed).
PACKAGES = ("evse", "fieldbus", "ocpp16", "ops")
#: Not compiled from the standard library: nothing the station imports.
_STDLIB_SKIP = r"[/\\](test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|site-packages)[/\\]"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The ``Environment=`` assignments of ``unit`` (systemd.exec(5): space-separated
    ``VAR=value`` words, quotes as in a shell; a later assignment wins)."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "Environment":
            for word in shlex.split(value):
                name, eq, val = word.partition("=")
                if eq:
                    env[name] = val
    return env


def bytecode_prefix() -> Path:
    """A ``PYTHONPYCACHEPREFIX`` tree holding the bytecode of everything the station
    may import, compiled now where it is missing or stale (see the module docstring)."""
    prefix = Path(tempfile.gettempdir()) / f"evse-footprint-pyc-{sys.implementation.cache_tag}"
    paths = sysconfig.get_paths()
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    compile_all = [sys.executable, "-m", "compileall", "-q", "-j", "0"]
    site = sorted({paths["purelib"], paths["platlib"]})
    # Some third-party files do not compile (py2 samples, templates): not an error here.
    for argv in (
        [*compile_all, "-x", _STDLIB_SKIP, paths["stdlib"]],
        [*compile_all, *site, *(str(ROOT / p) for p in PACKAGES)],
    ):
        subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    return prefix


def process_env(prefix: Path, *, station: bool) -> dict[str, str]:
    """The environment of the simulator (``station`` False) or of the station."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    return {**env, **unit_environment()} if station else env


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


def smaps_kib(pid: int) -> dict[str, int]:
    """Rss, Anonymous, ... of /proc/PID/smaps_rollup, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; count fields after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def station_toml(port: str, data_dir: Path, web_port: int | None = None) -> str:
    """The station's config: the devices on the simulator, everything else default;
    the installer's page off (``web_port`` None) or on that port."""
    web = "[web]\nenabled = false\n" if web_port is None else f"[web]\nport = {web_port}\n"
    return web + (
        "[station]\n"
        'serial = "FOOTPRINT-0001"\n'
        f'data_dir = "{data_dir}"\n'
        "[board]\n"
        f'kind = "{BOARD}"\n'
        f'port = "{port}"\n'
        "unit = 1\n"
        "[meter]\n"
        f'kind = "{METER}"\n'
        f'port = "{port}"\n'
        "unit = 2\n"
        "[authorization]\n"
        'mode = "free"\n'
    )


async def _first_line(stream: trio.abc.ReceiveStream, within: float, what: str) -> str:
    data = b""
    with trio.fail_after(within):
        while b"\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{what} ended before it was ready")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


async def _until_charging(socket: str, within: float) -> dict[str, Any]:
    view: dict[str, Any] = {}
    with trio.move_on_after(within):
        while True:
            view = await query(socket, "GET", "/status")
            if view.get("status") == "Charging":
                return view
            await trio.sleep(0.1)
    raise RuntimeError(f"not Charging within {within:g} s: {view.get('status')}")


@dataclass
class Footprint:
    rss_max_mb: float
    rss_mean_mb: float
    hwm_mb: float
    anon_mb: float
    file_mb: float
    cpu_percent: float
    #: The user-mode part of cpu_percent (the rest is the kernel's, on our behalf).
    user_percent: float
    sim_cpu_percent: float
    threads: int
    window: float
    power_w: Any


async def _stop(proc: trio.Process, what: str, *, check: bool) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(15.0):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
        if check:
            raise RuntimeError(f"{what} did not stop within 15 s of SIGTERM")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode} after SIGTERM")


def sim_argv(transport: str) -> list[str]:
    argv = [sys.executable, "-m", "ops.cli", "sim", "--control-port", "0"]
    return [*argv, "--tcp-port", "0", "--no-rtu"] if transport == "tcp" else argv


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _visit(url: str) -> None:
    """What an installer's first look loads: the status page, its script and style,
    the settings page (which shows the certificate: cryptography is imported)."""
    import urllib.request  # noqa: PLC0415

    for path in ("/", "/static/app.js", "/static/app.css", "/settings", "/metrics"):
        with urllib.request.urlopen(url + path, timeout=10) as reply:
            reply.read()


async def measure(
    window: float,
    tmp: Path,
    argv_prefix: list[str] | None = None,
    transport: str = "tcp",
    web: bool = False,
    pyc: Path | None = None,
) -> Footprint:
    """The station's footprint over ``window`` seconds of charging; with ``web``, the
    installer's page served and visited once before the window; ``pyc`` the
    bytecode tree (``bytecode_prefix``), compiled first when None."""
    prefix = pyc if pyc is not None else await trio.to_thread.run_sync(bytecode_prefix)
    with (tmp / "sim.log").open("wb") as sim_log:
        sim = await trio.lowlevel.open_process(
            sim_argv(transport),
            stdout=subprocess.PIPE,
            stderr=sim_log,
            cwd=ROOT,
            env=process_env(prefix, station=False),
        )
    station: trio.Process | None = None
    try:
        assert sim.stdout is not None
        ready = json.loads(await _first_line(sim.stdout, 30.0, "the simulator"))["ready"]
        control = urlsplit(ready["control"])
        assert control.hostname is not None and control.port is not None
        data_dir = tmp / "data"
        data_dir.mkdir()
        config = tmp / "station.toml"
        web_port = _free_port() if web else None
        config.write_text(station_toml(ready[transport], data_dir, web_port))
        argv = [*(argv_prefix or [sys.executable]), "-m", "ops.cli", "run", "--config", str(config)]
        with (tmp / "station.log").open("wb") as station_log:
            station = await trio.lowlevel.open_process(
                argv,
                stdout=station_log,
                stderr=station_log,
                cwd=ROOT,
                env=process_env(prefix, station=True),
            )
        socket = str(data_dir / "control.sock")
        with trio.fail_after(30.0):
            while True:
                if station.returncode is not None:
                    raise RuntimeError(f"the station exited {station.returncode}")
                try:
                    await query(socket, "GET", "/status")
                    break
                except OSError:
                    await trio.sleep(0.05)
        await request_json(control.hostname, control.port, "POST", "/plug", {})
        await _until_charging(socket, 10.0)
        if web_port is not None:
            await trio.to_thread.run_sync(_visit, f"http://127.0.0.1:{web_port}")
        await trio.sleep(SETTLE)

        pid = station.pid
        rss = [rss_kib(pid)]
        wall0, cpu0, sim0 = time.monotonic(), cpu_times(pid), cpu_seconds(sim.pid)
        end = trio.current_time() + window
        while trio.current_time() < end:
            await trio.sleep(min(0.5, max(0.0, end - trio.current_time())))
            rss.append(rss_kib(pid))
        cpu1, sim1, wall1 = cpu_times(pid), cpu_seconds(sim.pid), time.monotonic()
        smaps = smaps_kib(pid)
        hwm = rss_kib(pid, "VmHWM")
        count = threads(pid)
        view = await query(socket, "GET", "/status")
        if view.get("status") != "Charging":
            raise RuntimeError(f"stopped charging during the window: {view.get('status')}")
        await _stop(station, "the station", check=argv_prefix is None)
    finally:
        if station is not None:
            await _stop(station, "the station", check=False)
        await _stop(sim, "the simulator", check=False)
        if sim.stdout is not None:
            await sim.stdout.aclose()
    elapsed = wall1 - wall0
    anon = smaps.get("Anonymous", 0)
    return Footprint(
        rss_max_mb=max(rss) / 1024.0,
        rss_mean_mb=sum(rss) / len(rss) / 1024.0,
        hwm_mb=hwm / 1024.0,
        anon_mb=anon / 1024.0,
        file_mb=(smaps.get("Rss", 0) - anon) / 1024.0,
        cpu_percent=(sum(cpu1) - sum(cpu0)) / elapsed * 100.0,
        user_percent=(cpu1[0] - cpu0[0]) / elapsed * 100.0,
        sim_cpu_percent=(sim1 - sim0) / elapsed * 100.0,
        threads=count,
        window=elapsed,
        power_w=view.get("power_w"),
    )


async def profile(window: float, tmp: Path, top: int) -> str:
    """cProfile of the station over ``window`` s of charging, in this process.

    The same setup as ``measure`` (the simulator in its own process, the same
    config) but the station runs here, through ``ops.run.run_station`` with a
    driver that plugs in, waits for Charging and the settling time, and
    profiles only the window; then the station stops as on SIGTERM.
    """
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from ops.config import load_config  # noqa: PLC0415
    from ops.run import run_station  # noqa: PLC0415

    with (tmp / "sim.log").open("wb") as sim_log:
        sim = await trio.lowlevel.open_process(
            sim_argv("tcp"), stdout=subprocess.PIPE, stderr=sim_log, cwd=ROOT
        )
    profiler = cProfile.Profile()
    try:
        assert sim.stdout is not None
        ready = json.loads(await _first_line(sim.stdout, 30.0, "the simulator"))["ready"]
        control = urlsplit(ready["control"])
        assert control.hostname is not None and control.port is not None
        data_dir = tmp / "data"
        data_dir.mkdir()
        path = tmp / "station.toml"
        path.write_text(station_toml(ready["tcp"], data_dir))
        socket = str(data_dir / "control.sock")

        async def driver(*_: object) -> None:
            assert control.hostname is not None and control.port is not None
            await request_json(control.hostname, control.port, "POST", "/plug", {})
            await _until_charging(socket, 10.0)
            await trio.sleep(SETTLE)
            profiler.enable()
            await trio.sleep(window)
            profiler.disable()

        await run_station(load_config(path), driver=driver)
    finally:
        await _stop(sim, "the simulator", check=False)
        if sim.stdout is not None:
            await sim.stdout.aclose()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


#: Where the resident memory goes: what importing each group adds to a fresh
#: interpreter's VmRSS, in the order the station imports them (pymodbus is not
#: imported by the station; jsonschema and the ocpp package's runtime only with
#: the first payload validated, ocpp16/schemas.py).
IMPORT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ssl (trio imports it)", ("ssl",)),
    ("trio", ("trio",)),
    ("station core (evse, fieldbus, sqlite3)", ("evse.supervisor",)),
    (
        "OCPP session, registry and stores, loaded with no central system configured "
        "(ocpp16, evse.ocpp_port)",
        ("ocpp16.chargepoint", "evse.ocpp_port"),
    ),
    ("ops (run, config, control, probe, cli)", ("ops.run", "ops.cli")),
)

_BREAKDOWN = """
import gc, importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
out = [["python interpreter", rss()]]
for name, modules in json.loads(sys.argv[1]):
    before = rss()
    for m in modules:
        importlib.import_module(m)
    gc.collect()
    out.append([name, rss() - before])
print(json.dumps(out))
"""


def import_breakdown(pyc: Path) -> list[tuple[str, float]]:
    """(group, MiB) of IMPORT_GROUPS in a fresh interpreter, run as the station is."""
    groups = json.dumps([[name, list(modules)] for name, modules in IMPORT_GROUPS])
    done = subprocess.run(
        [sys.executable, "-c", _BREAKDOWN, groups],
        cwd=ROOT,
        env=process_env(pyc, station=True),
        capture_output=True,
        text=True,
        check=True,
    )
    return [(str(name), float(mb)) for name, mb in json.loads(done.stdout)]


def _measure_logged(span: float, transport: str, pyc: Path, web: bool = False) -> Footprint:
    with tempfile.TemporaryDirectory(prefix="evse-footprint-") as tmp:
        try:
            return trio.run(
                partial(measure, span, Path(tmp), transport=transport, web=web, pyc=pyc)
            )
        except Exception:
            for log in ("station.log", "sim.log"):
                path = Path(tmp) / log
                if path.exists():
                    sys.stderr.write(f"--- {log}\n{path.read_text()[-4000:]}\n")
            raise


def run(rec: Recorder, *, quick: bool = False, window: float | None = None) -> None:
    span = window or (15.0 if quick else 60.0)
    pyc = bytecode_prefix()
    parts = import_breakdown(pyc)
    where = ", ".join(f"{name} {mb:.1f}" for name, mb in parts)
    for transport in ("tcp",) if quick else ("tcp", "rtu"):
        _emit(rec, _measure_logged(span, transport, pyc), transport, where)
    # Issue 9: what the installer's page costs (served, visited once, nobody watching).
    _emit(rec, _measure_logged(span, "tcp", pyc, web=True), "tcp", where, web=True)


def _emit(rec: Recorder, fp: Footprint, transport: str, where: str, web: bool = False) -> None:
    suffix = ("" if transport == "tcp" else "_rtu_pty") + ("_web" if web else "")
    link = (
        "Modbus TCP on loopback"
        if transport == "tcp"
        else "Modbus RTU on the simulator's pseudo-terminal (an extra: real stations are on RS-485)"
    )
    setup = (
        f"the station alone (`python -m ops.cli run --config FILE`; the simulator, "
        f"`python -m ops.cli sim`, in its own process): {BOARD} board and {METER} meter over "
        f"{link}, every setting default (board polled every 0.1 s, meter every "
        f"1 s, readings persisted every 5 s), free charging, no central system, "
        + (
            "the installer's page served on localhost and its pages, script, style sheet and "
            "/metrics fetched once before the window; "
            if web
            else "the installer's page off (web.enabled = false); "
        )
        + f"window "
        f"{fp.window:.0f} s while Charging ({fp.power_w} W) after {SETTLE:g} s of settling; "
        f"SIGTERM -> exit 0; run as installed: from compiled bytecode, with the unit's "
        f"Environment= ({' '.join(f'{k}={v}' for k, v in unit_environment().items()) or 'none'})"
    )
    rec.emit(
        Result(
            f"footprint_station_rss_mb{suffix}",
            fp.rss_max_mb,
            "MB",
            None,
            None,
            f"<= {RSS_TARGET_MB:g} MB",
            f"max VmRSS over the window, MiB (mean {fp.rss_mean_mb:.1f}, VmHWM {fp.hwm_mb:.1f}; "
            f"anonymous {fp.anon_mb:.1f}, file-backed {fp.file_mb:.1f}; {fp.threads} threads); "
            f"{setup}. What importing adds to a fresh interpreter's VmRSS, MiB: {where}",
        )
    )
    rec.emit(
        Result(
            f"footprint_station_cpu_percent{suffix}",
            fp.cpu_percent,
            "%",
            None,
            None,
            f"<= {CPU_TARGET_PERCENT:g}%",
            f"(utime + stime of every thread) / wall time, % of one core (user "
            f"{fp.user_percent:.2f}%, kernel {fp.cpu_percent - fp.user_percent:.2f}%; clock "
            f"ticks of {1000 / CLOCK_TICKS:g} ms: +-{2 / CLOCK_TICKS / fp.window * 100:.2f}% over "
            f"the window; the simulator process used {fp.sim_cpu_percent:.2f}% meanwhile); "
            f"{setup}",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint")
    parser.add_argument("--quick", action="store_true", help="a 15 s window")
    parser.add_argument("--window", type=float, help="seconds of charging measured (60)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: cProfile the station in this process over the window (stderr)",
    )
    args = parser.parse_args()
    if args.profile:
        logging.disable(logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="evse-footprint-") as tmp:
            report = trio.run(profile, args.window or 60.0, Path(tmp), 40)
        sys.stderr.write(report)
        return
    run(Recorder(RESULTS), quick=args.quick, window=args.window)


if __name__ == "__main__":
    main()
