"""Child process for the kill -9 test in test_local_auth.py.

``python local_list_crash_child.py DB``: opens the local list (the message
limit widened to 50, so one Full update carries the whole list), then sends
Full updates k = v + 1, v + 2, ... of 50 entries each until killed, v being
the version the file held (so versions keep rising over runs on one file).
Update k is ``full_list(k)``: consecutive lists share most of their id tags but every
entry carries k (its parentIdTag, its expiry, its status), so a list made of
parts of two updates, or a partial one, matches no ``full_list``. A line
``sent <k>`` is printed and flushed only after ``send_local_list`` returned
Accepted; the first line, ``ready <v>``, after the file was opened.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from ocpp16.local_auth import (
    AuthorizationData,
    AuthorizationStatus,
    IdTagInfo,
    LocalAuth,
    UpdateStatus,
    UpdateType,
)

BASE = datetime(2027, 1, 1, tzinfo=UTC)
ENTRIES = 50
IDS = 80  # the id tags the lists draw from; list k starts 7 k further round
LIMIT = 1_000_000  # never reached: the parent kills the child long before
_STATUSES = tuple(AuthorizationStatus)


def full_list(k: int) -> list[AuthorizationData]:
    """Update k: 50 entries, each marked with k."""
    return [
        AuthorizationData(
            f"T{(7 * k + i) % IDS:02d}",
            IdTagInfo(
                _STATUSES[(k + i) % len(_STATUSES)],
                BASE + timedelta(days=k, seconds=i),
                f"V{k}",
            ),
        )
        for i in range(ENTRIES)
    ]


def main(path: str) -> None:
    auth = LocalAuth.open(path, send_max_length=ENTRIES)
    start = auth.get_local_list_version()
    print(f"ready {start}", flush=True)
    for k in range(start + 1, LIMIT):
        status = auth.send_local_list(k, UpdateType.FULL, full_list(k))
        if status is not UpdateStatus.ACCEPTED:
            print(f"refused {k} {status}", flush=True)
            sys.exit(1)
        print(f"sent {k}", flush=True)
    auth.close()


if __name__ == "__main__":
    main(sys.argv[1])
