"""A firmware update end to end: real images, a real releases root, a restarted station.

The images are ``ops.release.build``'s, from this checkout (tests/test_release.py's
session fixture: the release as it is, the same tree bumped to ``.post1``) and one
more built here from a copy whose ``evse run`` crashes at once (its
``evse --version`` works, so it installs). The station runs from a releases root
laid out in a temporary directory as ``evse install`` lays out /opt/evse, and a
few lines here play systemd (``Unit``): before every start the unit's
ExecStartPre (``python -I -m ops.release at-start``), then ExecStart
(``<root>/current/bin/evse run --config ...``), restarted when it exits with a
failure (Restart=on-failure), each start with its own $INVOCATION_ID. The central
system is the lab one; the images are served over HTTP from loopback.

Named after the OCA cases: TC_044_1 (download and install: Downloading,
Downloaded, Installing, then Installed after the restart, with the new
firmwareVersion in BootNotification) and TC_044_3 (installation failed: here a
release that does not start, rolled back by the unit's start count, reported by
the previous release after its restart as InstallationFailed with the
FirmwareRolledBack security event). The timings are printed (pytest -s shows them).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ops import release
from ops.install import SOURCE_IGNORE
from ops.release import Releases
from tests.conftest import SimFactory
from tests.csms_peer import Csms, call_result, messages, running_csms, wait_for
from tests.ocpp_harness import CP, booted, until
from tests.test_install import build_wheelhouse, shared_dir
from tests.test_release import CHECKOUT, PYTHON, V2, VERSION, images  # noqa: F401 - the fixture
from tests.transfer_servers import HttpServer

pytestmark = pytest.mark.slow

#: The release whose station crashes at start (built here).
CRASHING = f"{VERSION}.post9"
#: systemd's RestartSec= of the unit is 1 s; shorter here, the rule is the same.
RESTART_SEC = 0.2

CONFIG = """\
[station]
serial = "FW-0001"
id = "{cp}"
data_dir = "{data_dir}"

[limits]
installer_max = 16
fallback = 6

[board]
kind = "evse-din"
port = "{port}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{port}"
unit = 2
timeout = 0.3

[authorization]
mode = "local"
tags = ["04A2B3C4"]

[connection]
central_system_address = "{csms}"

[web]
enabled = false

[firmware]
releases = "{root}"
trial = 600

[logging]
format = "text"
"""


@pytest.fixture(scope="session")
def crashing_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout with ``run_station`` raising at once, as ``CRASHING``."""
    shared = shared_dir(tmp_path_factory)
    out = shared / "evse-crashing-image"
    with open(shared / "evse-crashing-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            house = build_wheelhouse(tmp_path_factory)
            tree = shared / "evse-crashing-tree"
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(CHECKOUT, tree, ignore=SOURCE_IGNORE, symlinks=True)
            run = tree / "ops" / "run.py"
            text = run.read_text()
            start = "    notifier = notifier or systemd.Notifier()\n"
            assert text.count(start) == 1
            crash = '    raise RuntimeError("this release crashes at start (a test image)")\n'
            run.write_text(text.replace(start, crash + start))
            release.build(tree, out, wheelhouse=house, version_suffix=".post9")
            (out / "done").touch()
    (image,) = out.glob("evse-*.tar")
    assert release.verify(image).version == CRASHING
    return image


@dataclass
class Start:
    number: int
    version: str
    pre: str
    code: int | None = None
    ended: float | None = None


class Unit:
    """evse.service's start logic, for a releases root in a temporary directory."""

    def __init__(self, root: Path, config: Path, logs: Path, env: dict[str, str]) -> None:
        self.root = root
        self.config = config
        self.logs = logs
        self.env = env
        self.starts: list[Start] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="unit", daemon=True)

    def __enter__(self) -> Unit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        self._thread.join(60)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _loop(self) -> None:
        current = self.root / "current"
        while not self._stop.is_set():
            number = len(self.starts) + 1
            # One $INVOCATION_ID for ExecStartPre and ExecStart of one start.
            env = {**self.env, "INVOCATION_ID": uuid.uuid4().hex}
            pre = subprocess.run(
                [
                    *(str(current / "bin" / "python"), "-I", "-m", "ops.release"),
                    *("at-start", "--root", str(self.root)),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd="/",
                env=env,
            )
            start = Start(number, os.readlink(current).rpartition("/")[2], pre.stderr.strip())
            with (self.logs / f"start-{number}.log").open("wb") as out:
                self._proc = subprocess.Popen(
                    [str(current / "bin" / "evse"), "run", "--config", str(self.config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=env,
                )
                self.starts.append(start)
                start.code = self._proc.wait()
                start.ended = time.monotonic()
            # Restart=on-failure, RestartPreventExitStatus=2 78.
            if self._stop.is_set() or start.code in (0, 2, 78):
                return
            time.sleep(RESTART_SEC)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for start in self.starts:
            text = (self.logs / f"start-{start.number}.log").read_text(errors="replace")
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- start {start.number} ({start.version}, exit {start.code}):\n{tail}")
        return "\n".join(parts)


def calls_since(csms: Csms, action: str, since: int) -> list[dict[str, Any]]:
    return [m for m in messages(csms, CP, since, action) if m["type"] == "CALL"]


def statuses_since(csms: Csms, since: int) -> list[str]:
    return [m["payload"]["status"] for m in calls_since(csms, "FirmwareStatusNotification", since)]


def last_seq(csms: Csms) -> int:
    return max((int(m["seq"]) for m in messages(csms, CP)), default=0)


def at(csms: Csms, since: int, action: str, **payload: str) -> float:
    """When the central system received the first matching CALL after ``since``."""
    for m in calls_since(csms, action, since):
        if all(m["payload"].get(k) == v for k, v in payload.items()):
            return float(m["t"])
    raise AssertionError(f"no {action} {payload} after {since}")


def booted_with(csms: Csms, version: str, since: int, within: float, unit: Unit) -> dict[str, Any]:
    try:
        return wait_for(
            csms,
            CP,
            "BootNotification",
            within=within,
            since=since,
            where=lambda m: m["payload"]["firmwareVersion"] == version,
        )
    except TimeoutError:
        raise AssertionError(f"no BootNotification of {version}:\n{unit.log_tail()}") from None


def update(csms: Csms, server: HttpServer, image: Path) -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    answer = call_result(
        csms,
        CP,
        "UpdateFirmware",
        {"location": server.url(image.name), "retrieveDate": now, "retries": 0},
    )
    assert answer == {}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: the control socket's path must stay within 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="evse-fw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(900)
def test_tc_044_1_update_restart_installed_and_tc_044_3_a_broken_release_rolls_back(
    images: dict[str, Path],  # noqa: F811 - the imported fixture
    crashing_image: Path,
    sim_process: SimFactory,
    short_dir: Path,
) -> None:
    root = short_dir / "opt-evse"
    releases = Releases(root, python=PYTHON)
    releases.install(images[VERSION])
    releases.switch(VERSION, trial=0)  # as evse install leaves it
    www = short_dir / "www"
    www.mkdir()
    for image in (images[V2], crashing_image):
        shutil.copyfile(image, www / image.name)
    data_dir = short_dir / "data"
    data_dir.mkdir()
    sim = sim_process("evse-din:1", "sdm630:2")
    logs = short_dir / "logs"
    logs.mkdir()
    env = {"PATH": "/usr/bin:/bin", "EVSE_LOCK_DIR": str(short_dir)}
    with (
        running_csms() as csms,
        HttpServer(www).in_thread() as server,
    ):
        config = short_dir / "evse.toml"
        config.write_text(
            CONFIG.format(cp=CP, data_dir=data_dir, port=sim["tcp"], csms=csms.ws, root=root)
        )
        with Unit(root, config, logs, env) as unit:
            first = booted_with(csms, VERSION, 0, 90, unit)
            booted(csms)

            # --- TC_044_1: download, install, restart, Installed ---------------------------
            since = last_seq(csms)
            sent = time.monotonic()
            update(csms, server, images[V2])
            second = booted_with(csms, V2, since, 240, unit)
            until(
                lambda: (
                    statuses_since(csms, since)
                    == ["Downloading", "Downloaded", "Installing", "Installed"]
                ),
                60,
                "FirmwareStatusNotification Downloading .. Installed",
            )
            assert unit.starts[0].version == VERSION and unit.starts[0].code == 1, unit.log_tail()
            assert unit.starts[1].version == V2
            assert unit.starts[1].pre == f"evse release at-start: {V2} on trial"
            installed = at(csms, since, "FirmwareStatusNotification", status="Installed")
            assert installed > second["t"]  # after the restart, once registered
            # TC_044_1: the idle connector's Unavailable is reported before Installing.
            seq_of = {
                (m["action"], m["payload"].get("status"), m["payload"].get("connectorId")): m["seq"]
                for m in reversed(
                    calls_since(csms, "StatusNotification", since)
                    + calls_since(csms, "FirmwareStatusNotification", since)
                )
            }
            assert (
                seq_of[("StatusNotification", "Unavailable", 1)]
                < seq_of[("FirmwareStatusNotification", "Installing", None)]
            )
            wait_for(
                csms,
                CP,
                "SecurityEventNotification",
                within=30,
                since=since,
                where=lambda m: m["payload"]["type"] == "FirmwareUpdated",
            )
            assert releases.current() == V2 and releases.previous() == VERSION
            until(lambda: releases.trial() is None, 30, "the trial confirmed")
            assert not releases.pending_report().pending
            assert not (data_dir / "firmware-update.json").exists()
            exit_at = unit.starts[0].ended
            assert exit_at is not None
            timings = {
                "answer": at(csms, since, "FirmwareStatusNotification", status="Downloading")
                - sent,
                "download": at(csms, since, "FirmwareStatusNotification", status="Downloaded")
                - at(csms, since, "FirmwareStatusNotification", status="Downloading"),
                "install_and_stop": exit_at
                - at(csms, since, "FirmwareStatusNotification", status="Installing"),
                "restart_to_boot": float(second["t"]) - exit_at,
                "boot_to_installed": installed - float(second["t"]),
                "total": installed - sent,
            }
            size = images[V2].stat().st_size
            print(
                f"\nupdate to {V2} ({size / 1e6:.1f} MB): "
                + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
            )
            assert first["payload"]["firmwareVersion"] == VERSION

            # --- TC_044_3: a release that does not start, rolled back ----------------------
            since = last_seq(csms)
            update(csms, server, crashing_image)
            booted_with(csms, V2, since, 300, unit)
            until(
                lambda: (
                    statuses_since(csms, since)
                    == ["Downloading", "Downloaded", "Installing", "InstallationFailed"]
                ),
                60,
                "FirmwareStatusNotification Downloading .. InstallationFailed",
            )
            event = wait_for(
                csms,
                CP,
                "SecurityEventNotification",
                within=30,
                since=since,
                where=lambda m: m["payload"]["type"] == "FirmwareRolledBack",
            )
            assert CRASHING in event["payload"]["techInfo"]
            crashed = [s for s in unit.starts if s.version == CRASHING]
            # Three starts of its own (the trial's max_starts), each a crash (exit 1);
            # the fourth start's ExecStartPre switched back before ExecStart.
            assert [s.code for s in crashed] == [1, 1, 1], unit.log_tail()
            back = unit.starts[len(unit.starts) - 1]
            assert back.version == V2
            assert back.pre.startswith(f"evse release at-start: {CRASHING} rolled back to {V2}")
            assert releases.current() == V2 and releases.previous() == CRASHING
            # Reported once: the releases' record is gone once it was delivered.
            until(lambda: not releases.pending_report().pending, 30, "the report delivered")
            assert not (data_dir / "firmware-update.json").exists()
            rolled = calls_since(csms, "SecurityEventNotification", since)
            assert [m["payload"]["type"] for m in rolled].count("FirmwareRolledBack") == 1
        # SIGTERM: an orderly stop, exit 0, the unit not restarted.
        assert unit.starts[-1].code == 0, unit.log_tail()
