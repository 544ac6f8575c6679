"""Release images, and the A/B install with trial and rollback (issue 10).

An image is what a firmware update carries (OCPP 1.6 UpdateFirmware's
location, Security Whitepaper ed. 3 L01 SignedUpdateFirmware): one tar file
``evse-<version>.tar`` holding

    manifest.json                  version, Python, platform, sha256 and size of every member
    evse_firmware-<version>-*.whl  the firmware
    <dependency>-*.whl             every runtime dependency, at its constraints.txt pin

and, beside it when it was signed, ``evse-<version>.tar.sig``: the Base64
signature (RSA-PSS or ECDSA P-256, SHA-256 over the whole tar file, as the
whitepaper's SignedUpdateFirmware carries it). The manifest's hashes find a
damaged or truncated image; only the signature protects it from someone
who can rewrite the manifest too.

Installed releases live side by side under a root (``/opt/evse`` in the
layout ``evse install`` makes)::

    releases/<version>/            a venv installed offline from one image's wheels
    current -> releases/<version>  what the unit runs (/opt/evse/current/bin/evse)
    previous -> releases/<version> what a rollback goes back to
    trial.json                     the release on trial (switched to, not yet confirmed)
    report.json                    what to report after the restart, until delivered

At most the current and the previous release are kept. A release is switched
to only once its venv passed the self-check (its own ``evse --version``
prints its version); ``current`` is replaced atomically (a new symlink and
rename(2)), so a power cut leaves the old link or the new one. A switch with
a trial must be confirmed (the station reached its goal: BootNotification
Accepted, or a healthy station loop without a central system) within the
trial time and ``max_starts`` starts; otherwise the next start (or a
``check_trial`` at the deadline) switches back and leaves a report for the
previous release to send after its restart (FirmwareStatusNotification
InstallationFailed and a security event, OCPP 1.6 Security Whitepaper
ed. 3 L01.FR.29 ff.).

Everything here is blocking (pip, venv, file I/O): the station runs
``install`` in a worker thread. ``at_start``, ``confirm`` and the reports are
small file operations under a short lock. This module imports only the
standard library at the top, so that the unit's ExecStartPre (``python -m
ops.release at-start``) costs an interpreter start and no more; it depends
on nothing a broken station module could take with it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from ops.errors import ReleaseError

if TYPE_CHECKING:
    import tarfile

#: tarfile, zipfile and sysconfig are imported where images are built or read,
#: not with this module: the station imports it at every start (its trial
#: bookkeeping) and must not carry them (issue 7, resident memory).
_LAZY = ("tarfile", "zipfile", "sysconfig")

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

DISTRIBUTION = "evse-firmware"
MANIFEST = "manifest.json"
#: The manifest's own format: a newer one is refused, not half understood.
FORMAT = 1
#: Written into a release's venv last: a directory without it is an install
#: that did not finish (crash, power cut) and is never switched to.
MARKER = ".evse-release.json"
#: The default releases root on a gateway (ops/install.py's PREFIX).
DEFAULT_ROOT = Path("/opt/evse")
SIGNATURE_SUFFIX = ".sig"
#: A version must be usable as one directory name, whatever the manifest says.
VERSION_RE = re.compile(r"[0-9][0-9A-Za-z.+!_-]{0,63}")
#: A member is one plain file name at the top of the archive.
MEMBER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,200}")
MANIFEST_MAX = 1 << 20
#: pip and venv steps: far beyond what they take (seconds), so that a hung
#: child does not hang a firmware update forever.
PIP_TIMEOUT = 900.0
CHECK_TIMEOUT = 120.0
CHUNK = 1 << 16

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- the manifest -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an image says it holds."""

    version: str
    #: ``major.minor`` of the interpreter the wheels were built for.
    python: str
    #: ``sysconfig.get_platform()`` of the build (compiled wheels are for it).
    platform: str
    #: The firmware's own wheel, one of ``members``.
    firmware: str
    members: Mapping[str, Member]
    built: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "name": DISTRIBUTION,
                "version": self.version,
                "python": self.python,
                "platform": self.platform,
                "built": self.built,
                "firmware": self.firmware,
                "members": {
                    name: {"sha256": m.sha256, "size": m.size}
                    for name, m in sorted(self.members.items())
                },
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, data: bytes, what: str) -> Manifest:
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            if raw.get("format") != FORMAT or raw.get("name") != DISTRIBUTION:
                raise ReleaseError(
                    what,
                    f"{MANIFEST} is format {raw.get('format')!r} of {raw.get('name')!r}, "
                    f"not format {FORMAT} of {DISTRIBUTION}",
                )
            members = {
                str(name): Member(str(m["sha256"]).lower(), int(m["size"]))
                for name, m in dict(raw["members"]).items()
            }
            manifest = cls(
                version=str(raw["version"]),
                python=str(raw["python"]),
                platform=str(raw["platform"]),
                firmware=str(raw["firmware"]),
                members=members,
                built=str(raw.get("built", "")),
            )
        except ReleaseError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ReleaseError(what, f"{MANIFEST} is not a valid manifest ({exc})") from None
        if manifest.firmware not in members:
            raise ReleaseError(what, f"{MANIFEST} names firmware {manifest.firmware}, no member")
        if not VERSION_RE.fullmatch(manifest.version):
            raise ReleaseError(what, f"version {manifest.version!r} is not a release version")
        return manifest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _scan(image: Path, into: Path | None = None) -> Manifest:
    """Check every member against the manifest (and extract them into ``into``).

    One pass over the archive: each member is hashed as it is read. A
    member must be a regular file with a plain name (no directories, links
    or paths: nothing can land outside ``into``), listed in the manifest,
    once, with its size and sha256; every listed member must be there.
    """
    import tarfile  # noqa: PLC0415 - see _LAZY

    name = image.name
    seen: dict[str, Member] = {}
    manifest_bytes: bytes | None = None
    try:
        with tarfile.open(image, mode="r:") as tar:
            for info in tar:
                member = info.name
                if not MEMBER_RE.fullmatch(member):
                    raise ReleaseError(f"{name}: {member}", "not a plain file name in the image")
                if not info.isreg():
                    raise ReleaseError(f"{name}: {member}", "not a regular file")
                if member in seen or (member == MANIFEST and manifest_bytes is not None):
                    raise ReleaseError(f"{name}: {member}", "twice in the image")
                source = tar.extractfile(info)
                if source is None:  # pragma: no cover - isreg() above
                    raise ReleaseError(f"{name}: {member}", "cannot be read")
                if member == MANIFEST:
                    if info.size > MANIFEST_MAX:
                        raise ReleaseError(f"{name}: {member}", "too large for a manifest")
                    manifest_bytes = source.read()
                    continue
                digest = hashlib.sha256()
                size = 0
                with contextlib.ExitStack() as stack:
                    out = (
                        stack.enter_context((into / member).open("xb"))
                        if into is not None
                        else None
                    )
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if out is not None:
                            out.write(chunk)
                seen[member] = Member(digest.hexdigest(), size)
    except (tarfile.TarError, EOFError) as exc:
        raise ReleaseError(name, f"not a readable tar archive ({exc})") from None
    if manifest_bytes is None:
        raise ReleaseError(f"{name}: {MANIFEST}", "missing from the image")
    manifest = Manifest.from_json(manifest_bytes, name)
    for member, expected in sorted(manifest.members.items()):
        got = seen.get(member)
        if got is None:
            raise ReleaseError(f"{name}: {member}", "missing from the image")
        if got.size != expected.size:
            raise ReleaseError(
                f"{name}: {member}", f"{got.size} bytes, the manifest says {expected.size}"
            )
        if got.sha256 != expected.sha256:
            raise ReleaseError(
                f"{name}: {member}",
                f"sha256 {got.sha256} does not match the manifest's {expected.sha256}",
            )
    for member in sorted(set(seen) - set(manifest.members)):
        raise ReleaseError(f"{name}: {member}", "not in the manifest")
    return manifest


# --- signatures ---------------------------------------------------------------------


def _digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.digest()


def sign(image: Path, key: Path) -> bytes:
    """The Base64 signature of the whole file: SHA-256, RSA-PSS or ECDSA P-256.

    RSA-PSS with MGF1-SHA-256 and a salt as long as the digest (RFC 8017
    section 9.1's recommendation, and what RFC 8446 section 4.2.3 requires):
    a verifier using PSS.AUTO, OpenSSL's default, or a fixed 32-byte salt
    accepts it. ECDSA: the DER signature (RFC 3279 section 2.2.3), as
    whitepaper signatures are.
    """
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils  # noqa: PLC0415

    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise ReleaseError(str(key), exc.strerror or str(exc)) from None
    except TypeError:
        raise ReleaseError(str(key), "the key is encrypted: give an unencrypted PEM key") from None
    except ValueError as exc:
        raise ReleaseError(str(key), f"not a PEM private key ({exc})") from None
    prehashed = utils.Prehashed(hashes.SHA256())
    digest = _digest(image)
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ReleaseError(str(key), f"RSA key of {private.key_size} bits, fewer than 2048")
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        signature = private.sign(digest, pss, prehashed)
    elif isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
        private.curve, ec.SECP256R1
    ):
        signature = private.sign(digest, ec.ECDSA(prehashed))
    else:
        raise ReleaseError(str(key), "not an RSA or EC P-256 key")
    return base64.b64encode(signature)


def check_signature(
    image: Path, signature: bytes, certificate_pem: bytes, roots: Sequence[bytes] = ()
) -> None:
    """The signature over the whole file matches the certificate's public key.

    With ``roots``, the certificate must also be issued directly by one of
    them and be valid now. The OCPP-facing check (ManufacturerRootCertificate,
    InvalidCertificate vs InvalidSignature) is ocpp16/certificates.py's.
    """
    from cryptography import x509  # noqa: PLC0415
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise ReleaseError("certificate", f"not a PEM certificate ({exc})") from None
    subject = cert.subject.rfc4514_string() or "(no subject)"
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseError(f"{image.name}{SIGNATURE_SUFFIX}", "not Base64") from None
    public: PublicKeyTypes = cert.public_key()
    prehashed = utils.Prehashed(hashes.SHA256())
    digest = _digest(image)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            public.verify(raw, digest, pss, prehashed)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(raw, digest, ec.ECDSA(prehashed))
        else:
            raise ReleaseError(subject, "the certificate's key is not RSA or EC")
    except InvalidSignature:
        raise ReleaseError(
            image.name, f"the signature does not match the key of certificate {subject}"
        ) from None
    if not roots:
        return
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ReleaseError(
            subject,
            f"the certificate is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now",
        )
    for root_pem in roots:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem))
            return
    raise ReleaseError(subject, "the certificate is not issued by any of the given roots")


def verify(
    image: Path,
    *,
    signature: bytes | None = None,
    certificate_pem: bytes | None = None,
    roots: Sequence[bytes] = (),
) -> Manifest:
    """The image's manifest, once every member matched it (and the signature, if given)."""
    if not image.is_file():
        raise ReleaseError(str(image), "no such file")
    if signature is not None:
        if certificate_pem is None:
            raise ReleaseError(image.name, "a signature is checked against a certificate: none")
        check_signature(image, signature, certificate_pem, roots)
    return _scan(image)


# --- building an image --------------------------------------------------------------


def _run(
    argv: Sequence[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = PIP_TIMEOUT,
    cwd: str | None = None,
) -> str:
    """A child process; its failure is a ReleaseError with its last error line."""
    try:
        done = subprocess.run(  # noqa: S603 - argv built here, never a shell
            list(argv),
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=timeout,
            cwd=cwd,
        )
    except OSError as exc:
        raise ReleaseError(what, f"cannot run {argv[0]} ({exc.strerror or exc})") from None
    except subprocess.TimeoutExpired:
        raise ReleaseError(what, f"{argv[0]} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        last = (errors or lines or ["no output"])[-1].strip()
        raise ReleaseError(what, f"{Path(argv[0]).name} exited with {done.returncode}: {last}")
    return done.stdout


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(constraints: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file: canonical name -> version."""
    pins: dict[str, str] = {}
    for raw in constraints.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line):
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def wheel_name_version(wheel: str) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name (PEP 427)."""
    parts = wheel.removesuffix(".whl").split("-")
    if len(parts) < 5:
        raise ReleaseError(wheel, "not a wheel file name")
    return canonical(parts[0]), parts[1]


def wheel_version(wheel: Path) -> str:
    """The Version: of a wheel's METADATA (the one pip installs and reports)."""
    import zipfile  # noqa: PLC0415 - see _LAZY

    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(
                n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            )
            text = zf.read(meta).decode("utf-8")
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError) as exc:
        raise ReleaseError(wheel.name, f"not a readable wheel ({exc!r})") from None
    match = re.search(r"(?m)^Version:\s*(\S+)\s*$", text)
    if match is None:
        raise ReleaseError(wheel.name, "its METADATA has no Version")
    return match.group(1)


def _pip_index(wheelhouse: Path | None) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse is not None else []


def build_wheels(
    source: str,
    dest: Path,
    constraints: Path,
    *,
    python: str | None = None,
    wheelhouse: Path | None = None,
) -> Path:
    """The firmware's wheel from ``source`` (a source tree, a wheel or a
    requirement) and the wheels of its runtime dependencies at their pins,
    all in ``dest``; the firmware wheel's path.

    ``python`` runs pip (default: this interpreter): compiled wheels are for
    its version and platform. With ``wheelhouse``, offline: nothing but the
    wheels (and, to build a source tree, setuptools) found there.
    """
    pip = [python or sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    index = _pip_index(wheelhouse)
    firmware_dir = dest.parent / f".{dest.name}-firmware"
    shutil.rmtree(firmware_dir, ignore_errors=True)
    try:
        _run(
            [
                *pip,
                "wheel",
                "--quiet",
                "--no-deps",
                *index,
                "--wheel-dir",
                str(firmware_dir),
                source,
            ],
            "firmware wheel",
        )
        built = sorted(firmware_dir.glob("evse_firmware-*.whl"))
        if len(built) != 1:
            raise ReleaseError("firmware wheel", f"pip made {len(built)} evse_firmware wheels")
        dest.mkdir(parents=True, exist_ok=True)
        firmware = dest / built[0].name
        shutil.copyfile(built[0], firmware)
    finally:
        shutil.rmtree(firmware_dir, ignore_errors=True)
    # The runtime closure of the firmware's own dependencies (pyproject's
    # [project] dependencies, no extras), each at its constraints.txt pin.
    _run(
        [
            *(*pip, "wheel", "--quiet", "-c", str(constraints), *index),
            *("--wheel-dir", str(dest), str(firmware)),
        ],
        "dependency wheels",
    )
    pins = read_pins(constraints)
    for wheel in sorted(dest.glob("*.whl")):
        if wheel == firmware:
            continue
        name, version = wheel_name_version(wheel.name)
        if pins.get(name) != version:
            # A dependency the image would carry at a version nobody chose.
            raise ReleaseError(
                str(constraints), f"{wheel.name} is needed at run time and not pinned there"
            )
    return firmware


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def pack(wheels: Path, out_dir: Path, firmware: Path, *, python: str | None = None) -> Path:
    """``evse-<version>.tar`` in ``out_dir`` from the wheels in ``wheels``.

    ``python``: the interpreter whose pip built the wheels (default this
    one): its version and platform go into the manifest. Uncompressed:
    wheels are zip files already. Written under a temporary name and
    renamed, so an image of that name is always whole.
    """
    import sysconfig  # noqa: PLC0415 - see _LAZY
    import tarfile  # noqa: PLC0415

    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    platform = sysconfig.get_platform()
    if python is not None:
        python_version, platform = _run(
            [python, "-c", _ABOUT_PYTHON], f"python {python}", timeout=CHECK_TIMEOUT
        ).split()
    version = wheel_version(firmware)
    if not VERSION_RE.fullmatch(version):
        raise ReleaseError(firmware.name, f"version {version!r} is not a release version")
    members = {
        wheel.name: Member(_sha256_file(wheel), wheel.stat().st_size)
        for wheel in sorted(wheels.glob("*.whl"))
    }
    manifest = Manifest(
        version=version,
        python=python_version,
        platform=platform,
        firmware=firmware.name,
        members=members,
        built=_now_iso(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / f"evse-{version}.tar"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{image.name}.")
    os.close(fd)
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = manifest.to_json().encode()
            tar.addfile(_tarinfo(MANIFEST, len(data)), io.BytesIO(data))
            for name, member in members.items():
                with (wheels / name).open("rb") as f:
                    tar.addfile(_tarinfo(name, member.size), f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, image)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return image


_ABOUT_PYTHON = (
    "import sys, sysconfig; print('%d.%d' % sys.version_info[:2], sysconfig.get_platform())"
)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    import tarfile  # noqa: PLC0415 - see _LAZY

    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    return info


def _set_version_suffix(tree: Path, suffix: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9.+_-]{1,32}", suffix):
        raise ReleaseError(f"version suffix {suffix!r}", "letters, digits and .+_- only")
    project = tree / "pyproject.toml"
    text = project.read_text(encoding="utf-8")
    new, count = re.subn(
        r'(?m)^(version\s*=\s*")([^"]+)(")', rf"\g<1>\g<2>{suffix}\g<3>", text, count=1
    )
    if count != 1:
        raise ReleaseError(str(project), "has no version line to add a suffix to")
    project.write_text(new, encoding="utf-8")


def build(
    checkout: Path,
    out_dir: Path,
    *,
    signing_key: Path | None = None,
    wheelhouse: Path | None = None,
    version_suffix: str | None = None,
    say: Say = _quiet,
) -> Path:
    """The image of a checkout (pinned by its constraints.txt); with a key, signed.

    Built from a copy of the tree (no build/ or *.egg-info left in the
    checkout). ``version_suffix`` is appended to pyproject's version in that
    copy (``.post1``, ``+lab2``): a second release from the same tree.
    """
    from ops.install import SOURCE_IGNORE  # noqa: PLC0415 - only a build needs it

    constraints = checkout / "constraints.txt"
    if not (checkout / "pyproject.toml").is_file() or not constraints.is_file():
        raise ReleaseError(str(checkout), "not a checkout: no pyproject.toml and constraints.txt")
    with tempfile.TemporaryDirectory(prefix="evse-release-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(checkout, tree, ignore=SOURCE_IGNORE, symlinks=True)
        if version_suffix:
            _set_version_suffix(tree, version_suffix)
        where = f"offline from {wheelhouse}" if wheelhouse else "pip"
        say(f"wheels: the firmware and its pinned dependencies ({where})")
        wheels = Path(tmp) / "wheels"
        firmware = build_wheels(str(tree), wheels, constraints, wheelhouse=wheelhouse)
        image = pack(wheels, out_dir, firmware)
    if signing_key is not None:
        write_signature(image, sign(image, signing_key))
    return image


def write_signature(image: Path, signature: bytes) -> Path:
    path = image.with_name(image.name + SIGNATURE_SUFFIX)
    _write_bytes(path, signature + b"\n", 0o644)
    return path


def _write_bytes(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """A whole file, durably: a temporary file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- installed releases -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartReport:
    """What the station reports after a start (and keeps reporting until
    ``Releases.report_delivered``).

    ``installed``: the release that reached its trial's goal (FirmwareStatus
    Installed). ``rolled_back``: (from, to, reason): the release that failed
    its trial, the one running again, and why (InstallationFailed, a
    security event). ``on_trial``: the release running on trial now (the
    station confirms it once it reaches its goal). ``restart``: this very
    call switched back: the process runs the failed release's code and must
    exit with a code the unit restarts on (EXIT_FAILURE), so that the
    previous release runs; not re-exec, which would start the same code.
    """

    installed: str | None = None
    rolled_back: tuple[str, str, str] | None = None
    on_trial: str | None = None
    restart: bool = False

    @property
    def pending(self) -> bool:
        """There is something to report."""
        return self.installed is not None or self.rolled_back is not None


@dataclass(slots=True)
class Trial:
    """The trial record (trial.json)."""

    version: str
    previous: str | None
    #: Wall-clock UTC, seconds since the epoch: trio's clock (and the
    #: monotonic clock under it) starts anew with every process and every
    #: boot, and a trial spans restarts, so only the wall clock carries a
    #: deadline across them. It can jump: see ``Releases._expired``.
    deadline: float
    switched_at: float
    seconds: float
    max_starts: int
    starts: int = 0
    #: systemd's $INVOCATION_ID of the last counted start: the unit's
    #: ExecStartPre and the station in the same start count it once.
    invocation: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "previous": self.previous,
                "deadline": self.deadline,
                "deadline_utc": _iso(self.deadline),
                "switched_at": self.switched_at,
                "seconds": self.seconds,
                "max_starts": self.max_starts,
                "starts": self.starts,
                "invocation": self.invocation,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Trial:
        raw = json.loads(data)
        return cls(
            version=str(raw["version"]),
            previous=None if raw.get("previous") is None else str(raw["previous"]),
            deadline=float(raw["deadline"]),
            switched_at=float(raw["switched_at"]),
            seconds=float(raw["seconds"]),
            max_starts=int(raw["max_starts"]),
            starts=int(raw.get("starts", 0)),
            invocation=raw.get("invocation"),
        )


@dataclass(frozen=True, slots=True)
class Installed:
    """One installed release, for ``evse release list``."""

    version: str
    installed_at: str
    current: bool
    previous: bool
    manifest: Mapping[str, Any] = field(default_factory=dict)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _python_env() -> dict[str, str]:
    """The environment of pip and the self-check: this machine's pip settings
    (index, find-links, constraints) and Python path variables left out, so an
    install takes the image's wheels and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip: no configuration file at all
    env["PYTHONNOUSERSITE"] = "1"
    return env


def venv_python(venv: Path) -> str | None:
    """The interpreter a venv was made from, from its pyvenv.cfg."""
    try:
        text = (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    except OSError:
        return None
    cfg = dict(re.findall(r"(?m)^\s*(\w+)\s*=\s*(.*?)\s*$", text))
    for candidate in (cfg.get("executable"), cfg.get("home") and f"{cfg['home']}/python3"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def relocate(venv: Path, final: str) -> None:
    """A venv's scripts and pyvenv.cfg name ``final`` instead of where it was made."""
    old = str(venv).encode()
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        # The #! line, or pip's /bin/sh wrapper for a #! longer than the
        # kernel takes (127 bytes), and the activate scripts.
        if old in data:
            script.write_bytes(data.replace(old, final.encode()))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text(encoding="utf-8").replace(str(venv), final), encoding="utf-8")


_T = TypeVar("_T")


class Releases:
    """The releases under ``root``: install, switch, trial, rollback.

    ``python``: the interpreter new venvs are made from (default: the
    current release's, else Debian's /usr/bin/python3, else this one's
    base). ``runs_at``: where ``root`` will be once the tree it is in is the
    root file system (``evse install --root``): the venvs' scripts name that
    path. ``owner``: (uid, gid) given to what is written here (default, when
    run as root: the owner of ``root``, the station's user in the layout
    ``evse install`` makes). ``now``: the wall clock (seconds since the
    epoch) the trial deadlines are in.
    """

    def __init__(
        self,
        root: Path,
        *,
        python: str | None = None,
        runs_at: PurePosixPath | None = None,
        owner: tuple[int, int] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.releases = root / "releases"
        self._current = root / "current"
        self._previous = root / "previous"
        self._trial = root / "trial.json"
        self._report = root / "report.json"
        self._python = python
        self._runs_at = runs_at
        self._owner = owner
        self._now = now

    # --- reading ------------------------------------------------------------------

    def _link(self, link: Path) -> str | None:
        try:
            target = PurePosixPath(os.readlink(link))
        except OSError:
            return None
        return target.name or None

    def current(self) -> str | None:
        """The release ``current`` points at (what the unit starts)."""
        return self._link(self._current)

    def previous(self) -> str | None:
        """The release a rollback goes back to, if it is still installed."""
        previous = self._link(self._previous)
        if previous is None or previous == self.current() or not self._complete(previous):
            return None
        return previous

    def _complete(self, version: str) -> bool:
        return (self.releases / version / MARKER).is_file()

    def installed(self) -> list[Installed]:
        """The complete releases, oldest install first."""
        current, previous = self.current(), self.previous()
        found: list[Installed] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in self.releases.iterdir():
                if entry.name.startswith(".") or not self._complete(entry.name):
                    continue
                try:
                    marker = json.loads((entry / MARKER).read_bytes())
                except (OSError, ValueError):
                    continue
                found.append(
                    Installed(
                        version=entry.name,
                        installed_at=str(marker.get("installed_at", "")),
                        current=entry.name == current,
                        previous=entry.name == previous,
                        manifest=marker.get("manifest", {}),
                    )
                )
        return sorted(found, key=lambda r: (r.installed_at, r.version))

    def trial(self) -> Trial | None:
        """The trial running now, if any (its deadline: when to ``check_trial``)."""
        try:
            return Trial.from_json(self._trial.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # A record that cannot be read is no trial: the release that
            # runs is kept rather than switched on a guess.
            return None

    def pending_report(self) -> StartReport:
        """What is to be reported (confirmed install, rollback), without side effects."""
        try:
            raw = json.loads(self._report.read_bytes())
        except (OSError, ValueError):
            return StartReport()
        rolled = raw.get("rolled_back")
        return StartReport(
            installed=raw.get("installed"),
            rolled_back=(str(rolled[0]), str(rolled[1]), str(rolled[2])) if rolled else None,
        )

    # --- locks and writes -----------------------------------------------------------

    def _owner_ids(self) -> tuple[int, int] | None:
        if self._owner is not None:
            return self._owner
        if os.geteuid() != 0:
            return None  # what this user writes is its own
        try:
            st = self.root.stat()
        except OSError:
            return None
        return None if (st.st_uid, st.st_gid) == (0, 0) else (st.st_uid, st.st_gid)

    @contextlib.contextmanager
    def _lock(self, name: str, *, wait: bool = True) -> Iterator[None]:
        """flock(2) on a file in the root; held by the process, gone with it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / name
        # Read-only is enough for flock and works on a file another user made.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            owner = self._owner_ids()
            if owner is not None:
                with contextlib.suppress(OSError):
                    os.fchown(fd, *owner)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise ReleaseError(str(self.root), "another install is running") from None
            yield
        finally:
            os.close(fd)

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock(".state.lock"):
            return fn()

    def _write(self, path: Path, data: bytes) -> None:
        _write_bytes(path, data, 0o644, self._owner_ids())

    def _set_link(self, link: Path, version: str) -> None:
        """``link`` -> releases/<version>, replaced atomically (symlink + rename)."""
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Relative: the same link is right in a tree built under --root and
        # once that tree is the root file system.
        os.symlink(f"releases/{version}", tmp)
        owner = self._owner_ids()
        if owner is not None:
            os.lchown(tmp, *owner)
        os.replace(tmp, link)
        _fsync_dir(link.parent)

    def _write_report(self, report: StartReport) -> None:
        data: dict[str, Any] = {"at": _iso(self._now())}
        if report.installed is not None:
            data["installed"] = report.installed
        if report.rolled_back is not None:
            data["rolled_back"] = list(report.rolled_back)
        self._write(self._report, json.dumps(data, indent=2).encode())

    def _drop_trial(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._trial.unlink()
            _fsync_dir(self.root)

    # --- install ----------------------------------------------------------------------

    def _interpreter(self) -> str:
        if self._python:
            return self._python
        current = self.current()
        if current is not None and (found := venv_python(self.releases / current)):
            return found
        if Path("/usr/bin/python3").exists():
            return "/usr/bin/python3"
        return str(getattr(sys, "_base_executable", sys.executable))

    def install(self, image: Path, *, replace: bool = False, say: Say = _quiet) -> str:
        """Install an image as ``releases/<version>``; its version. Does not switch.

        The manifest is checked while the image is unpacked; the venv is
        made from the image's wheels alone (pip --no-index, no configuration,
        nothing built); the self-check runs the new venv's own ``evse
        --version``. Only then is the release complete; a failed install
        leaves nothing behind, and ``current`` untouched. The current
        release is refused unless ``replace`` (``evse install`` run again
        with the same version: the directory is swapped by two renames).
        """
        with self._lock(".install.lock", wait=False):
            self.releases.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.releases, prefix=".unpack-") as unpack:
                manifest = _scan(image, Path(unpack))
                version = manifest.version
                python = self._interpreter()
                self._check_python(python, manifest, image)
                current = self.current()
                if version == current and not replace:
                    raise ReleaseError(version, "is the current release: nothing to install")
                self._prune(keep={current, self.previous()}, busy=Path(unpack))
                staging = self.releases / f".new-{version}"
                shutil.rmtree(staging, ignore_errors=True)
                try:
                    self._make_venv(python, staging, Path(unpack), version, say)
                    final = self.releases / version
                    runs_at = (
                        str(self._runs_at / "releases" / version) if self._runs_at else str(final)
                    )
                    relocate(staging, runs_at)
                    self._self_check(staging, version, runs_at)
                    marker = {"installed_at": _iso(self._now()), "manifest": json.loads(
                        manifest.to_json()
                    ), "image": image.name}  # fmt: skip
                    (staging / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
                    owner = self._owner_ids()
                    if owner is not None:
                        _chown_tree(staging, owner)
                    self._put_in_place(staging, final)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        say(f"release {version}: installed in {self.releases / version}")
        return version

    def _check_python(self, python: str, manifest: Manifest, image: Path) -> None:
        out = _run(
            [python, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            f"python {python}",
            env=_python_env(),
            timeout=CHECK_TIMEOUT,
        ).strip()
        if out != manifest.python:
            raise ReleaseError(
                image.name, f"built for Python {manifest.python}; {python} is Python {out}"
            )

    def _make_venv(self, python: str, venv: Path, wheels: Path, version: str, say: Say) -> None:
        env = _python_env()
        started = time.monotonic()
        _run([python, "-m", "venv", str(venv)], f"release {version}: venv", env=env)
        _run(
            [
                *(str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"),
                *("--no-input", "install", "--quiet", "--no-cache-dir", "--no-index"),
                *("--only-binary", ":all:", "--find-links", str(wheels)),
                f"{DISTRIBUTION}=={version}",
            ],
            f"release {version}: pip install",
            env=env,
        )
        say(
            f"release {version}: venv from the image's wheels in {time.monotonic() - started:.1f} s"
        )

    def _self_check(self, venv: Path, version: str, runs_at: str) -> None:
        """The new venv's ``evse --version`` prints its version.

        Run by the venv's interpreter (the script's #! names the release's
        final place, where it is not yet); that #! is checked as text.
        """
        script = venv / "bin" / "evse"
        try:
            head = script.read_bytes()[:1024]
        except OSError:
            raise ReleaseError(version, "self-check: the venv has no bin/evse") from None
        if f"{runs_at}/bin/python".encode() not in head or str(venv).encode() in head:
            first = head.split(b"\n", 1)[0]
            raise ReleaseError(version, f"self-check: bin/evse starts with {first!r}")
        out = _run(
            [str(venv / "bin" / "python"), str(script), "--version"],
            f"release {version}: self-check (evse --version)",
            env=_python_env(),
            timeout=CHECK_TIMEOUT,
            cwd="/",
        )
        if out.strip() != f"evse {version}":
            raise ReleaseError(
                version, f"self-check: evse --version printed {out.strip()!r}, not evse {version}"
            )

    def _put_in_place(self, staging: Path, final: Path) -> None:
        if final.exists():
            # The same version again (evse install rerun, or an install that
            # did not finish): the old directory is renamed away first. For
            # the current release, `current` names no directory for the time
            # between the two renames; a running station has its files open.
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_dir(final.parent)

    def _prune(self, keep: set[str | None], busy: Path | None = None) -> list[str]:
        """Remove releases that are neither current nor previous, and leftovers
        of installs that did not finish (but ``busy``, this install's own
        unpack directory); the versions removed. Called with the install
        lock held: no other install's directories are being made."""
        removed: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.releases.iterdir()):
                if entry == busy or (entry.name in keep and not entry.name.startswith(".")):
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                if not entry.name.startswith("."):
                    removed.append(entry.name)
        return removed

    # --- switching, trial, rollback ---------------------------------------------------

    def switch(self, version: str, *, trial: float, max_starts: int = 3) -> None:
        """Make ``version`` current, atomically; the release that was current
        becomes previous. With ``trial`` > 0 seconds it must be confirmed
        within that time and ``max_starts`` starts, or it is rolled back;
        ``trial`` = 0: switched for good (an operator's own choice), and so
        is a switch with no current release (nothing to go back to).
        """
        if trial < 0 or max_starts < 1:
            raise ValueError("trial must be >= 0 seconds and max_starts >= 1")
        if not self._complete(version):
            raise ReleaseError(version, f"not installed in {self.releases}")

        def do() -> None:
            current = self.current()
            if version == current:
                return
            now = self._now()
            if trial > 0 and current is not None and self._complete(current):
                # The record first: a power cut after it and before the link
                # leaves a trial of a release that is not current, which
                # at_start drops; the other order could leave a new release
                # running with no trial to roll it back.
                record = Trial(version, current, now + trial, now, trial, max_starts)
                self._write(self._trial, record.to_json())
            else:
                self._drop_trial()
            if current is not None and self._complete(current):
                self._set_link(self._previous, current)
            self._set_link(self._current, version)

        self._locked(do)
        # Older releases go now, unless an install is running (it prunes
        # itself, and its directories must not be taken from under it).
        with contextlib.suppress(ReleaseError), self._lock(".install.lock", wait=False):
            self._prune(keep={self.current(), self.previous()})

    def _expired(self, trial: Trial) -> str | None:
        """Why the trial has failed, or None while it runs."""
        if trial.starts > trial.max_starts:
            return (
                f"started {trial.starts} times without being confirmed (at most {trial.max_starts})"
            )
        now = self._now()
        if now < trial.switched_at:
            # The wall clock is behind the switch: a gateway without a
            # battery-backed clock booted before NTP set it. Counting from the
            # stale time would stretch the trial until the clock catches up;
            # the trial's time is counted again from now instead. (A clock
            # that jumps forward ends a trial early: a good release rolled
            # back, reported, and installable again; the starts count holds
            # whatever the clock does.)
            trial.switched_at, trial.deadline = now, now + trial.seconds
            self._write(self._trial, trial.to_json())
            return None
        if now >= trial.deadline:
            return f"not confirmed within {trial.seconds:g} s of the switch"
        return None

    def _roll_back(self, failed: str, to: str, reason: str) -> None:
        self._write_report(StartReport(rolled_back=(failed, to, reason)))
        self._set_link(self._current, to)
        # The failed release stays as previous: an operator may go back to
        # it on purpose (evse release rollback), and the next install prunes it.
        self._set_link(self._previous, failed)
        self._drop_trial()

    def _check(self, *, count: bool) -> StartReport:
        trial = self.trial()
        restart = False
        if trial is not None and trial.version != self.current():
            # A switch that did not finish (or a link changed by hand): no trial.
            self._drop_trial()
            trial = None
        if trial is not None:
            if count:
                invocation = os.environ.get("INVOCATION_ID")
                if invocation is None or invocation != trial.invocation:
                    trial.starts += 1
                    trial.invocation = invocation
                    self._write(self._trial, trial.to_json())
            reason = self._expired(trial)
            if reason is not None:
                to = trial.previous if trial.previous and self._complete(trial.previous) else None
                if to is None:
                    # Its previous release was removed by hand: nothing to go
                    # back to, so the trial just ends and the release stays.
                    self._drop_trial()
                else:
                    self._roll_back(trial.version, to, reason)
                    restart = True
                trial = None
        pending = self.pending_report()
        return dataclasses.replace(
            pending, on_trial=trial.version if trial is not None else None, restart=restart
        )

    def at_start(self) -> StartReport:
        """Call at every station start: counts the start of a release on trial
        (once per systemd start: $INVOCATION_ID), switches back when the trial
        failed, and says what to report."""
        if not self.root.is_dir():
            return StartReport()  # not installed in releases (a checkout, a test)
        return self._locked(lambda: self._check(count=True))

    def check_trial(self) -> StartReport:
        """``at_start`` without counting a start: for a task that waits until
        the trial's deadline (``trial().deadline``, wall clock) while the station
        runs and has not confirmed."""
        if not self.root.is_dir():
            return StartReport()
        return self._locked(lambda: self._check(count=False))

    def confirm(self) -> None:
        """The release on trial reached its goal: the trial is over, and
        ``installed`` is reported (once, until ``report_delivered``)."""

        def do() -> None:
            trial = self.trial()
            if trial is None:
                return
            self._drop_trial()
            if trial.version == self.current():
                self._write_report(StartReport(installed=trial.version))

        self._locked(do)

    def rollback(self, reason: str) -> str:
        """Back to the previous release now (the running one stays running
        until restarted); the version now current. Reported like a failed trial."""

        def do() -> str:
            current, previous = self.current(), self.previous()
            if current is None or previous is None:
                raise ReleaseError(str(self.root), "no previous release to go back to")
            self._roll_back(current, previous, reason)
            return previous

        return self._locked(do)

    def report_delivered(self) -> None:
        """The pending report was sent (and answered): it is not reported again."""

        def do() -> None:
            with contextlib.suppress(FileNotFoundError):
                self._report.unlink()
                _fsync_dir(self.root)

        self._locked(do)


def _chown_tree(top: Path, owner: tuple[int, int]) -> None:
    os.chown(top, *owner)
    for base, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            os.chown(Path(base) / name, *owner, follow_symlinks=False)


# --- the command line: evse release ... ------------------------------------------------

RELEASE_HELP = """\
Firmware release images and the releases installed side by side in
/opt/evse/releases, with /opt/evse/current naming the one the unit runs.

  build     an image from this checkout: the firmware's wheel, the wheels
            of its pinned dependencies, a manifest (sha256 of each), one tar
  sign      a Base64 signature (RSA-PSS or ECDSA P-256 over SHA-256) beside it
  verify    check an image's manifest, and its signature against a certificate
  install   install an image as a new release, switch to it on trial
  rollback  switch back to the previous release
  list      the installed releases, the trial, what is still to be reported

examples:
  evse release build --out dist --sign signing-key.pem
  evse release verify dist/evse-0.2.0.tar --certificate signing.pem
  sudo evse release install dist/evse-0.2.0.tar
  sudo evse release rollback
  evse release list

exit codes:
  0  done
  1  refused or failed (one line: the image, member or release, and why)
  2  a bad option"""

BUILD_HELP = """\
Builds evse-<version>.tar from a checkout (default: the one this command
runs from): the firmware's wheel, the wheels of every runtime dependency at
its constraints.txt pin, and manifest.json (version, Python version,
platform, sha256 and size of every member). Compiled wheels are for this
machine's Python and platform. With --sign, evse-<version>.tar.sig too.

examples:
  evse release build
  evse release build --out dist --sign signing-key.pem
  evse release build --wheelhouse /media/usb/wheels --version-suffix .post1

exit codes:
  0  built (the last line names the image)
  1  a step failed (pip, a dependency not pinned, the key)
  2  a bad option"""

SIGN_HELP = """\
Signs an image: SHA-256 over the whole file, RSA-PSS (a key of 2048 bits or
more) or ECDSA P-256 by the key's type, Base64, written to IMAGE.sig (what
SignedUpdateFirmware's signature field carries).

examples:
  evse release sign dist/evse-0.2.0.tar --key signing-key.pem

exit codes:
  0  signed
  1  the key or the image cannot be used
  2  a bad option"""

VERIFY_HELP = """\
Checks every member of an image against its manifest; with --certificate,
also the signature (IMAGE.sig unless --signature), and with --root-cert that
the certificate is issued by one of the roots and valid now.

examples:
  evse release verify dist/evse-0.2.0.tar
  evse release verify dist/evse-0.2.0.tar --certificate signing.pem
  evse release verify evse-0.2.0.tar --certificate cert.pem --root-cert ca.pem

exit codes:
  0  the image is whole (and signed by the certificate's key)
  1  refused: the member, the signature or the certificate, and why
  2  a bad option"""

INSTALL_HELP = """\
Installs an image as a new release beside the current one (a venv made
offline from the image's wheels, checked by its own evse --version), then
switches /opt/evse/current to it on trial and restarts a running station.
Unless the station confirms the new release (it reached its goal) within
--trial seconds and 3 starts, the next start switches back and reports it.

examples:
  sudo evse release install dist/evse-0.2.0.tar
  sudo evse release install evse-0.2.0.tar --certificate signing.pem
  sudo evse release install evse-0.2.0.tar --no-switch
  sudo evse release install evse-0.2.0.tar --root /srv/image/opt/evse --trial 0

exit codes:
  0  installed (and switched)
  1  refused or failed; the current release is untouched
  2  a bad option"""

ROLLBACK_HELP = """\
Switches /opt/evse/current back to the previous release and restarts a
running station; the station reports the rollback after its start.

examples:
  sudo evse release rollback
  sudo evse release rollback --reason "meter readings wrong"

exit codes:
  0  switched back (the line names the release now current)
  1  there is no previous release
  2  a bad option"""

LIST_HELP = """\
The installed releases (current and previous marked), the trial running,
and the report the station has still to send.

examples:
  evse release list
  evse release list --json

exit codes:
  0  listed
  1  the releases root cannot be read
  2  a bad option"""

_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def _root_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"the releases root (default {DEFAULT_ROOT})",
    )


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _running_checkout() -> Path:
    here = Path(__file__).resolve().parent.parent
    project = here / "pyproject.toml"
    if project.is_file() and f'name = "{DISTRIBUTION}"' in project.read_text(encoding="utf-8"):
        return here
    return Path.cwd()


def add_parsers(
    subparsers: argparse._SubParsersAction[_Parser], parents: Sequence[_Parser] = ()
) -> None:
    """``evse release build|sign|verify|install|rollback|list``."""
    release = subparsers.add_parser(
        "release",
        parents=list(parents),
        help="build, sign and verify release images; install them side by side, roll back",
        description=RELEASE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = release.add_subparsers(dest="release_command", required=True, metavar="ACTION")

    def action(name: str, summary: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=list(parents),
            help=summary,
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    b = action("build", "an image from a checkout", BUILD_HELP)
    b.add_argument("--checkout", type=Path, metavar="DIR", help="the source tree")
    b.add_argument("--out", type=Path, default=Path("dist"), metavar="DIR", help="default dist")
    b.add_argument("--sign", type=Path, metavar="KEY", help="sign it with this PEM private key")
    b.add_argument(
        "--wheelhouse", type=Path, metavar="DIR", help="offline: take every wheel from DIR"
    )
    b.add_argument(
        "--version-suffix", metavar="TEXT", help="appended to the version (.post1, +lab2)"
    )

    s = action("sign", "sign an image (IMAGE.sig)", SIGN_HELP)
    s.add_argument("image", type=Path, metavar="IMAGE")
    s.add_argument("--key", type=Path, required=True, metavar="KEY", help="PEM private key")

    v = action("verify", "check an image (and its signature)", VERIFY_HELP)
    v.add_argument("image", type=Path, metavar="IMAGE")
    _signature_options(v)

    i = action("install", "install an image as a new release and switch to it", INSTALL_HELP)
    i.add_argument("image", type=Path, metavar="IMAGE")
    _signature_options(i)
    _root_option(i)
    i.add_argument(
        "--trial",
        type=_non_negative,
        default=600.0,
        metavar="SECONDS",
        help="time the station has to confirm it (default 600; 0: no trial)",
    )
    i.add_argument("--no-switch", action="store_true", help="install only; current stays")
    i.add_argument("--python", metavar="PATH", help="interpreter for the venv")

    r = action("rollback", "switch back to the previous release", ROLLBACK_HELP)
    _root_option(r)
    r.add_argument("--reason", default="rolled back by the operator", help="reported as why")

    li = action("list", "the installed releases", LIST_HELP)
    _root_option(li)
    li.add_argument("--json", action="store_true", help="as JSON")


def _signature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certificate", type=Path, metavar="PEM", help="the signing certificate")
    p.add_argument("--signature", type=Path, metavar="FILE", help="default IMAGE.sig")
    p.add_argument(
        "--root-cert",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="the certificate must be issued by this root (repeatable)",
    )


def _verify_args(args: argparse.Namespace) -> Manifest:
    image: Path = args.image
    if args.certificate is None:
        if args.signature is not None or args.root_cert:
            raise ReleaseError(image.name, "--signature and --root-cert need --certificate")
        return verify(image)
    sig_path: Path = args.signature or image.with_name(image.name + SIGNATURE_SUFFIX)
    try:
        signature = sig_path.read_bytes()
        certificate = args.certificate.read_bytes()
        roots = [p.read_bytes() for p in args.root_cert]
    except OSError as exc:
        raise ReleaseError(str(exc.filename), exc.strerror or str(exc)) from None
    return verify(image, signature=signature, certificate_pem=certificate, roots=roots)


def _restart_station(root: Path, say: Say) -> None:
    """A running station restarts into ``current`` (on a live gateway only)."""
    if root.resolve() != DEFAULT_ROOT or not Path("/run/systemd/system").is_dir():
        say("restart the station to run it: systemctl restart evse")
        return
    _run(["systemctl", "--no-block", "try-restart", "evse.service"], "systemctl try-restart")
    say("restarted evse.service if it was running")


def execute(args: argparse.Namespace, say: Say) -> int:
    """Blocking: one ``evse release`` action; a ReleaseError is one line and exit 1."""
    action = args.release_command
    try:
        if action == "build":
            started = time.monotonic()
            image = build(
                args.checkout or _running_checkout(),
                args.out,
                signing_key=args.sign,
                wheelhouse=args.wheelhouse,
                version_suffix=args.version_suffix,
                say=say,
            )
            size = image.stat().st_size
            say(f"built {image} ({size / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s")
        elif action == "sign":
            say(f"signed: {write_signature(args.image, sign(args.image, args.key))}")
        elif action == "verify":
            manifest = _verify_args(args)
            signed = " and signed by the certificate's key" if args.certificate else ""
            say(
                f"{args.image.name}: evse-firmware {manifest.version} for Python "
                f"{manifest.python} ({manifest.platform}), {len(manifest.members)} wheels "
                f"match the manifest{signed}"
            )
        elif action == "install":
            _verify_args(args)
            releases = Releases(args.root, python=args.python)
            version = releases.install(args.image, say=say)
            if not args.no_switch:
                releases.switch(version, trial=args.trial)
                trial = f" on trial for {args.trial:g} s" if args.trial else ""
                say(f"current: {version}{trial} (previous: {releases.previous() or 'none'})")
                _restart_station(args.root, say)
        elif action == "rollback":
            to = Releases(args.root).rollback(args.reason)
            say(f"current: {to}")
            _restart_station(args.root, say)
        else:
            _list(Releases(args.root), as_json=args.json)
    except ReleaseError as exc:
        print(f"evse release {action}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"evse release {action}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _list(releases: Releases, *, as_json: bool) -> None:
    found = releases.installed()
    trial = releases.trial()
    report = releases.pending_report()
    if as_json:
        print(
            json.dumps(
                {
                    "root": str(releases.root),
                    "current": releases.current(),
                    "previous": releases.previous(),
                    "releases": [
                        {"version": r.version, "installed_at": r.installed_at} for r in found
                    ],
                    "trial": json.loads(trial.to_json()) if trial else None,
                    "report": {"installed": report.installed, "rolled_back": report.rolled_back}
                    if report.pending
                    else None,
                },
                indent=2,
            )
        )
        return
    if not found:
        print(f"no release installed in {releases.root}")
    for r in found:
        mark = "current" if r.current else "previous" if r.previous else ""
        print(f"{r.version:<20} {r.installed_at:<22} {mark}".rstrip())
    if trial is not None:
        print(
            f"trial: {trial.version}, {trial.starts} of {trial.max_starts} starts, "
            f"confirm before {_iso(trial.deadline)}"
        )
    if report.installed:
        print(f"to report: {report.installed} installed")
    if report.rolled_back:
        failed, to, why = report.rolled_back
        print(f"to report: {failed} rolled back to {to} ({why})")


async def run(args: argparse.Namespace) -> int:
    """The CLI's runner for ``evse release``: the blocking work in a worker thread."""
    import trio  # noqa: PLC0415 - python -m ops.release at-start needs no trio

    def say(line: str) -> None:
        print(f"evse release {args.release_command}: {line}", flush=True)

    return await trio.to_thread.run_sync(execute, args, say)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.release at-start [--root DIR]``: the unit's ExecStartPre.

    Counts the start of a release on trial and switches back before the
    station starts when the trial failed, so that ExecStart (through
    ``current``) runs the previous release even if the failed one crashes
    before it could count its own starts. Never fails the start: every
    problem is one line in the journal and exit 0.
    """
    parser = argparse.ArgumentParser(prog="python -m ops.release")
    parser.add_argument("action", choices=("at-start",))
    _root_option(parser)
    args = parser.parse_args(argv)
    try:
        report = Releases(args.root).at_start()
    except (ReleaseError, OSError) as exc:
        print(f"evse release at-start: {exc}", file=sys.stderr)
        return 0
    if report.rolled_back is not None and report.restart:
        failed, to, why = report.rolled_back
        print(f"evse release at-start: {failed} rolled back to {to}: {why}", file=sys.stderr)
    elif report.on_trial is not None:
        print(f"evse release at-start: {report.on_trial} on trial", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
