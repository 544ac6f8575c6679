"""The evse package's one family of errors.

Library errors (sqlite3, ...) are translated where they enter evse/, so the
station code catches ``EvseError`` and never a library's own exception.
Append new classes at the end; each says in one line what went wrong.
"""

from __future__ import annotations

import os
from typing import TypeVar


class EvseError(Exception):
    """Base of every error raised by evse/."""


class StoreError(EvseError):
    """The station's store refused an operation or its SQLite file failed.

    ``path`` is the database file (or the missing directory), so a one-line
    message tells an installer which file is at fault.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] = "") -> None:
        self.message = message
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class IllegalTransition(EvseError):
    """A connector got an event its current state does not accept.

    Names both, so the log says exactly which transition the table lacks.
    """

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"{event} is not accepted in state {state}")


class HardwareUnavailable(EvseError):
    """A device (board or meter) did not answer at start: the station does not run.

    ``device`` is "board" or "meter"; the message names its port and unit.
    """

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")


class InvariantBroken(EvseError):
    """A request failed after it had changed the station's state: its effects are
    half done, so the station stops (and switches off) rather than go on."""


_E = TypeVar("_E", bound=BaseException)


def find_in_group(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` inside ``exc``, which may be a (nested) exception group:
    what a nursery raised, looked into by whoever reports it in one line."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, kind)
            if found is not None:
                return found
    return None
