"""Memory and CPU of ``evse run --sim`` while an EV charges.

``python -m ops.cli run --sim`` is started as a process of its own; the EV is
plugged in through the simulator's HTTP control interface and authorized
through the station's control socket, as an installer would. Once the
connector reports Charging, the process's VmRSS (``/proc/PID/status``) is
sampled every half second and its CPU time (``utime + stime`` from
``/proc/PID/stat``) taken at both ends of the window. The simulator runs
inside the same process (``evse run --sim`` starts it), so both figures
include it. SIGTERM at the end must stop the station with exit code 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from bench.results import Recorder, Result
from ops.control import query
from ops.httpjson import request_json
from ops.run import sim_config

ROOT = Path(__file__).resolve().parent.parent
TAG = "DEMOTAG1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; count fields after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


async def _first_line(stream: trio.abc.ReceiveStream, within: float) -> str:
    data = b""
    with trio.fail_after(within):
        while b"\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise RuntimeError("evse run --sim ended before it was ready")
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


async def measure(window: float, data_dir: Path, stderr_path: Path) -> tuple[float, float, str]:
    """(max RSS MiB, CPU % of one core, note) of ``evse run --sim`` charging for ``window`` s."""
    argv = [
        sys.executable,
        "-m",
        "ops.cli",
        "run",
        "--sim",
        "--data-dir",
        str(data_dir),
        "--sim-control-port",
        "0",
    ]
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT
        )
    try:
        assert proc.stdout is not None
        ready = json.loads(await _first_line(proc.stdout, 30.0))["ready"]
        control = urlsplit(ready["simulator"]["control"])
        socket = ready["control_socket"]
        assert control.hostname is not None and control.port is not None
        # The control socket is served once the station has started.
        with trio.fail_after(10.0):
            while True:
                try:
                    await query(socket, "GET", "/status")
                    break
                except OSError:
                    await trio.sleep(0.05)
        await request_json(control.hostname, control.port, "POST", "/plug", {})
        answer = await query(socket, "POST", "/authorize", {"id_tag": TAG})
        if answer.get("status") != "Accepted":
            raise RuntimeError(f"authorization of {TAG}: {answer}")
        await _until_charging(socket, 10.0)

        pid = proc.pid
        rss_max = rss_kib(pid)
        wall0, cpu0 = time.monotonic(), cpu_seconds(pid)
        end = trio.current_time() + window
        while trio.current_time() < end:
            await trio.sleep(min(0.5, max(0.0, end - trio.current_time())))
            rss_max = max(rss_max, rss_kib(pid))
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        view = await query(socket, "GET", "/status")
        if view.get("status") != "Charging":
            raise RuntimeError(f"stopped charging during the window: {view.get('status')}")

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15.0):
            code = await proc.wait()
        if code != 0:
            raise RuntimeError(f"evse run --sim exited {code} after SIGTERM")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    cpu_pct = (cpu1 - cpu0) / (wall1 - wall0) * 100.0
    power = view.get("power_w")
    note = f"{window:g} s window while Charging ({power} W), SIGTERM -> exit 0"
    return rss_max / 1024.0, cpu_pct, note


def run(rec: Recorder, *, quick: bool = False) -> None:
    window = 10.0 if quick else 30.0
    with tempfile.TemporaryDirectory(prefix="evse-footprint-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        stderr_path = Path(tmp) / "stderr.log"
        try:
            rss, cpu, note = trio.run(measure, window, data_dir, stderr_path)
        except Exception:
            sys.stderr.write(stderr_path.read_text()[-4000:])
            raise
    config = sim_config("tcp://127.0.0.1:502", data_dir)
    setup = (
        f"`evse run --sim` (simulator in the same process, so the figures include it): "
        f"{config.board.kind} board polled every {config.board.poll_interval:g} s, "
        f"{config.meter.kind} meter every {config.meter.poll_interval:g} s over Modbus TCP "
        f"on loopback, meter reading persisted every {config.safety.persist_interval:g} s; "
        f"{note}"
    )
    rec.emit(
        Result(
            "footprint_rss_mb",
            rss,
            "MB",
            None,
            None,
            "<= 40 MB",
            f"max VmRSS over the window, MiB; {setup}",
        )
    )
    rec.emit(
        Result(
            "footprint_cpu_percent",
            cpu,
            "%",
            None,
            None,
            "<= 3%",
            f"(utime + stime) / wall time, % of one core; {setup}",
        )
    )


if __name__ == "__main__":
    run(Recorder(), quick="--quick" in sys.argv[1:])
