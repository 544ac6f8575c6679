"""``evse install`` / ``evse uninstall``: the station on a gateway, run by systemd.

``evse install`` (as root) lays out, under ``--root DIR`` (default ``/``)::

    /opt/evse/releases/<version>            the firmware and its pinned dependencies: a
                                            venv per release (ops/release.py)
    /opt/evse/current -> releases/<version> the release the unit runs
    /usr/local/bin/evse                     -> /opt/evse/current/bin/evse
    /etc/evse/evse.toml                     the configuration, root:evse 0640, written once
    /var/lib/evse                           the data directory, evse:evse 0750
    /etc/sysusers.d/evse.conf               the evse system user (systemd-sysusers)
    /etc/systemd/system/evse.service        the unit (ops/systemd/evse.service)
    /etc/systemd/system/evse.path           starts it again when the file is fixed
    /etc/systemd/system/evse.service.d/50-install.conf
                                            from the configuration: the serial
                                            ports it may open, their group

and enables the units. The release is made as a firmware update makes one:
an image of the firmware's wheel and its pinned dependencies' wheels, a venv
installed offline from it, switched to once its self-check passed. /opt/evse
belongs to the station's user: the station installs and switches releases
itself (OCPP UpdateFirmware), as that user.

Run again it upgrades in place: a release is made from the new source and
switched to (the same version replaces the current one; another keeps the
release before it, for `evse release rollback`), the configuration and the
data are kept (files in the data directory that are not the station user's
are given back to it), the units and the drop-in are rewritten and a running
station is restarted. An installation of the layout before releases
(/opt/evse/venv) is upgraded to it, and that venv removed.
``--units-only`` rewrites only the units and the drop-in from the
configuration: what to run after changing a serial port in the file.

``evse uninstall`` stops and removes the units, /opt/evse and the link, and
keeps the configuration, the data and the user; ``--purge`` removes those too.

With ``--root DIR`` the same layout goes into a directory (tests, image
builds): users are made in DIR/etc/passwd, the units are enabled with
``systemctl --root``, and the venvs' scripts name /opt/evse/releases/..., as they will
once DIR is the root file system. The interpreter the venv is made from must
then exist at the same path in the image (Debian's /usr/bin/python3).

Everything here is blocking (pip, systemctl, file copies): ``run`` runs it in
a worker thread. No step has a timeout of its own: each child process (pip,
systemctl, systemd-sysusers) has its own, and an install is watched by a
person. Every failure ends in one line naming the step and the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit

import trio

from ops import release
from ops.errors import ReleaseError
from ops.systemd import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from ops.config import Config

# --- the layout, as on the gateway ---------------------------------------------

PREFIX = PurePosixPath("/opt/evse")
#: The release the unit runs: a link to releases/<version> (ops/release.py).
CURRENT = PREFIX / "current"
#: The venv of the layout before releases: upgraded from, then removed.
LEGACY_VENV = PREFIX / "venv"
CONFIG = PurePosixPath("/etc/evse/evse.toml")
DATA_DIR = PurePosixPath("/var/lib/evse")
UNIT_DIR = PurePosixPath("/etc/systemd/system")
UNITS = ("evse.service", "evse.path")
DROPIN = UNIT_DIR / "evse.service.d" / "50-install.conf"
SYSUSERS = PurePosixPath("/etc/sysusers.d/evse.conf")
LINK = PurePosixPath("/usr/local/bin/evse")
#: The wants symlinks ``systemctl enable`` makes (both units: WantedBy=multi-user.target).
WANTS = UNIT_DIR / "multi-user.target.wants"
USER = "evse"
#: The group that owns serial ports, by distribution, in the order they are looked for.
SERIAL_GROUPS = ("dialout", "uucp")
#: Serial devices whose group tells the host's serial group.
SERIAL_DEVICES = ("ttyUSB*", "ttyACM*", "ttyAMA*", "ttyS*")
#: The station runs with ProtectHome=yes: an interpreter (or venv base) under
#: these is invisible to it.
HOME_DIRS = (PurePosixPath("/root"), PurePosixPath("/home"), PurePosixPath("/run/user"))
MIN_PYTHON = (3, 11)
DEFAULT_PYTHON = "/usr/bin/python3"


class InstallError(Exception):
    """An install step failed; the message is the one line the operator reads."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the gateway's paths are on this machine: under ``root``."""

    root: Path = Path("/")

    @property
    def live(self) -> bool:
        """The running system itself (not a throw-away root): systemd may be asked."""
        return self.root.resolve() == Path("/")

    def at(self, path: PurePosixPath | Path) -> Path:
        """The host path of a layout path (``/etc/evse`` -> ``DIR/etc/evse``)."""
        return self.root / PurePosixPath(path).relative_to("/")


# --- pure parts: texts made from the configuration ----------------------------


def serial_devices(config: Config) -> list[str]:
    """The serial devices the configuration opens: RTU buses and the RFID reader.

    Each device once, in the configuration's order.
    """
    found: list[str] = []
    for port in (config.board.port, config.meter.port):
        device = getattr(port, "device", None)  # RtuPort; a TcpPort has none
        if isinstance(device, str) and device not in found:
            found.append(device)
    if config.rfid is not None and str(config.rfid.device) not in found:
        found.append(str(config.rfid.device))
    return found


def writable_paths(config: Config) -> list[str]:
    """Directories the station writes outside its StateDirectory (ReadWritePaths=)."""
    paths: list[str] = []
    for path in (
        PurePosixPath(config.station.data_dir),
        PurePosixPath(config.control.socket).parent,
    ):
        if path != DATA_DIR and DATA_DIR not in path.parents and str(path) not in paths:
            paths.append(str(path))
    return paths


def dropin_text(
    devices: Sequence[str], group: str, writable: Sequence[str] = (), problem: str | None = None
) -> str:
    """The unit's drop-in: serial group, the devices DevicePolicy=closed lets through."""
    lines = [
        f"# Written by `evse install` from {CONFIG}; do not edit: after changing a",
        "# serial port there, run `evse install --units-only` (it rewrites this file,",
        "# reloads systemd and restarts a running station).",
    ]
    if problem is not None:
        lines += [
            f"# {CONFIG} could not be read ({problem}):",
            "# no serial port is allowed until it is fixed and this file rewritten.",
        ]
    lines += [
        f"# {PREFIX} is the station's: it installs firmware releases there and",
        "# switches their current link itself (ops/release.py, OCPP UpdateFirmware).",
        "[Service]",
        f"ReadWritePaths={PREFIX}",
    ]
    if group != SERIAL_GROUPS[0]:
        # The unit names dialout; an empty assignment drops it first.
        lines += ["SupplementaryGroups=", f"SupplementaryGroups={group}"]
    lines += [f"DeviceAllow={device} rw" for device in devices]
    lines += [f"ReadWritePaths={path}" for path in writable]
    return "\n".join(lines) + "\n"


def sysusers_text(template: str, group: str) -> str:
    """The sysusers.d file with the host's serial group in its membership line."""
    return re.sub(r"(?m)^m evse \S+$", f"m {USER} {group}", template)


def read_db(path: Path) -> dict[str, list[str]]:
    """An /etc/passwd or /etc/group file: name -> its colon-separated fields."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            fields = line.split(":")
            entries[fields[0]] = fields
    return entries


def pick_serial_group(device_groups: Iterable[str], known_groups: Iterable[str]) -> str:
    """The group that owns serial ports: the devices' own group, else the first
    distribution name the group database has, else dialout (sysusers makes it)."""
    known = set(known_groups)
    for group in device_groups:
        if group in known and group != "root":
            return group
    for group in SERIAL_GROUPS:
        if group in known:
            return group
    return SERIAL_GROUPS[0]


# --- the running firmware: where it comes from -----------------------------------


def running_source() -> str:
    """What pip installs to get the firmware that is running now.

    The checkout it runs from (an editable install), else the file it was
    installed from when that is still there, else the same version from the
    package index.
    """
    checkout = Path(__file__).resolve().parent.parent
    project = checkout / "pyproject.toml"
    if project.is_file() and 'name = "evse-firmware"' in project.read_text(encoding="utf-8"):
        return str(checkout)
    try:
        dist = importlib.metadata.distribution("evse-firmware")
    except importlib.metadata.PackageNotFoundError:
        raise InstallError(
            "cannot tell where the running firmware comes from; give --from WHEEL_OR_DIR"
        ) from None
    direct = dist.read_text("direct_url.json")
    if direct:
        url = urlsplit(json.loads(direct).get("url", ""))
        if url.scheme == "file" and Path(unquote(url.path)).exists():
            return unquote(url.path)
    return f"evse-firmware=={dist.version}"


@contextlib.contextmanager
def shipped(name: str) -> Iterator[Path]:
    """A file of ops/systemd/ (package data: in the checkout and in the wheel)."""
    resource = importlib.resources.files("ops") / "systemd" / name
    if not resource.is_file():
        raise InstallError(f"ops/systemd/{name} is missing from the installed firmware")
    with importlib.resources.as_file(resource) as path:
        yield path


# --- steps ----------------------------------------------------------------------

Say = Callable[[str], None]


def _run(argv: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> str:
    """Run a command; its failure is one line: what, the exit code, its last error line."""
    try:
        done = subprocess.run(  # noqa: S603 - argv built here, never a shell
            list(argv), capture_output=True, text=True, check=False, env=env
        )
    except OSError as exc:
        raise InstallError(f"{what}: cannot run {argv[0]} ({exc.strerror or exc})") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        last = (errors or lines or ["no output"])[-1].strip()
        raise InstallError(f"{what}: {argv[0]} exited with {done.returncode}: {last}")
    return done.stdout


def _python_version(python: str) -> tuple[int, int] | None:
    try:
        out = _run([python, "-c", "import sys, venv, ensurepip; print(*sys.version_info[:2])"], "")
    except InstallError:
        return None
    major, minor = out.split()
    return int(major), int(minor)


def choose_python(given: str | None) -> str:
    """The interpreter the venv is made from: Python 3.11+, with venv, not in a home."""
    candidates = [given] if given else [DEFAULT_PYTHON, str(getattr(sys, "_base_executable", ""))]
    reasons: list[str] = []
    for python in filter(None, candidates):
        resolved = PurePosixPath(os.path.realpath(python))
        if any(home == resolved or home in resolved.parents for home in HOME_DIRS):
            reasons.append(f"{python} is under {resolved.parts[1]}, hidden from the station")
            continue
        version = _python_version(python)
        if version is None:
            reasons.append(
                f"{python} does not run or lacks venv (Debian: apt-get install python3-venv)"
            )
        elif version < MIN_PYTHON:
            reasons.append(f"{python} is Python {version[0]}.{version[1]}, not 3.11 or later")
        else:
            return python
    raise InstallError(
        "no Python to make the venv from: " + "; ".join(reasons) + " (give --python)"
    )


def serial_group(layout: Layout) -> str:
    groups = read_db(layout.at(PurePosixPath("/etc/group")))
    device_groups: list[str] = []
    if layout.live:
        by_gid = {fields[2]: name for name, fields in groups.items() if len(fields) > 2}
        for pattern in SERIAL_DEVICES:
            for device in sorted(Path("/dev").glob(pattern)):
                with contextlib.suppress(OSError):
                    device_groups.append(by_gid.get(str(device.stat().st_gid), ""))
    return pick_serial_group(device_groups, groups)


def ensure_user(layout: Layout, group: str, say: Say, *, sysusers: bool = True) -> tuple[int, int]:
    """The evse system user, a member of ``group``; (uid, gid)."""
    with shipped("evse.sysusers") as template:
        text = sysusers_text(template.read_text(encoding="utf-8"), group)
    _write(layout.at(SYSUSERS), text, 0o644)
    root = [] if layout.live else ["--root", str(layout.root)]
    if sysusers and shutil.which("systemd-sysusers"):
        _run(["systemd-sysusers", *root, str(layout.at(SYSUSERS))], "systemd-sysusers")
    else:
        _run(["groupadd", *root, "--force", "--system", group], f"group {group}")
        if USER in read_db(layout.at(PurePosixPath("/etc/passwd"))):
            _run(["usermod", *root, "--append", "--groups", group, USER], f"user {USER}")
        else:
            _run(
                [
                    "useradd", *root, "--system", "--user-group", "--no-create-home",
                    "--home-dir", str(DATA_DIR), "--shell", "/usr/sbin/nologin",
                    "--comment", "evse charging station", "--groups", group, USER,
                ],
                f"user {USER}",
            )  # fmt: skip
    entry = read_db(layout.at(PurePosixPath("/etc/passwd"))).get(USER)
    if entry is None or len(entry) < 4:
        raise InstallError(
            f"user {USER}: not in {layout.at(PurePosixPath('/etc/passwd'))} after creating it"
        )
    uid, gid = int(entry[2]), int(entry[3])
    say(f"user {USER}: uid {uid}, gid {gid}, in group {group}")
    return uid, gid


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    """Write a file whole (a crash leaves the old one or the new one, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_config(layout: Layout, gid: int, say: Say) -> None:
    """/etc/evse/evse.toml from the example when absent; an existing one is never touched."""
    from ops.config import ConfigError, example_toml  # noqa: PLC0415 - only install needs it

    path = layout.at(CONFIG)
    if path.exists():
        st = path.stat()
        if not (st.st_mode & 0o004 or (st.st_gid == gid and st.st_mode & 0o040)):
            say(
                f"warning: {CONFIG} is not readable by group {USER}: "
                f"chgrp {USER} {CONFIG}; chmod g+r {CONFIG}"
            )
        say(f"config: {CONFIG} kept")
        return
    try:
        example = example_toml()
    except ConfigError as exc:
        raise InstallError(f"config: the example configuration cannot be made ({exc})") from None
    _write(path, example, 0o640, (0, gid))
    say(f"config: {CONFIG} written from the example: set board, meter and station there")


def load_installed_config(layout: Layout) -> tuple[Config | None, str | None]:
    """The installed configuration, or (None, why not)."""
    from ops.config import ConfigError, load_config  # noqa: PLC0415

    try:
        return load_config(layout.at(CONFIG)), None
    except ConfigError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, exc.strerror or str(exc)


def data_dirs(config: Config | None) -> list[PurePosixPath]:
    dirs = [DATA_DIR]
    if config is not None and PurePosixPath(config.station.data_dir) != DATA_DIR:
        dirs.append(PurePosixPath(config.station.data_dir))
    return dirs


def ensure_data_dir(layout: Layout, path: PurePosixPath, uid: int, gid: int, say: Say) -> None:
    """The data directory, owned by the station user, 0750; files in it given back to it."""
    host = layout.at(path)
    host.mkdir(parents=True, exist_ok=True)
    os.chown(host, uid, gid)
    os.chmod(host, 0o750)  # noqa: S103 - the group is evse's: operators in it use the socket
    # A file a root shell left (an `evse` command before privileges were
    # dropped, sqlite3 by hand) would stop the station. Symlinks are changed,
    # never followed: nothing outside the directory changes owner.
    repaired = 0
    for top, dirs, files in os.walk(host):
        for name in (*dirs, *files):
            entry = Path(top) / name
            st = entry.lstat()
            if st.st_uid != uid:
                os.chown(entry, uid, gid, follow_symlinks=False)
                repaired += 1
    note = f", {repaired} files given back to {USER}" if repaired else ""
    say(f"data: {path} owned by {USER}{note}")


#: What a source tree's copy leaves out: VCS data, venvs, caches, build output.
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".nox", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "bench-results", "htmlcov", ".coverage*", "node_modules",
)  # fmt: skip


@contextlib.contextmanager
def buildable(source: str) -> Iterator[str]:
    """``source`` as pip builds it: a source tree is copied first, so that the
    build (as root) leaves no root-owned build/ or *.egg-info in a checkout."""
    if not Path(source).is_dir():
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="evse-source-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(source, copy, ignore=SOURCE_IGNORE, symlinks=True)
        yield str(copy)


def ensure_release(
    layout: Layout,
    python: str,
    source: str,
    say: Say,
    *,
    owner: tuple[int, int],
    wheelhouse: Path | None = None,
) -> str:
    """A release made from ``source`` and switched to: its version.

    The wheels are built by a throw-away venv of ``python`` (compiled wheels
    are for the interpreter that runs them, not for the one running this),
    packed into an image and installed from it like any update
    (ops/release.py): verified, a venv made offline, self-checked, then
    ``current`` switched, for good (an installer is there to look).
    """
    prefix = layout.at(PREFIX)
    prefix.mkdir(parents=True, exist_ok=True)
    os.chown(prefix, *owner)
    os.chmod(prefix, 0o755)  # noqa: S103 - code: readable by all, written by the station
    say(f"release: building evse-firmware from {source} and its pinned dependencies (pip)")
    with (
        shipped("constraints.txt") as constraints,
        tempfile.TemporaryDirectory(prefix="evse-install-") as tmp,
        buildable(source) as tree,
    ):
        builder = Path(tmp) / "build-venv"
        _run([python, "-m", "venv", str(builder)], "build venv")
        try:
            wheels = Path(tmp) / "wheels"
            firmware = release.build_wheels(
                tree,
                wheels,
                constraints,
                python=str(builder / "bin" / "python"),
                wheelhouse=wheelhouse,
            )
            image = release.pack(wheels, Path(tmp), firmware, python=python)
            releases = release.Releases(
                prefix, python=python, runs_at=None if layout.live else PREFIX, owner=owner
            )
            version = releases.install(image, replace=True, say=say)
            previous = releases.current()
            releases.switch(version, trial=0)
        except ReleaseError as exc:
            raise InstallError(str(exc)) from None
    kept = f", {previous} kept for evse release rollback" if previous not in (None, version) else ""
    say(f"release: {CURRENT} -> releases/{version}, evse-firmware {version} from {python}{kept}")
    legacy = layout.at(LEGACY_VENV)
    if legacy.exists():
        shutil.rmtree(legacy)
        say(f"removed {LEGACY_VENV} (the layout before releases)")
    return version


def ensure_link(layout: Layout, say: Say) -> None:
    """/usr/local/bin/evse, so that `evse status` works from any shell."""
    link = layout.at(LINK)
    target = str(CURRENT / "bin" / "evse")
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_symlink() and os.readlink(link) == str(LEGACY_VENV / "bin" / "evse"):
        link.unlink()
    if link.exists() or link.is_symlink():
        say(f"warning: {LINK} exists and is not ours; left alone (the station's is {target})")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    say(f"link: {LINK} -> {target}")


def install_units(layout: Layout, group: str, say: Say) -> None:
    """The units, verbatim, and the drop-in made from the configuration."""
    for name in UNITS:
        with shipped(name) as unit:
            _write(layout.at(UNIT_DIR / name), unit.read_text(encoding="utf-8"), 0o644)
    config, problem = load_installed_config(layout)
    if config is None:
        say(f"warning: {problem}: the unit may open no serial port until the file is fixed")
        text = dropin_text([], group, problem=problem)
    else:
        text = dropin_text(serial_devices(config), group, writable_paths(config))
    _write(layout.at(DROPIN), text, 0o644)
    devices = serial_devices(config) if config is not None else []
    say(
        f"units: {', '.join(UNITS)} in {UNIT_DIR}; "
        f"serial ports allowed: {', '.join(devices) or 'none'}"
    )


def _systemd_running(layout: Layout) -> bool:
    return layout.live and Path("/run/systemd/system").is_dir()


def _systemctl(layout: Layout, *args: str) -> None:
    root = [] if _systemd_running(layout) else [f"--root={layout.root}"]
    _run(["systemctl", *root, *args], f"systemctl {' '.join(args)}")


def _failed(unit: str) -> bool:
    # systemctl from PATH, as everywhere here: its place differs between distributions.
    argv = ["systemctl", "is-failed", "--quiet", unit]
    return subprocess.run(argv, check=False, capture_output=True).returncode == 0  # noqa: S603


def enable_units(layout: Layout, say: Say, *, upgrade: bool, use_systemctl: bool = True) -> None:
    """Enabled for the next boot; evse.path watching now; a running station restarted."""
    if use_systemctl and shutil.which("systemctl"):
        if _systemd_running(layout):
            _systemctl(layout, "daemon-reload")
            _systemctl(layout, "enable", UNITS[0])
            _systemctl(layout, "enable", "--now", UNITS[1])
            if upgrade:
                # The new code for a running station, and a new chance for a
                # failed one (exit 78 before the upgrade). Not waited for: the
                # install is done; `systemctl status evse` shows the start.
                _systemctl(layout, "--no-block", "try-restart", UNITS[0])
                if _failed(UNITS[0]):
                    _systemctl(layout, "--no-block", "restart", UNITS[0])
                say(f"restarted {UNITS[0]} if it was running or had failed")
        else:
            _systemctl(layout, "enable", *UNITS)
    else:
        # What `systemctl enable` does for WantedBy=multi-user.target.
        wants = layout.at(WANTS)
        wants.mkdir(parents=True, exist_ok=True)
        for name in UNITS:
            link = wants / name
            if not link.is_symlink():
                link.symlink_to(str(UNIT_DIR / name))
    say("enabled: " + ", ".join(UNITS))


def install(
    layout: Layout,
    say: Say,
    *,
    source: str | None = None,
    python: str | None = None,
    wheelhouse: Path | None = None,
    units_only: bool = False,
    sysusers: bool = True,
    use_systemctl: bool = True,
) -> None:
    """Install (or upgrade in place) the station under ``layout``."""
    group = serial_group(layout)
    if units_only:
        if not layout.at(CURRENT).is_symlink():
            raise InstallError(
                f"--units-only: no installation at {layout.at(CURRENT)}; run evse install"
            )
        install_units(layout, group, say)
        enable_units(layout, say, upgrade=True, use_systemctl=use_systemctl)
        return
    upgrade = layout.at(CURRENT).is_symlink() or layout.at(LEGACY_VENV).exists()
    chosen = choose_python(python)
    uid, gid = ensure_user(layout, group, say, sysusers=sysusers)
    ensure_config(layout, gid, say)
    config, _ = load_installed_config(layout)
    for path in data_dirs(config):
        ensure_data_dir(layout, path, uid, gid, say)
    ensure_release(
        layout, chosen, source or running_source(), say, owner=(uid, gid), wheelhouse=wheelhouse
    )
    ensure_link(layout, say)
    install_units(layout, group, say)
    enable_units(layout, say, upgrade=upgrade, use_systemctl=use_systemctl)
    if not upgrade:
        say(
            f"next: edit {CONFIG} (board, meter, station); saving it starts the station "
            "(evse.path); then: systemctl status evse"
        )


def uninstall(layout: Layout, say: Say, *, purge: bool = False, use_systemctl: bool = True) -> None:
    """Remove the units, the releases and the link; with ``purge`` the config, data
    and user too."""
    config, _ = load_installed_config(layout)
    present = [name for name in UNITS if layout.at(UNIT_DIR / name).exists()]
    if present and use_systemctl and shutil.which("systemctl"):
        if _systemd_running(layout):
            _systemctl(layout, "disable", "--now", *reversed(present))
        else:
            _systemctl(layout, "disable", *present)
    for name in UNITS:
        for path in (layout.at(WANTS / name), layout.at(UNIT_DIR / name)):
            if path.is_symlink() or path.exists():
                path.unlink()
    shutil.rmtree(layout.at(DROPIN.parent), ignore_errors=True)
    if _systemd_running(layout):
        _systemctl(layout, "daemon-reload")
    link = layout.at(LINK)
    if link.is_symlink() and os.readlink(link) in (
        str(CURRENT / "bin" / "evse"),
        str(LEGACY_VENV / "bin" / "evse"),
    ):
        link.unlink()
    shutil.rmtree(layout.at(PREFIX), ignore_errors=True)
    say(f"removed: units, {PREFIX}, {LINK}")
    if not purge:
        say(
            f"kept: {CONFIG}, {', '.join(map(str, data_dirs(config)))}, user {USER} "
            "(--purge removes them)"
        )
        return
    for data in data_dirs(config):
        shutil.rmtree(layout.at(data), ignore_errors=True)
    shutil.rmtree(layout.at(CONFIG.parent), ignore_errors=True)
    root = [] if layout.live else ["--root", str(layout.root)]
    if USER in read_db(layout.at(PurePosixPath("/etc/passwd"))):
        _run(["userdel", *root, USER], f"user {USER}")
    if USER in read_db(layout.at(PurePosixPath("/etc/group"))):
        _run(["groupdel", *root, USER], f"group {USER}")
    with contextlib.suppress(FileNotFoundError):
        layout.at(SYSUSERS).unlink()
    say(f"purged: {CONFIG.parent}, {', '.join(map(str, data_dirs(config)))}, user {USER}")


# --- the command line -----------------------------------------------------------


INSTALL_HELP = """\
Installs the station on this gateway as a systemd service, or upgrades it in
place: the evse system user (in the group that owns the serial ports),
/etc/evse/evse.toml from the example when there is none (an existing one is
never changed), /var/lib/evse owned by evse, the firmware that is running this
command (its checkout, or the wheel it was installed from) as a release: a
venv in /opt/evse/releases/VERSION with the pinned dependencies, linked from
/opt/evse/current and /usr/local/bin/evse, the units evse.service and
evse.path (enabled) and the drop-in that lets the unit open the serial ports
named in the configuration. Run again, it upgrades: the settings and the data
are kept, the release before is kept for evse release rollback (the same
version is replaced), a running station is restarted.

After changing a serial port in /etc/evse/evse.toml: evse install --units-only.

examples:
  sudo .venv/bin/evse install                  from this checkout, online
  sudo evse install --from evse_firmware-0.2.0-py3-none-any.whl
  sudo evse install --wheelhouse /media/usb/wheels   offline
  sudo evse install --root /srv/image          into an image being built

exit codes:
  0  installed
  1  a step failed (one line: the step and why), or not run as root
  2  a bad option"""

UNINSTALL_HELP = """\
Stops and removes the units, the releases in /opt/evse and /usr/local/bin/evse.
The configuration (/etc/evse), the data (/var/lib/evse) and the evse user
are kept, so that evse install brings the station back as it was; --purge
removes them too.

examples:
  sudo evse uninstall
  sudo evse uninstall --purge

exit codes:
  0  removed
  1  a step failed (one line: the step and why), or not run as root
  2  a bad option"""


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_parsers(
    subparsers: argparse._SubParsersAction[_Parser],
    parents: Sequence[_Parser] = (),
) -> None:
    """``evse install`` and ``evse uninstall``, on the CLI's subcommand parsers."""
    p = subparsers.add_parser(
        "install",
        parents=list(parents),
        help="install or upgrade the station as a systemd service (as root)",
        description=INSTALL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _root_option(p)
    p.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="a firmware wheel, source tree or pip requirement (default: what is running now)",
    )
    p.add_argument(
        "--wheelhouse",
        metavar="DIR",
        type=Path,
        help="install offline from the wheels in DIR (pip --no-index --find-links DIR); "
        "building a source tree needs setuptools there too",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help=f"the interpreter the venv is made from (default {DEFAULT_PYTHON}, Python 3.11+, "
        "not under /root or /home)",
    )
    p.add_argument(
        "--units-only",
        action="store_true",
        help="only rewrite the units and their serial-port drop-in from the config file",
    )
    u = subparsers.add_parser(
        "uninstall",
        parents=list(parents),
        help="remove the installed station (keeps config, data and user unless --purge)",
        description=UNINSTALL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _root_option(u)
    u.add_argument(
        "--purge", action="store_true", help="also remove /etc/evse, the data and the evse user"
    )


def _root_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        metavar="DIR",
        type=Path,
        default=Path("/"),
        help="install into DIR as if it were / (image builds, tests; default /)",
    )


def execute(args: argparse.Namespace, say: Say) -> int:
    """Blocking: the whole command; an InstallError is one line and exit 1."""
    name = args.command
    if os.geteuid() != 0:
        print(f"evse {name}: error: must be run as root (sudo evse {name})", file=sys.stderr)
        return EXIT_FAILURE
    layout = Layout(Path(os.path.abspath(args.root)))
    try:
        if not layout.root.is_dir():
            raise InstallError(f"--root {args.root}: no such directory")
        if name == "install":
            wheelhouse = args.wheelhouse.resolve() if args.wheelhouse else None
            if wheelhouse is not None and not wheelhouse.is_dir():
                raise InstallError(f"--wheelhouse {args.wheelhouse}: no such directory")
            install(
                layout,
                say,
                source=args.source,
                python=args.python,
                wheelhouse=wheelhouse,
                units_only=args.units_only,
            )
        else:
            uninstall(layout, say, purge=args.purge)
    except (InstallError, OSError) as exc:
        reason = str(exc) if isinstance(exc, InstallError) else _os_reason(exc)
        print(f"evse {name}: error: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _os_reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


async def run(args: argparse.Namespace) -> int:
    """The CLI's runner for ``install`` and ``uninstall``."""

    def say(line: str) -> None:
        print(f"evse {args.command}: {line}", flush=True)

    return await trio.to_thread.run_sync(execute, args, say)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.install install|uninstall ...``: the same as ``evse install``."""
    parser = argparse.ArgumentParser(prog="evse")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
