"""The wiring of issue 10 in ``evse run`` (ops/run.py, ops/firmware_wiring.py), in process.

Real releases roots (laid out as tests/test_release.py's quick lane does: release
directories with their completion marker, no venv), the real trial record and
its wall-clock deadline; the station around the trial task is reduced to what
the task reads (the supervisor's ``started``, the station loop's ``call``, the
charge point's ``registered``, the port's ``link``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from evse.limits import CentralSystem
from ocpp16.chargepoint import AdvertisedProfiles
from ocpp16.profiles import Handler, Task
from ops import firmware_wiring
from ops.config import config_from_dict
from ops.errors import ReleaseError
from ops.firmware_wiring import ReleaseContext, ReleaseInstaller, release_context, runs_from
from ops.release import Releases, StartReport
from ops.run import _release_trial, sim_config
from tests.test_release import lay_out


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    root = tmp_path / "opt-evse"
    lay_out(root, "1.0", "2.0")
    return root


@dataclass
class Station:
    calls: int = 0

    async def call(self, fn: Any) -> Any:
        self.calls += 1
        return await fn()


@dataclass
class Supervisor:
    station: Station = field(default_factory=Station)
    started: trio.Event = field(default_factory=trio.Event)


@dataclass
class ChargePoint:
    registered: trio.Event = field(default_factory=trio.Event)


@dataclass
class Port:
    link: CentralSystem = CentralSystem.OFFLINE
    chargepoint: ChargePoint = field(default_factory=ChargePoint)


@dataclass
class Central:
    releases: ReleaseContext
    port: Port = field(default_factory=Port)


def on_trial(root: Path, seconds: float) -> tuple[Releases, Central]:
    releases = Releases(root)
    releases.switch("2.0", trial=seconds)
    report = releases.at_start()
    assert report.on_trial == "2.0"
    return releases, Central(ReleaseContext(releases, running=True, report=report))


async def trial(central: Central, supervisor: Supervisor, restarts: list[str]) -> None:
    await _release_trial(cast(Any, supervisor), cast(Any, central), restarts.append)


async def test_registration_confirms_the_release_on_trial(root: Path) -> None:
    releases, central = on_trial(root, 600)
    supervisor = Supervisor()
    restarts: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trial, central, supervisor, restarts)
        await trio.sleep(0.05)
        assert releases.trial() is not None  # the station has not started yet
        supervisor.started.set()
        await trio.sleep(0.05)
        assert releases.trial() is not None  # started, not registered
        central.port.chargepoint.registered.set()
    assert releases.trial() is None
    assert supervisor.station.calls == 1  # the loop answered first
    # Confirmed, and nothing left to report: the firmware profile reports an update.
    assert releases.pending_report() == StartReport()
    assert restarts == []
    assert releases.current() == "2.0"


async def test_without_a_central_system_an_answering_loop_confirms(root: Path) -> None:
    releases, central = on_trial(root, 600)
    central.port.link = CentralSystem.NOT_CONFIGURED
    supervisor = Supervisor()
    supervisor.started.set()
    restarts: list[str] = []
    await trial(central, supervisor, restarts)
    assert releases.trial() is None and restarts == []


async def test_the_deadline_rolls_back_and_asks_for_the_restart(root: Path) -> None:
    # Real time: the trial record's deadline is wall-clock UTC (Releases' own clock).
    releases, central = on_trial(root, 0.5)
    supervisor = Supervisor()
    supervisor.started.set()  # running, but never registered
    restarts: list[str] = []
    with trio.fail_after(30):
        await trial(central, supervisor, restarts)
    assert restarts == ["rollback from firmware release 2.0 to 1.0"]
    assert releases.current() == "1.0"
    report = releases.pending_report()
    assert report.rolled_back is not None and report.rolled_back[:2] == ("2.0", "1.0")


def test_runs_from_only_a_release_of_that_root(root: Path) -> None:
    assert runs_from(root, str(root / "releases" / "2.0"))
    assert runs_from(root, str(root / "current"))  # the link, resolved
    assert not runs_from(root, str(root))
    assert not runs_from(root, str(root.parent / "venv"))
    # This test runs from a checkout's venv: not a release.
    assert not runs_from(root)
    assert not runs_from(root, sys.prefix)


def test_sim_has_no_releases_and_a_file_names_its_root(tmp_path: Path) -> None:
    sim = sim_config("tcp://127.0.0.1:1502", tmp_path)
    assert sim.firmware.releases is None
    assert release_context(sim) == ReleaseContext(trial=600.0)
    data = {
        "station": {"serial": "S-1", "data_dir": str(tmp_path)},
        "board": {"kind": "evse-din", "port": "tcp://127.0.0.1:1502", "unit": 1},
        "meter": {"kind": "sdm630", "port": "tcp://127.0.0.1:1502", "unit": 2},
        "firmware": {"releases": str(tmp_path / "r"), "trial": 120},
    }
    context = release_context(config_from_dict(data))
    assert context.releases is not None and context.releases.root == tmp_path / "r"
    assert (context.running, context.trial) == (False, 120.0)


def test_the_installer_installs_only_into_a_laid_out_root(tmp_path: Path, root: Path) -> None:
    image = tmp_path / "evse-9.tar"
    image.write_bytes(b"")
    with pytest.raises(ReleaseError, match="installs no releases"):
        ReleaseInstaller(None, trial=600, running=False).install(image)
    empty = Releases(tmp_path / "empty")
    with pytest.raises(ReleaseError, match="no current link"):
        ReleaseInstaller(empty, trial=600, running=False).switch("2.0")
    assert not (tmp_path / "empty").exists()
    # Switched on trial with the configured time; confirmed only by a station
    # that runs from the root.
    releases = Releases(root)
    installer = ReleaseInstaller(releases, trial=600, running=False)
    installer.switch("2.0")
    assert releases.trial() is not None
    installer.confirm()
    assert releases.trial() is not None
    ReleaseInstaller(releases, trial=600, running=True).confirm()
    assert releases.trial() is None and not releases.pending_report().pending


def test_confirm_keeps_a_rollback_to_report(root: Path) -> None:
    releases = Releases(root)
    releases.switch("2.0", trial=600)
    releases.rollback("test")
    firmware_wiring.confirm_release(releases)  # no trial: nothing confirmed
    assert releases.pending_report().rolled_back is not None


class _Profile:
    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[str, Handler] = {}

    def tasks(self) -> tuple[Task, ...]:
        return ()


def test_supported_feature_profiles_never_name_the_security_extensions() -> None:
    profiles = AdvertisedProfiles()
    for name in ("SecurityEvents", "RemoteTrigger", "Security", "Core", "FirmwareManagement"):
        profiles.register(_Profile(name))
    assert profiles.supported == "Core,FirmwareManagement,RemoteTrigger"
    assert [p.name for p in profiles] == [
        "SecurityEvents",
        "RemoteTrigger",
        "Security",
        "Core",
        "FirmwareManagement",
    ]


#: What a station without a central system must not load (issue 7's footprint):
#: the extensions' modules and what they import.
EXTENSIONS_ONLY = (
    "cryptography",
    "httpx",
    "httpcore",
    "anyio",
    "ftplib",
    "ocpp16.certificates",
    "ocpp16.transfer",
    "ocpp16.firmware",
    "ocpp16.profiles.firmware",
    "ocpp16.profiles.security",
    "ops.diagnostics",
)


@pytest.mark.slow  # starts a process
def test_a_station_without_a_central_system_loads_no_extension(tmp_path: Path) -> None:
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from tests.test_start_imports import CHILD, ROOT  # noqa: PLC0415

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(EXTENSIONS_ONLY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["start"] == []
