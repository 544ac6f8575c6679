"""The firmware as a process (``evse run --sim``) against the bench central system.

Both are separate processes: the station is driven from outside through its
simulator's HTTP control (plug, faults) and its control socket (tags), and
judged by what the central system (built on the ocpp package's own asyncio
runtime) received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from ops.control import query
from tests.csms_peer import Csms, messages
from tests.sim_control import control

TAG = "04A2B3C4"
CP = "CP-1"


class StationProcess:
    def __init__(self, csms: Csms, data_dir: Path, *extra: str, cp: str = CP) -> None:
        self.csms = csms
        self.data_dir = data_dir
        self.cp = cp
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "run",
                "--sim",
                "--sim-control-port",
                "0",
                "--data-dir",
                str(self.data_dir),
                "--csms-url",
                self.csms.ws,
                "--id",
                self.cp,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"station did not start: {self.proc.communicate()[1]}")
        self.ready = json.loads(line)["ready"]

    @property
    def sim(self) -> dict[str, Any]:
        sim: dict[str, Any] = self.ready["simulator"]
        return sim

    def plug(self, **ev: Any) -> None:
        control(self.sim, "POST", "/plug", ev or None)

    def unplug(self) -> None:
        control(self.sim, "POST", "/unplug")

    def socket(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return trio.run(query, self.ready["control_socket"], method, path, body)

    def status(self) -> dict[str, Any]:
        view: dict[str, Any] = self.socket("GET", "/status")
        return view

    def try_status(self) -> dict[str, Any] | None:
        """The status, or None while the control socket is not up yet."""
        try:
            return self.status()
        except OSError:
            return None

    def wait_status(self, status: str, within: float = 20.0) -> dict[str, Any]:
        view: dict[str, Any] = until(
            lambda: self._status_if(status), within, f"station status {status}"
        )
        return view

    def _status_if(self, status: str) -> dict[str, Any] | None:
        try:
            view = self.status()
        except OSError:
            return None
        return view if view["status"] == status else None

    def present(self, tag: str = TAG) -> dict[str, Any]:
        result: dict[str, Any] = self.socket("POST", "/authorize", {"id_tag": tag})
        return result

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=30)


def until(predicate: Callable[[], Any], within: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(poll)


def calls(csms: Csms, action: str | None = None, cp: str = CP) -> list[dict[str, Any]]:
    """CALLs the central system received from the charge point, oldest first."""
    return [m for m in messages(csms, cp, action=action) if m["type"] == "CALL"]


def statuses(csms: Csms, connector: int = 1, cp: str = CP) -> list[str]:
    return [
        m["payload"]["status"]
        for m in calls(csms, "StatusNotification", cp)
        if m["payload"]["connectorId"] == connector
    ]


@contextmanager
def station(csms: Csms, data_dir: Path, *extra: str) -> Iterator[StationProcess]:
    s = StationProcess(csms, data_dir, *extra)
    try:
        yield s
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate(timeout=30)


def booted(csms: Csms, boots: int = 1, cp: str = CP, within: float = 30.0) -> None:
    """Wait until the station is registered for the ``boots``-th time.

    A station reports its connectors' status only once its BootNotification has
    been accepted (and the central system's calls are served): connector 0's,
    then connector 1's. Once both are in, a test may start calling it, and a
    status it then causes is never preceded by the boot's own report (TC_046
    once counted connector 1's boot Available as the first status after its
    ReserveNow).
    """

    def reported(connector: int) -> int:
        return len(
            [
                m
                for m in calls(csms, "StatusNotification", cp)
                if m["payload"]["connectorId"] == connector
            ]
        )

    until(
        lambda: reported(0) >= boots and reported(1) >= boots,
        within,
        f"registration number {boots}",
    )
