"""Errors of the ops package that are not the config file's (``ops.config.ConfigError``).

Raised where operators' work fails: building, verifying and installing a
release image (``ops.release``). Each carries what an operator needs to act
on it in one line: the file or release, and the reason.
"""

from __future__ import annotations


class OpsError(Exception):
    """Base of the errors of ops/ outside the config file's."""


class ReleaseError(OpsError):
    """A release image or an installed release is refused or failed: ``what``
    names the image, file or version, ``reason`` says why."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")
