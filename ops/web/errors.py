"""The ops.web package's one family of errors.

Library errors (OSError from the data directory, ssl and bind errors from
hypercorn, cryptography's parse errors, malformed forms) are translated where
they enter ops/web/, so the app answers a clear status and message and a
caller outside (``evse passwd``, ``evse run``) catches ``WebError`` alone.
"""

from __future__ import annotations


class WebError(Exception):
    """Base of every error raised by ops/web/."""


class HTTPError(WebError):
    """A request the app answers with ``status`` and ``message`` (never a traceback)."""

    def __init__(self, status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class PasswordRejected(WebError):
    """``set_password`` refused the new password (too short, too long, unprintable)."""


class PasswordFileError(WebError):
    """The installer password file, or the session secret, cannot be read or written."""


class CertificateRefused(WebError):
    """An uploaded certificate is not a usable central-system root certificate."""


class WebServerError(WebError):
    """The web server cannot serve: the address cannot be bound, the TLS files fail."""
