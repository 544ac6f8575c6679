"""``evse install`` / ``evse uninstall`` into throw-away roots, and the station they install.

The slow tests make real venvs (Debian's /usr/bin/python3) offline, from a
wheelhouse built once per test session (``pip wheel`` of this checkout against
constraints.txt, plus setuptools to build it), check the unit with
``systemd-analyze verify --root``, and start the installed station as the
``evse`` user of the throw-away root (``setpriv``: that user exists only in the
root's own /etc/passwd) with a real NOTIFY_SOCKET.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ops import install
from ops.config import load_config
from ops.install import (
    InstallError,
    Layout,
    choose_python,
    dropin_text,
    pick_serial_group,
    read_db,
    running_source,
    serial_devices,
    sysusers_text,
    writable_paths,
)
from ops.release import venv_python
from ops.systemd import EXIT_FAILURE

CHECKOUT = Path(__file__).resolve().parent.parent
CONSTRAINTS = CHECKOUT / "constraints.txt"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="installs chown to the evse user: root only")
needs_tools = pytest.mark.skipif(
    not all(
        shutil.which(t) for t in ("systemd-sysusers", "systemctl", "systemd-analyze", "setpriv")
    )
    or not Path(install.DEFAULT_PYTHON).exists(),
    reason="needs systemd-sysusers, systemctl, systemd-analyze, setpriv and /usr/bin/python3",
)

STATION = """\
[station]
serial = "INST-0001"
data_dir = "{data_dir}"

[board]
kind = "evse-din"
port = "{board}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{meter}"
unit = 2
timeout = 0.3
"""


def toml_config(tmp_path: Path, board: str, meter: str, extra: str = "") -> Any:
    path = tmp_path / "evse.toml"
    path.write_text(STATION.format(data_dir=tmp_path, board=board, meter=meter) + extra)
    return load_config(path)


# --- the pure parts ---------------------------------------------------------------


def test_serial_devices_are_the_rtu_buses_and_the_reader(tmp_path: Path) -> None:
    rtu = "rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1"
    config = toml_config(tmp_path, rtu, rtu, '\n[rfid]\ndevice = "/dev/ttyACM0"\n')
    # One bus shared by board and meter is allowed once; the reader is a device too.
    assert serial_devices(config) == ["/dev/ttyUSB0", "/dev/ttyACM0"]
    tcp = toml_config(tmp_path, "tcp://10.0.0.5:502", "tcp://10.0.0.6:502")
    assert serial_devices(tcp) == []


def test_dropin_allows_exactly_the_configured_devices() -> None:
    text = dropin_text(["/dev/ttyUSB0", "/dev/serial/by-id/usb-FTDI"], "dialout")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    # dialout is the unit's own: nothing to override. /opt/evse: the station
    # installs its releases there itself.
    assert lines == [
        "[Service]",
        "ReadWritePaths=/opt/evse",
        "DeviceAllow=/dev/ttyUSB0 rw",
        "DeviceAllow=/dev/serial/by-id/usb-FTDI rw",
    ]
    other = dropin_text([], "uucp", ["/srv/evse"], problem="bad file")
    assert "SupplementaryGroups=\nSupplementaryGroups=uucp\n" in other
    assert "ReadWritePaths=/srv/evse" in other
    assert "DeviceAllow" not in other and "bad file" in other


def test_data_dir_outside_the_state_directory_is_made_writable(tmp_path: Path) -> None:
    tcp = "tcp://127.0.0.1:502"
    config = toml_config(tmp_path, tcp, tcp)
    assert writable_paths(config) == [str(tmp_path)]


def test_serial_group() -> None:
    assert pick_serial_group(["root", "dialout"], ["root", "dialout", "uucp"]) == "dialout"
    # Arch names it uucp; a device's own group wins over the names we know.
    assert pick_serial_group([], ["root", "uucp"]) == "uucp"
    assert pick_serial_group(["serial"], ["serial", "dialout"]) == "serial"
    # Nothing known (a bare root): dialout, which systemd-sysusers then creates.
    assert pick_serial_group([], ["root"]) == "dialout"


def test_sysusers_names_the_serial_group() -> None:
    template = (CHECKOUT / "ops" / "systemd" / "evse.sysusers").read_text()
    assert re.search(r"(?m)^u evse - ", template)
    assert "m evse dialout" in sysusers_text(template, "dialout")
    changed = sysusers_text(template, "uucp")
    assert "m evse uucp" in changed and "m evse dialout" not in changed


def test_running_source_is_this_checkout() -> None:
    assert running_source() == str(CHECKOUT)


def test_python_in_a_home_is_refused() -> None:
    # The unit's ProtectHome=yes hides /root and /home from the station.
    with pytest.raises(InstallError, match="hidden from the station"):
        choose_python("/home/someone/.pyenv/versions/3.11.7/bin/python3")


def test_a_checkout_is_built_from_a_copy_without_its_venvs_and_caches() -> None:
    with install.buildable(str(CHECKOUT)) as tree:
        copy = Path(tree)
        assert copy != CHECKOUT and (copy / "pyproject.toml").exists()
        assert (copy / "ops" / "systemd" / "evse.service").exists()
        assert not (copy / ".venv").exists() and not list(copy.rglob("__pycache__"))
        assert not list(copy.glob("*.egg-info"))
    assert not copy.exists()
    # Anything else (a wheel file, a requirement) goes to pip as it is.
    with install.buildable("evse-firmware==0.1.0") as given:
        assert given == "evse-firmware==0.1.0"


def test_venv_base_is_read_from_pyvenv_cfg(tmp_path: Path) -> None:
    assert venv_python(tmp_path) is None
    (tmp_path / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\n"
    )
    assert venv_python(tmp_path) == "/usr/bin/python3"
    (tmp_path / "pyvenv.cfg").write_text(f"home = /nowhere\nexecutable = {sys.executable}\n")
    assert venv_python(tmp_path) == sys.executable


def test_layout_maps_under_the_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert layout.at(install.CONFIG) == tmp_path / "etc" / "evse" / "evse.toml"
    assert not layout.live
    assert Layout().live


@pytest.mark.slow
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_not_root_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "ops.install",
            "install",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        # Coverage's hook in the child could not write its data as nobody.
        env={k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},
    )
    assert done.returncode == EXIT_FAILURE
    assert done.stderr.splitlines() == [
        "evse install: error: must be run as root (sudo evse install)"
    ]
    assert list(tmp_path.iterdir()) == []


# --- real installs into throw-away roots ------------------------------------------


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's own directory that its xdist workers share (the parent of
    their base temps)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of the firmware and its pinned dependencies, built once per session
    (also for tests/test_release.py), by the first worker that asks, under a lock.
    """
    shared = shared_dir(tmp_path_factory)
    house = shared / "evse-wheelhouse"
    with open(shared / "evse-wheelhouse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (house / "done").exists():
            shutil.rmtree(house, ignore_errors=True)
            # From a copy, as evse install builds it: no build/ in the checkout.
            with install.buildable(str(CHECKOUT)) as tree:
                subprocess.run(
                    [
                        *(sys.executable, "-m", "pip", "wheel", "--quiet"),
                        *("-c", str(CONSTRAINTS), "--wheel-dir", str(house), tree),
                        # What building the checkout needs, for the offline installs.
                        "setuptools>=68",
                    ],
                    check=True,
                    timeout=600,
                )
            (house / "done").touch()
    return house


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(tmp_path_factory)


@pytest.fixture
def throwaway_root() -> Iterator[Path]:
    """A root the station's user can walk into (pytest's own tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="evse-root-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_install(
    root: Path, wheelhouse: Path, *args: str, checkout: bool = False
) -> subprocess.CompletedProcess[str]:
    """``evse install --root`` offline; from the session's wheel, or (``checkout``)
    from what is running: this checkout, built by the install itself."""
    wheel = next(wheelhouse.glob("evse_firmware-*.whl"))
    source = [] if checkout else ["--from", str(wheel)]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ops.install", "install", "--root", str(root)),
            *("--wheelhouse", str(wheelhouse), *source, *args),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done


def uninstall(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "ops.install", "uninstall", "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def user_ids(root: Path) -> tuple[int, int]:
    entry = read_db(root / "etc" / "passwd")["evse"]
    return int(entry[2]), int(entry[3])


def verify_units(root: Path) -> list[str]:
    """``systemd-analyze verify --root``'s complaints about the installed units.

    The root needs the distribution's own units (sysinit.target, ...), as an
    image would have: a copy of this host's.
    """
    system = root / "usr" / "lib" / "systemd" / "system"
    if not system.exists():
        shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "/etc/systemd/system/evse.service",
            "/etc/systemd/system/evse.path",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()] + (
        [f"exit {done.returncode}"] if done.returncode else []
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_root
@needs_tools
def test_install_twice_then_uninstall(throwaway_root: Path, wheelhouse: Path) -> None:
    root = throwaway_root
    first = run_install(root, wheelhouse)
    uid, gid = user_ids(root)
    assert uid != 0 and gid != 0
    assert "dialout" in read_db(root / "etc" / "group") and "evse" in read_db(
        root / "etc" / "group"
    )["dialout"][3].split(",")

    # The layout, owners and modes: the first release, current, owned by evse.
    prefix = root / "opt" / "evse"
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert not (prefix / "previous").exists() and not (prefix / "trial.json").exists()
    venv = prefix / "current"
    assert [p.name for p in (prefix / "releases").iterdir()] == ["0.1.0"]
    assert (prefix.stat().st_uid, prefix.stat().st_gid, prefix.stat().st_mode & 0o777) == (
        uid,
        gid,
        0o755,
    )
    # Every file of the release, links included (lstat: bin/python -> /usr/bin/python3).
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in (prefix / "releases").rglob("*")}
    assert owners == {(uid, gid)}
    config = root / "etc" / "evse" / "evse.toml"
    data = root / "var" / "lib" / "evse"
    assert (config.stat().st_uid, config.stat().st_gid, config.stat().st_mode & 0o777) == (
        0,
        gid,
        0o640,
    )
    assert (data.stat().st_uid, data.stat().st_gid, data.stat().st_mode & 0o777) == (
        uid,
        gid,
        0o750,
    )
    # The venv's scripts name the path they will have once the root is /.
    assert (venv / "bin" / "evse").read_text().splitlines()[0] == (
        "#!/opt/evse/releases/0.1.0/bin/python"
    )
    assert os.readlink(root / "usr" / "local" / "bin" / "evse") == "/opt/evse/current/bin/evse"
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Only the station's dependencies: no bench central system, no websockets.
    assert (site / "ops" / "run.py").exists()
    assert not (site / "ops" / "csms.py").exists() and not (site / "evse_lab").exists()
    assert not list(site.glob("websockets*"))
    # The unit and the drop-in made from the example file (its board is on ttyUSB0).
    unit = root / "etc" / "systemd" / "system" / "evse.service"
    text = unit.read_text()
    assert "\nExecStart=/opt/evse/current/bin/evse run --config /etc/evse/evse.toml\n" in text
    assert "\nExecStartPre=-/opt/evse/current/bin/python -I -m ops.release at-start\n" in text
    dropin = (unit.parent / "evse.service.d" / "50-install.conf").read_text()
    assert "DeviceAllow=/dev/ttyUSB0 rw" in dropin
    assert "ReadWritePaths=/opt/evse" in dropin
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert os.readlink(wants / "evse.service") == "/etc/systemd/system/evse.service"
    assert os.readlink(wants / "evse.path") == "/etc/systemd/system/evse.path"
    assert verify_units(root) == []
    assert "next: edit /etc/evse/evse.toml" in first.stdout

    # What an installer and the station leave between two versions: an edited
    # file, a database, a file a root shell left behind; and code to replace.
    edited = config.read_text().replace('serial = "EVSE-0001"', 'serial = "EDITED-7"')
    assert edited != config.read_text()
    config.write_text(edited)
    (data / "station.sqlite").write_bytes(b"the station's data")
    os.chown(data / "station.sqlite", uid, gid)
    (data / "left-by-root").write_text("x")
    stale = site / "ops" / "run.py"
    stale.write_text("broken = True\n")

    # A new serial port: --units-only rewrites the drop-in from the file, nothing else.
    edited = edited.replace("rtu:///dev/ttyUSB0", "rtu:///dev/ttyACM3")
    config.write_text(edited)
    units_only = run_install(root, wheelhouse, "--units-only")
    assert "serial ports allowed: /dev/ttyACM3" in units_only.stdout
    assert "release:" not in units_only.stdout and "broken = True" in stale.read_text()
    dropin = (unit.parent / "evse.service.d" / "50-install.conf").read_text()
    assert "DeviceAllow=/dev/ttyACM3 rw" in dropin and "ttyUSB0" not in dropin

    # An installation of the layout before releases, as it would be upgraded:
    # its venv and its link are replaced.
    legacy = prefix / "venv"
    (legacy / "bin").mkdir(parents=True)
    link = root / "usr" / "local" / "bin" / "evse"
    link.unlink()
    link.symlink_to("/opt/evse/venv/bin/evse")

    # The upgrade from the checkout itself (the default source): built from a
    # copy, so the checkout gets no root-owned build/ or *.egg-info. The same
    # version: the current release is replaced in place.
    build = CHECKOUT / "build"
    before = build.stat().st_mtime_ns if build.exists() else None
    second = run_install(root, wheelhouse, checkout=True)
    assert f"from {CHECKOUT} and its pinned dependencies" in second.stdout
    assert (build.stat().st_mtime_ns if build.exists() else None) == before
    assert "config: /etc/evse/evse.toml kept" in second.stdout
    assert "1 files given back to evse" in second.stdout
    assert "next:" not in second.stdout
    assert config.read_text() == edited
    assert (data / "station.sqlite").read_bytes() == b"the station's data"
    assert (data / "left-by-root").stat().st_uid == uid
    assert "broken = True" not in stale.read_text()
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert [p.name for p in (prefix / "releases").iterdir()] == ["0.1.0"]
    assert not legacy.exists() and "removed /opt/evse/venv" in second.stdout
    assert os.readlink(link) == "/opt/evse/current/bin/evse"
    assert user_ids(root) == (uid, gid)
    assert verify_units(root) == []

    # Uninstall keeps the settings, the data and the user.
    uninstall(root)
    assert not (root / "opt" / "evse").exists()
    assert not unit.exists() and not (wants / "evse.service").is_symlink()
    assert not (root / "usr" / "local" / "bin" / "evse").is_symlink()
    assert config.read_text() == edited
    assert (data / "station.sqlite").read_bytes() == b"the station's data"
    assert "evse" in read_db(root / "etc" / "passwd")

    uninstall(root, "--purge")
    assert not config.parent.exists() and not data.exists()
    assert "evse" not in read_db(root / "etc" / "passwd")
    assert "evse" not in read_db(root / "etc" / "group")
    assert not (root / "etc" / "sysusers.d" / "evse.conf").exists()


def evse_command(root: Path) -> list[str]:
    """The tree's ``/opt/evse/current/bin/evse``, run by the tree's interpreter (its
    ``#!`` names /opt/evse/releases/..., where the tree is not mounted here)."""
    venv = root / "opt" / "evse" / "current"
    return [str(venv / "bin" / "python"), str(venv / "bin" / "evse")]


class Notify:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self, path: Path, uid: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chown(path, uid, -1)
        self.sock.settimeout(0.1)
        self.path = path
        self.got: list[str] = []

    def wait_for(self, field: str, within: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and alive():
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            if any(field in m.splitlines() for m in self.got):
                return
        raise AssertionError(f"no {field} within {within} s: {self.got}")


@pytest.fixture
def installed(throwaway_root: Path, wheelhouse: Path) -> Path:
    run_install(throwaway_root, wheelhouse)
    return throwaway_root


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_root
@needs_tools
def test_station_runs_from_the_tree_as_evse(installed: Path, sim_process: Any) -> None:
    root = installed
    uid, gid = user_ids(root)
    data = root / "var" / "lib" / "evse"
    ready = sim_process("evse-din:1", "sdm630:2")
    # The installed file, edited as an installer would (root:evse 0640 kept),
    # with the tree's data directory in place of /var/lib/evse.
    config = root / "etc" / "evse" / "evse.toml"
    config.write_text(STATION.format(data_dir=data, board=ready["tcp"], meter=ready["tcp"]))
    locks = root / "run" / "lock" / "evse"
    locks.mkdir(parents=True)
    os.chown(locks, uid, gid)
    notify = Notify(root / "run" / "notify", uid)
    # ExecStart's command, from the tree's venv, as User=evse Group=evse.
    station = subprocess.Popen(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
            *evse_command(root),
            *("run", "--config", str(config)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Not this checkout's directory: `ops` must come from the tree's venv.
        cwd="/",
        env={
            "PATH": "/usr/bin:/bin",
            "NOTIFY_SOCKET": str(notify.path),
            "EVSE_LOCK_DIR": str(locks),
            "PYTHONWARNINGS": "error",
        },
    )
    try:
        notify.wait_for("READY=1", 30, lambda: station.poll() is None)
        station.send_signal(signal.SIGTERM)
        _out, err = station.communicate(timeout=30)
    finally:
        if station.poll() is None:
            station.kill()
            station.communicate()
        notify.sock.close()
    assert station.returncode == 0, err
    made = list(data.iterdir())
    assert any(p.name == "station.sqlite" for p in made)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in made if not p.is_socket()} == {(uid, gid)}


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_root
@needs_tools
def test_config_set_as_root_leaves_the_store_to_evse(installed: Path) -> None:
    """The README's order: `evse config set` as root before the first start."""
    root = installed
    uid, gid = user_ids(root)
    data = root / "var" / "lib" / "evse"
    evse = evse_command(root)
    done = subprocess.run(
        [*evse, "config", "set", "HeartbeatInterval", "120", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    files = list(data.iterdir())
    assert any(p.name == "station.sqlite" for p in files)
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in files} == {
        (p.name, uid, gid) for p in files
    }
    # The station's user reads it back (no station is running: from the store).
    got = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            *evse,
            "config",
            "get",
            "HeartbeatInterval",
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert (got.returncode, got.stdout.strip()) == (0, "120"), got.stderr
