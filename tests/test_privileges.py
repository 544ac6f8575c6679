"""ops/privileges.py: root working on a station's data directory becomes its owner.

The changes of user happen in child processes (they cannot be undone), on a
real directory owned by another uid; the child writes a file and reports who
it is. The end-to-end case (``evse config set`` as root on an installed
station's directory) is in tests/test_install.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.privileges import STATION_UMASK, owner_of, run_as_owner_of

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changing user needs root")
#: A uid no account has (a copied disk, a throw-away root's user).
NAMELESS = 64123

CHILD = """\
import json, os, sys
from ops.privileges import PrivilegeError, run_as_owner_of
data = sys.argv[1]
try:
    dropped = run_as_owner_of(data)
except PrivilegeError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(1)
with open(os.path.join(data, "made"), "w") as out:
    out.write("x")
st = os.stat(os.path.join(data, "made"))
print(json.dumps({"dropped": dropped, "ids": [os.getuid(), os.geteuid(), os.getgid()],
                  "groups": sorted(os.getgroups()), "file": [st.st_uid, st.st_gid,
                  st.st_mode & 0o777]}))
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's own tmp is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="evse-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def child(data: Path, *prefix: str) -> tuple[int, dict[str, object]]:
    # Coverage's subprocess hook would try to write its data file as the new
    # user, where it may not: this child runs unmeasured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", CHILD, str(data)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
        cwd="/",
    )
    assert done.stdout, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return done.returncode, result


@needs_root
def test_root_becomes_the_owner_of_a_nameless_uid(data_dir: Path) -> None:
    os.chown(data_dir, NAMELESS, NAMELESS)
    code, got = child(data_dir)
    assert code == 0
    assert got["dropped"] is True
    assert got["ids"] == [NAMELESS, NAMELESS, NAMELESS]
    # No account: its own group only, none of root's.
    assert got["groups"] == [NAMELESS]
    # The unit's umask: owner and group only.
    assert got["file"] == [NAMELESS, NAMELESS, 0o666 & ~STATION_UMASK]


@needs_root
def test_root_becomes_a_named_owner_with_its_groups(data_dir: Path) -> None:
    import pwd  # noqa: PLC0415

    nobody = pwd.getpwnam("nobody")
    os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)
    code, got = child(data_dir)
    assert code == 0
    assert got["ids"] == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid]
    assert got["groups"] == sorted(os.getgrouplist("nobody", nobody.pw_gid))
    assert got["file"][:2] == [nobody.pw_uid, nobody.pw_gid]  # type: ignore[index]


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_root_without_setuid_capability_is_one_line(data_dir: Path) -> None:
    os.chown(data_dir, NAMELESS, NAMELESS)
    # Root in a container that took CAP_SETUID/CAP_SETGID away.
    code, got = child(data_dir, "setpriv", "--bounding-set=-setuid,-setgid")
    assert code == 1
    assert got == {
        "error": f"{data_dir} belongs to uid {NAMELESS}; cannot become uid {NAMELESS} "
        "(Operation not permitted)"
    }
    assert not (data_dir / "made").exists()


@needs_root
def test_a_root_owned_or_missing_directory_is_left_alone(data_dir: Path) -> None:
    assert owner_of(data_dir) is None
    assert owner_of(data_dir / "missing") is None
    # In this process: nothing to do, so nothing changes.
    assert run_as_owner_of(data_dir) is False
    assert os.geteuid() == 0


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_not_root_stays_who_it_is(data_dir: Path) -> None:
    os.chown(data_dir, NAMELESS, NAMELESS)
    data_dir.chmod(0o777)
    code, got = child(data_dir, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    assert code == 0
    assert got["dropped"] is False
    assert got["ids"] == [65534, 65534, 65534]
    assert got["file"][:2] == [65534, 65534]  # type: ignore[index]


def test_owner_of_as_the_caller() -> None:
    # Whoever runs this: a directory of root's is never "someone else's" to become.
    assert owner_of("/") is None


@needs_root
def test_a_store_left_by_root_is_one_line_naming_the_file(data_dir: Path) -> None:
    """The README's trap: `evse config set` run as root (by hand, before the
    station's user existed) left a root-owned store; `evse run` as root becomes
    the directory's owner and then cannot write the store: exit 78, one line
    naming the file and what to do, never SQLite's "readonly database"."""
    from tests.test_run import write_config  # noqa: PLC0415

    config = write_config(data_dir, "tcp://127.0.0.1:9")
    store = data_dir / "data" / "station.sqlite"
    store.write_bytes(b"")
    store.chmod(0o600)
    nobody = 65534
    os.chown(data_dir / "data", nobody, nobody)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**env, "EVSE_LOCK_DIR": str(data_dir)},
        cwd="/",
    )
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(store) in lines[0] and "chown" in lines[0] and "uid 0" in lines[0]
