"""Root working on the station's data keeps it the station's.

The station runs as its own user (``evse``, ops/systemd/evse.service) and owns
its data directory. An ``evse`` command run as root against that directory
(``evse config set`` before the first start, ``evse queue``, ``evse run`` by
hand) would otherwise create root-owned files there (the SQLite file, its
-wal and -shm, the lock file) that the station cannot write, and it would
not start. ``run_as_owner_of`` makes such a command the directory's owner
before it creates anything: the same user, groups and umask as the unit.
"""

from __future__ import annotations

import os
import pwd

#: The unit's UMask=: files the station makes are for its user and group only.
STATION_UMASK = 0o007


class PrivilegeError(Exception):
    """Root could not become the data directory's owner (the line says who and why)."""


def owner_of(data_dir: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(uid, gid) to work as on ``data_dir``, or None to stay who we are.

    None unless we are root and the directory exists and belongs to another
    user: a non-root caller cannot change user, and a root-owned (or missing)
    directory is not a station's.
    """
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(data_dir)
    except FileNotFoundError:
        return None
    if st.st_uid == 0:
        return None
    return st.st_uid, st.st_gid


def run_as_owner_of(data_dir: str | os.PathLike[str]) -> bool:
    """Become the owner of ``data_dir`` when root and it is someone else's; True if so.

    Call before any file in ``data_dir`` is opened. Irreversible for the
    process (setgroups, setgid, then setuid): the command goes on as the
    station's user, with that user's groups (dialout for the serial ports) and
    the unit's umask, so what it creates is as if the station had.
    """
    owner = owner_of(data_dir)
    if owner is None:
        return False
    uid, gid = owner
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A uid with no name (a copied disk, a throw-away root): its own group only.
        name, groups = f"uid {uid}", [gid]
    else:
        name, gid = entry.pw_name, entry.pw_gid
        groups = os.getgrouplist(entry.pw_name, gid)
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(
            f"{os.fspath(data_dir)} belongs to {name}; cannot become {name} ({exc.strerror or exc})"
        ) from None
    os.umask(STATION_UMASK)
    return True
