"""Who may change what on the installer's page: the password, sessions, CSRF, rate limit.

Theory of operation
-------------------
* The installer password is kept as a salted scrypt hash (RFC 7914) in
  ``<data_dir>/web-password``, a small JSON file, mode 0600, written
  atomically (temporary file, fsync, rename), with its cost parameters stored
  beside the hash so that a stronger default later still verifies old files.
  It is never in the TOML file. No file: nobody can log in.
* Every visitor has a session: a signed cookie ``v1.<payload>.<mac>`` where the
  payload is ``{"sid", "role", "exp"}`` and the MAC is HMAC-SHA256 with a
  random secret kept in ``<data_dir>/web-secret`` (0600, made once). The
  expiry is inside the signed value, so the server checks it whatever the
  browser keeps. A viewer's session exists only to tie the login form's CSRF
  token to something; logging in makes a new session id (no fixation).
* The CSRF token of a session is HMAC(secret, "csrf" + sid): every POST must
  carry it, so another site cannot submit our forms with the installer's
  cookie (SameSite=Strict is the second fence).
* Failed logins are counted per client address in a sliding window
  (``LoginLimiter``, sans-I/O: time is an argument, trio's clock in the app).
  An attempt counts as failed from the moment it starts until the password is
  found right, so a burst of parallel guesses cannot slip past the limit
  while scrypt runs.

Session expiry is wall time (``time.time``): the cookie outlives the process
and is judged against the browser's notion of Max-Age, which is wall time.
The rate limit's window is trio's clock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ops.web.errors import PasswordFileError, PasswordRejected

log = logging.getLogger(__name__)

#: Security events (failed logins, lockouts) go to this logger at WARNING.
security_log = logging.getLogger("evse.security")

PASSWORD_FILE: Final = "web-password"  # noqa: S105 -- a file name
SECRET_FILE: Final = "web-secret"  # noqa: S105 -- a file name, not a secret

#: scrypt cost (RFC 7914): n=2**14, r=8, p=1 is the interactive-login figure of
#: the RFC and of OWASP; about 16 MiB and a few tens of ms per check.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
HASH_BYTES: Final = 32
SALT_BYTES: Final = 16
#: Bounds for parameters read from a file: a tampered file must not make one
#: login take gigabytes or minutes.
MAX_N: Final = 2**20
MAX_R: Final = 32
MAX_P: Final = 16

MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 1024

Role = Literal["viewer", "installer"]


# --- files in the data directory ------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (``mode``, 0600 unless told), owned like
    its directory.

    Run as root against a data directory the station's user owns (``evse
    passwd`` by an installer), the file is given to the directory's owner, or
    the station could not read it.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask must not narrow a public file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _own_like_directory(tmp, directory)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def _own_like_directory(path: Path, directory: Path) -> None:
    if os.geteuid() != 0:
        return
    st = directory.stat()
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, st.st_uid, st.st_gid)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the installer password -------------------------------------------------------


def _check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise PasswordRejected(f"the password is too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PasswordRejected(f"the password is too long: at most {MAX_PASSWORD} characters")
    if not password.isprintable():
        raise PasswordRejected("the password contains a control or unprintable character")


def _scrypt(password: str, salt: bytes, *, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL refuses more than maxmem (32 MiB by default); allow what n and r need.
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=256 * n * r + 2**20
    )


#: glibc's mallopt(M_MMAP_THRESHOLD): allocations of this size or more are
#: mapped and unmapped on their own.
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD: Final = 8 * 2**20


def _give_back_memory() -> None:
    """Make scrypt's 16 MiB work area go back to the system after each check.

    glibc raises its mmap threshold when the first large mapped block is freed,
    so every later work area comes from the heap and stays resident: 16 MiB
    more RSS for the life of the station after one login (measured; malloc_trim
    does not return it). Pinning the threshold at 8 MiB keeps such blocks
    mapped; it only concerns allocations that large, which this process makes
    for scrypt alone. Without glibc there is nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def set_password(data_dir: Path, password: str) -> None:
    """Set the installer password: a salted scrypt hash in ``<data_dir>/web-password``.

    Raises ``PasswordRejected`` for a password that is too short (fewer than 8
    characters), too long or unprintable, ``PasswordFileError`` when the file
    cannot be written.
    """
    _check_new_password(password)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES)
    _give_back_memory()
    record = {
        "scheme": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": _b64(salt),
        "hash": _b64(digest),
    }
    path = Path(data_dir) / PASSWORD_FILE
    try:
        write_atomic(path, (json.dumps(record) + "\n").encode("ascii"))
    except OSError as exc:
        raise PasswordFileError(
            f"{path}: cannot write the password: {exc.strerror or exc}"
        ) from None
    log.info("installer password set (%s)", path)


def password_is_set(data_dir: Path) -> bool:
    return (Path(data_dir) / PASSWORD_FILE).is_file()


@dataclass(frozen=True)
class _Hash:
    salt: bytes
    digest: bytes
    n: int
    r: int
    p: int


def _read_hash(path: Path) -> _Hash | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PasswordFileError(
            f"{path}: cannot read the password: {exc.strerror or exc}"
        ) from None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("scheme") != "scrypt":
            raise ValueError("not an scrypt record")
        n, r, p = record["n"], record["r"], record["p"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
            raise ValueError("parameters are not whole numbers")
        if not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
            raise ValueError(f"parameters n={n} r={r} p={p} out of bounds")
        salt, digest = _unb64(record["salt"]), _unb64(record["hash"])
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError("salt or hash too short")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise PasswordFileError(f"{path}: damaged ({exc}); set the password again") from None
    return _Hash(salt, digest, n, r, p)


def check_password(data_dir: Path, password: str) -> bool:
    """Whether ``password`` is the installer password; False when none is set.

    Blocking (scrypt, a file read): run it in a worker thread from trio.
    ``PasswordFileError`` when the file is unreadable or damaged.
    """
    stored = _read_hash(Path(data_dir) / PASSWORD_FILE)
    if stored is None or len(password) > MAX_PASSWORD:
        return False
    digest = _scrypt(
        password, stored.salt, n=stored.n, r=stored.r, p=stored.p, dklen=len(stored.digest)
    )
    _give_back_memory()
    return hmac.compare_digest(digest, stored.digest)


def load_secret(data_dir: Path) -> bytes:
    """The session-signing secret of this station, made on first use (0600).

    Two processes making it at once agree on one: it is linked into place,
    which fails if the other was first, and the loser reads the winner's.
    """
    path = Path(data_dir) / SECRET_FILE
    try:
        try:
            return _parse_secret(path, path.read_text(encoding="ascii"))
        except FileNotFoundError:
            pass
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _own_like_directory(tmp, path.parent)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
        _fsync_dir(path.parent)
        return _parse_secret(path, path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PasswordFileError(f"{path}: cannot use the session secret: {reason}") from None


def _parse_secret(path: Path, text: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise PasswordFileError(f"{path}: damaged session secret; delete it to make a new one")
    return secret


# --- sessions and CSRF ------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    sid: str
    role: Role
    #: Wall-clock time (seconds since the epoch) after which the session is void.
    expires: int

    @property
    def installer(self) -> bool:
        return self.role == "installer"


class Sessions:
    """Signed session cookies (HMAC-SHA256) with expiry, CSRF tokens, logout.

    A logged-out session id is remembered until its expiry (bounded), so a
    copied cookie does not outlive a logout.
    """

    MAX_REVOKED: Final = 10_000

    def __init__(
        self, secret: bytes, lifetime: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        if lifetime <= 0:
            raise ValueError(f"session lifetime must be positive, not {lifetime}")
        self._secret = secret
        self.lifetime = lifetime
        self._clock = clock
        self._revoked: dict[str, int] = {}

    def new(self, role: Role) -> Session:
        return Session(secrets.token_urlsafe(18), role, int(self._clock() + self.lifetime))

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._secret, purpose + b"\0" + data, hashlib.sha256).digest()

    def encode(self, session: Session) -> str:
        payload = json.dumps(
            {"sid": session.sid, "role": session.role, "exp": session.expires},
            separators=(",", ":"),
        ).encode("ascii")
        body = _b64(payload)
        return f"v1.{body}.{_b64(self._mac(b'session', body.encode('ascii')))}"

    def decode(self, value: str) -> Session | None:
        """The session of a cookie value; None if forged, malformed, expired or logged out."""
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != "v1" or len(value) > 512:
            return None
        body, mac = parts[1], parts[2]
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(b"session", body.encode("ascii"))):
                return None
            data: Any = json.loads(_unb64(body))
        except (ValueError, UnicodeError, binascii.Error):
            return None
        if not isinstance(data, dict):
            return None
        sid, role, exp = data.get("sid"), data.get("role"), data.get("exp")
        if not isinstance(sid, str) or role not in ("viewer", "installer"):
            return None
        if not isinstance(exp, int) or isinstance(exp, bool) or exp <= self._clock():
            return None
        if sid in self._revoked:
            return None
        return Session(sid, role, exp)

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.sid.encode("ascii")))

    def check_csrf(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(
            token.encode("ascii", "replace"), self.csrf_token(session).encode()
        )

    def revoke(self, session: Session) -> None:
        now = self._clock()
        if len(self._revoked) >= self.MAX_REVOKED:
            self._revoked = {s: e for s, e in self._revoked.items() if e > now}
            while len(self._revoked) >= self.MAX_REVOKED:
                # Still full of live ones: forget the soonest to expire.
                del self._revoked[min(self._revoked, key=self._revoked.__getitem__)]
        self._revoked[session.sid] = session.expires


# --- failed-login rate limit ------------------------------------------------------


class LoginLimiter:
    """At most ``max_failures`` failed logins per client in any ``window`` seconds.

    Sans-I/O: every call takes ``now`` (trio's clock in the app). After the
    limit is reached the client is locked out until its oldest counted failure
    leaves the window. ``max_clients`` bounds the memory an attacker spraying
    addresses can make us use: the least recently failing clients are forgotten.
    """

    def __init__(
        self, max_failures: int = 5, window: float = 300.0, *, max_clients: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def locked_for(self, client: str, now: float) -> float:
        """Seconds until ``client`` may try again; 0 if it may now."""
        times = self._recent(client, now)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return times[-self.max_failures] + self.window - now

    def failures(self, client: str, now: float) -> int:
        times = self._recent(client, now)
        return 0 if times is None else len(times)

    def attempt(self, client: str, now: float) -> None:
        """Count an attempt as failed from its start (``succeeded`` takes it back)."""
        times = self._failures.pop(client, None)
        if times is None:
            if len(self._failures) >= self.max_clients:
                del self._failures[next(iter(self._failures))]
            times = deque(maxlen=self.max_failures)
        times.append(now)
        self._failures[client] = times  # re-inserted: most recent last

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
