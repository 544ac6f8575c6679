"""Release images and the A/B install (ops/release.py), with real images and venvs.

The images are built from this checkout, offline from the session's wheelhouse
(tests/test_install.py builds it once per session), once per session and shared
by the xdist workers under a lock: the release as it is, the same tree with a
bumped version (two of them), and one whose ``evse`` entry point is broken. The
trial and rollback rules run first on releases laid out as directories with
their completion marker (no venv: the quick lane), then end to end on real
venvs made from the images (slow).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ops import release
from ops.cli import main
from ops.errors import ReleaseError
from ops.install import SOURCE_IGNORE
from ops.release import MARKER, Releases, StartReport
from tests.test_install import build_wheelhouse, shared_dir

CHECKOUT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"
V2 = f"{VERSION}.post1"
V3 = f"{VERSION}.post2"
BROKEN = f"{VERSION}.post3"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else None


# --- images, built once per session --------------------------------------------------


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """version -> image: this checkout, two bumped versions, and a broken one."""
    shared = shared_dir(tmp_path_factory)
    out = shared / "evse-release-images"
    with open(shared / "evse-release-images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            house = build_wheelhouse(tmp_path_factory)
            release.build(CHECKOUT, out, wheelhouse=house)
            release.build(CHECKOUT, out, wheelhouse=house, version_suffix=".post1")
            release.build(CHECKOUT, out, wheelhouse=house, version_suffix=".post2")
            # The same tree with an entry point that names no function: pip
            # installs it, its `evse --version` fails.
            broken = shared / "evse-broken-tree"
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(CHECKOUT, broken, ignore=SOURCE_IGNORE, symlinks=True)
            project = broken / "pyproject.toml"
            text = project.read_text()
            assert 'evse = "ops.cli:main"' in text
            project.write_text(text.replace('evse = "ops.cli:main"', 'evse = "ops.cli:no_such"'))
            release.build(broken, out, wheelhouse=house, version_suffix=".post3")
            (out / "done").touch()
    found = {p.name.removeprefix("evse-").removesuffix(".tar"): p for p in out.glob("*.tar")}
    assert set(found) == {VERSION, V2, V3, BROKEN}
    return found


def tiny_wheel(where: Path, name: str, version: str, payload: bytes) -> Path:
    """A real wheel file, small: its METADATA and one module."""
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
        zf.writestr(f"{name}.py", payload)
    return wheel


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small image made by ``pack`` (no pip: the quick lane), to tamper with."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    firmware = tiny_wheel(wheels, "evse_firmware", "9.9.9", b"print('firmware')\n" * 500)
    tiny_wheel(wheels, "trio", "0.35.0", os.urandom(20_000))
    tiny_wheel(wheels, "httpx", "0.29.0", os.urandom(20_000))
    return release.pack(wheels, tmp_path / "out", firmware)


def members(image: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(image) as tar:
        return tar.getmembers()


@pytest.mark.slow
def test_image_holds_the_firmware_and_its_pinned_runtime_closure(
    images: dict[str, Path], tmp_path: Path
) -> None:
    image = images[VERSION]
    manifest = release.verify(image)
    assert manifest.version == VERSION
    assert manifest.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert manifest.firmware == f"evse_firmware-{VERSION}-py3-none-any.whl"
    names = [m.name for m in members(image)]
    assert names[0] == "manifest.json" and sorted(names[1:]) == sorted(manifest.members)
    pins = release.read_pins(CHECKOUT / "constraints.txt")
    deps = {release.wheel_name_version(n) for n in manifest.members if n != manifest.firmware}
    # Every dependency at its pin; the runtime closure, not the test tools.
    assert all(pins[name] == version for name, version in deps)
    got = {name for name, _ in deps}
    assert {"trio", "cryptography", "httpx", "pymodbus", "hypercorn", "cffi"} <= got
    assert not got & {"pytest", "websockets", "selenium", "pyftpdlib", "trustme", "setuptools"}
    for name, member in manifest.members.items():
        assert len(member.sha256) == 64 and member.size > 0, name
    # The bumped build of the same tree.
    assert release.verify(images[V2]).version == V2
    # One byte changed in the real image: refused, naming the member.
    copy = tmp_path / image.name
    shutil.copyfile(image, copy)
    flip_byte(copy, manifest.firmware)
    with pytest.raises(ReleaseError, match="does not match the manifest") as refused:
        release.verify(copy)
    assert refused.value.what == f"{image.name}: {manifest.firmware}"


def flip_byte(image: Path, member: str) -> None:
    """One byte in the middle of a member's data, changed in place."""
    info = next(m for m in members(image) if m.name == member)
    with image.open("r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def test_one_byte_changed_is_refused_naming_the_member(image: Path, tmp_path: Path) -> None:
    victim = next(m.name for m in members(image) if m.name.startswith("trio-"))
    flip_byte(image, victim)
    with pytest.raises(ReleaseError, match=re.escape(victim)) as refused:
        release.verify(image)
    assert refused.value.what == f"{image.name}: {victim}"
    assert "does not match the manifest" in refused.value.reason
    # Installing it is refused just the same, before any venv is made.
    releases = Releases(tmp_path / "root", python=PYTHON)
    with pytest.raises(ReleaseError, match=re.escape(victim)):
        releases.install(image)
    assert releases.current() is None
    assert [p.name for p in (tmp_path / "root" / "releases").iterdir()] == []


def repack(source: Path, dest: Path, *, drop: str | None = None, add: str | None = None) -> None:
    with tarfile.open(source) as old, tarfile.open(dest, "w") as new:
        for info in old.getmembers():
            if info.name != drop:
                new.addfile(info, old.extractfile(info))
        if add is not None:
            extra = tarfile.TarInfo(add)
            extra.size = 1
            new.addfile(extra, io.BytesIO(b"x"))


def test_missing_extra_and_unsafe_members_are_refused(image: Path, tmp_path: Path) -> None:
    wheel = next(m.name for m in members(image) if m.name.startswith("httpx-"))
    missing = tmp_path / "missing.tar"
    repack(image, missing, drop=wheel)
    with pytest.raises(ReleaseError, match="missing from the image") as refused:
        release.verify(missing)
    assert refused.value.what == f"missing.tar: {wheel}"
    extra = tmp_path / "extra.tar"
    repack(image, extra, add="surprise.whl")
    with pytest.raises(ReleaseError, match=r"extra\.tar: surprise\.whl: not in the manifest"):
        release.verify(extra)
    unsafe = tmp_path / "unsafe.tar"
    repack(image, unsafe, add="../etc/passwd")
    with pytest.raises(ReleaseError, match="not a plain file name"):
        release.verify(unsafe)
    nomanifest = tmp_path / "nomanifest.tar"
    repack(image, nomanifest, drop="manifest.json")
    with pytest.raises(ReleaseError, match=r"manifest\.json: missing from the image"):
        release.verify(nomanifest)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ReleaseError, match="not a readable tar archive"):
        release.verify(garbage)


# --- signatures ---------------------------------------------------------------------


def key_and_cert(
    tmp_path: Path,
    name: str,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] | None = None,
) -> tuple[Path, x509.Certificate]:
    """A PEM key file and a certificate for it (self-signed, or by ``issuer``)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signature_verifies_against_the_certificate_only(
    kind: str, image: Path, tmp_path: Path
) -> None:
    def new_key() -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        if kind == "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(ec.SECP256R1())

    ca_key = new_key()
    _, ca = key_and_cert(tmp_path, "root", ca_key)
    key, cert = key_and_cert(tmp_path, "signer", new_key(), issuer=(ca, ca_key))
    _, other = key_and_cert(tmp_path, "other", new_key())

    signature = release.sign(image, key)
    base64.b64decode(signature, validate=True)
    manifest = release.verify(image, signature=signature, certificate_pem=pem(cert))
    assert manifest.version == "9.9.9"
    assert release.verify(image, signature=signature, certificate_pem=pem(cert), roots=[pem(ca)])
    with pytest.raises(ReleaseError, match="does not match the key of certificate CN=other"):
        release.verify(image, signature=signature, certificate_pem=pem(other))
    with pytest.raises(ReleaseError, match="not issued by any of the given roots"):
        release.verify(image, signature=signature, certificate_pem=pem(cert), roots=[pem(other)])
    with pytest.raises(ReleaseError, match="is checked against a certificate"):
        release.verify(image, signature=signature)
    # The signature covers the whole file: one byte changed anywhere fails it.
    flip_byte(image, "manifest.json")
    with pytest.raises(ReleaseError, match="signature does not match"):
        release.verify(image, signature=signature, certificate_pem=pem(cert))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_verifies_the_signature(kind: str, image: Path, tmp_path: Path) -> None:
    """What a central system's tools check: openssl dgst, SHA-256 over the file."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    key, _ = key_and_cert(tmp_path, "signer", private)
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(release.sign(image, key)))
    (tmp_path / "pub.pem").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pss = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]
    done = subprocess.run(
        [
            *("openssl", "dgst", "-sha256", *(pss if kind == "rsa" else [])),
            *("-verify", str(tmp_path / "pub.pem"), "-signature", str(tmp_path / "sig.bin")),
            str(image),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "Verified OK"), done.stderr


def test_keys_that_are_not_rsa_2048_or_p256_are_refused(image: Path, tmp_path: Path) -> None:
    small, _ = key_and_cert(
        tmp_path, "small", rsa.generate_private_key(public_exponent=65537, key_size=1024)
    )
    with pytest.raises(ReleaseError, match="fewer than 2048"):
        release.sign(image, small)
    p384, _ = key_and_cert(tmp_path, "p384", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ReleaseError, match="not an RSA or EC P-256 key"):
        release.sign(image, p384)


def test_sign_and_verify_on_the_command_line(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert = key_and_cert(tmp_path, "signer", ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "signer.pem").write_bytes(pem(cert))
    _, other = key_and_cert(tmp_path, "other", ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "other.pem").write_bytes(pem(other))
    assert main(["release", "sign", str(image), "--key", str(key)]) == 0
    assert image.with_name(f"{image.name}.sig").exists()
    verify = ["release", "verify", str(image), "--certificate"]
    assert main([*verify, str(tmp_path / "signer.pem")]) == 0
    out, err = capsys.readouterr()
    assert "evse-firmware 9.9.9" in out and "signed by the certificate's key" in out
    assert err == ""
    assert main([*verify, str(tmp_path / "other.pem")]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"evse release verify: error: {image.name}: the signature does not match the key "
        "of certificate CN=other"
    ]


# --- trial and rollback, on releases laid out by hand ----------------------------------


class Clock:
    """The wall clock the trial deadlines are in, set by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def lay_out(root: Path, *versions: str) -> None:
    """Complete releases as install leaves them (the venv left out), current the first."""
    for version in versions:
        (root / "releases" / version).mkdir(parents=True)
        marker = {"installed_at": "2026-01-01T00:00:00Z", "manifest": {"version": version}}
        (root / "releases" / version / MARKER).write_text(json.dumps(marker))
    (root / "current").symlink_to(f"releases/{versions[0]}")


@pytest.fixture
def laid_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Clock]:
    # Not under systemd here: every at_start is a start of its own.
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    root = tmp_path / "opt-evse"
    lay_out(root, "1.0", "2.0")
    return root, Clock()


def test_confirm_ends_the_trial_and_reports_installed_once(
    laid_out: tuple[Path, Clock],
) -> None:
    root, clock = laid_out
    releases = Releases(root, now=clock)
    assert (releases.current(), releases.previous()) == ("1.0", None)
    releases.switch("2.0", trial=600)
    assert os.readlink(root / "current") == "releases/2.0"
    assert os.readlink(root / "previous") == "releases/1.0"
    record = json.loads((root / "trial.json").read_text())
    assert record["version"] == "2.0" and record["previous"] == "1.0"
    assert record["deadline_utc"] == "2027-01-15T08:10:00Z" and record["starts"] == 0

    assert releases.at_start() == StartReport(on_trial="2.0")
    assert releases.trial() is not None and releases.trial().starts == 1  # type: ignore[union-attr]
    releases.confirm()
    assert releases.trial() is None
    # Reported after the restart too, until delivered; then never again.
    again = Releases(root, now=clock)
    assert again.at_start() == StartReport(installed="2.0")
    assert again.pending_report() == StartReport(installed="2.0")
    again.report_delivered()
    assert again.at_start() == StartReport()
    assert (again.current(), again.previous()) == ("2.0", "1.0")


def test_too_many_starts_roll_back_and_the_report_survives_the_restart(
    laid_out: tuple[Path, Clock],
) -> None:
    root, clock = laid_out
    releases = Releases(root, now=clock)
    releases.switch("2.0", trial=600, max_starts=3)
    for _ in range(3):
        assert releases.at_start() == StartReport(on_trial="2.0")
    fourth = releases.at_start()
    reason = "started 4 times without being confirmed (at most 3)"
    assert fourth == StartReport(rolled_back=("2.0", "1.0", reason), restart=True)
    assert (releases.current(), releases.previous()) == ("1.0", "2.0")
    assert releases.trial() is None
    # The previous release, started again: it reports, and does not restart.
    after = Releases(root, now=clock).at_start()
    assert after == StartReport(rolled_back=("2.0", "1.0", reason))
    releases.report_delivered()
    assert releases.at_start() == StartReport()
    # A confirm with no trial changes nothing.
    releases.confirm()
    assert releases.pending_report() == StartReport() and releases.current() == "1.0"


def test_the_deadline_rolls_back_at_start_or_when_checked(
    laid_out: tuple[Path, Clock],
) -> None:
    root, clock = laid_out
    releases = Releases(root, now=clock)
    releases.switch("2.0", trial=60)
    clock.now += 59
    assert releases.at_start() == StartReport(on_trial="2.0")
    clock.now += 1
    reason = "not confirmed within 60 s of the switch"
    assert releases.at_start().rolled_back == ("2.0", "1.0", reason)
    assert releases.current() == "1.0"
    releases.report_delivered()

    # While the station runs (no restart): check_trial at the deadline, no start counted.
    releases.switch("2.0", trial=60)
    trial = releases.trial()
    assert trial is not None and trial.deadline == clock.now + 60
    assert releases.check_trial() == StartReport(on_trial="2.0")
    assert releases.trial().starts == 0  # type: ignore[union-attr]
    clock.now = trial.deadline
    report = releases.check_trial()
    assert report.rolled_back == ("2.0", "1.0", reason) and report.restart
    releases.report_delivered()

    # A clock set back below the switch (no RTC before NTP): counted from now.
    releases.switch("2.0", trial=60)
    clock.now -= 3600
    assert releases.at_start() == StartReport(on_trial="2.0")
    assert releases.trial().deadline == clock.now + 60  # type: ignore[union-attr]
    clock.now += 30
    assert releases.at_start() == StartReport(on_trial="2.0")


def test_one_systemd_start_is_counted_once(
    laid_out: tuple[Path, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit's ExecStartPre and the station in the same start: one start."""
    root, clock = laid_out
    releases = Releases(root, now=clock)
    releases.switch("2.0", trial=600, max_starts=1)
    monkeypatch.setenv("INVOCATION_ID", "a" * 32)
    releases.at_start()
    assert releases.at_start() == StartReport(on_trial="2.0")
    monkeypatch.setenv("INVOCATION_ID", "b" * 32)
    assert releases.at_start().rolled_back is not None


def test_rollback_switch_and_stale_trials(laid_out: tuple[Path, Clock]) -> None:
    root, clock = laid_out
    releases = Releases(root, now=clock)
    with pytest.raises(ReleaseError, match="no previous release"):
        releases.rollback("by hand")
    with pytest.raises(ReleaseError, match=r"3\.0: not installed"):
        releases.switch("3.0", trial=0)
    releases.switch("2.0", trial=0)
    assert releases.trial() is None
    assert releases.rollback("meter readings wrong") == "1.0"
    assert releases.pending_report().rolled_back == ("2.0", "1.0", "meter readings wrong")
    # A trial record of a release that is not current (a power cut between
    # the record and the link): dropped, the release that runs is kept.
    (root / "trial.json").write_bytes(
        release.Trial("2.0", "1.0", clock.now - 1, clock.now - 61, 60, 3).to_json()
    )
    assert releases.at_start().on_trial is None
    assert releases.trial() is None and releases.current() == "1.0"
    # A third release: the oldest one goes, current and previous stay.
    lay_out(root / "more", "3.0")
    (root / "more" / "releases" / "3.0").rename(root / "releases" / "3.0")
    releases.switch("3.0", trial=0)
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.0", "3.0"]
    assert (releases.current(), releases.previous()) == ("3.0", "1.0")


def test_at_start_from_the_unit_never_fails_the_start(tmp_path: Path) -> None:
    assert release.main(["at-start", "--root", str(tmp_path / "nothing")]) == 0
    assert Releases(tmp_path / "empty").at_start() == StartReport()


# --- end to end: real venvs from the images -----------------------------------------


def evse_version(root: Path) -> str:
    """What the unit would start: ``<root>/current/bin/evse --version``."""
    done = subprocess.run(
        [str(root / "current" / "bin" / "evse"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    return done.stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_switch_confirm_and_keep_two(
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    root = tmp_path / "opt-evse"
    releases = Releases(root, python=PYTHON)
    assert releases.install(images[VERSION]) == VERSION
    releases.switch(VERSION, trial=600)  # the first release: nothing to go back to
    assert releases.trial() is None
    assert evse_version(root) == f"evse {VERSION}"
    with pytest.raises(ReleaseError, match="is the current release"):
        releases.install(images[VERSION])

    assert releases.install(images[V2]) == V2
    assert releases.current() == VERSION  # installed, not switched
    releases.switch(V2, trial=600)
    assert evse_version(root) == f"evse {V2}"
    assert releases.at_start() == StartReport(on_trial=V2)
    releases.confirm()
    assert releases.at_start() == StartReport(installed=V2)
    releases.report_delivered()

    # An operator's install of a third: the oldest goes once it is current.
    assert main(["release", "install", str(images[V3]), "--root", str(root), "--trial", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"current: {V3} (previous: {V2})" in out and err == ""
    assert sorted(p.name for p in (root / "releases").iterdir()) == [V2, V3]
    assert evse_version(root) == f"evse {V3}"
    assert main(["release", "list", "--root", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["current"], listed["previous"], listed["trial"]) == (V3, V2, None)
    assert [r["version"] for r in listed["releases"]] == [V2, V3]
    assert main(["release", "rollback", "--root", str(root)]) == 0
    assert f"current: {V2}" in capsys.readouterr().out
    assert evse_version(root) == f"evse {V2}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_broken_release_is_refused_and_a_silent_one_rolls_back(
    images: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "opt-evse"
    releases = Releases(root, python=PYTHON)
    releases.install(images[VERSION])
    releases.switch(VERSION, trial=0)

    # Its self-check fails: refused before any switch, nothing left behind.
    with pytest.raises(ReleaseError, match="self-check") as refused:
        releases.install(images[BROKEN])
    assert refused.value.what.startswith(f"release {BROKEN}")
    assert releases.current() == VERSION
    assert [p.name for p in (root / "releases").iterdir()] == [VERSION]

    # A release that never confirms: the unit's ExecStartPre (the release's
    # own interpreter through `current`) switches back on its fourth start.
    releases.install(images[V2])
    releases.switch(V2, trial=600, max_starts=3)
    pre = [str(root / "current" / "bin" / "python"), "-I", "-m", "ops.release", "at-start"]
    lines = []
    for start in range(4):
        done = subprocess.run(
            [*pre, "--root", str(root)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "INVOCATION_ID": f"{start:032x}"},
        )
        assert done.returncode == 0
        lines.append(done.stderr.strip())
    assert lines[:3] == [f"evse release at-start: {V2} on trial"] * 3
    assert lines[3] == (
        f"evse release at-start: {V2} rolled back to {VERSION}: "
        "started 4 times without being confirmed (at most 3)"
    )
    assert evse_version(root) == f"evse {VERSION}"
    # The station of the previous release finds the report (once delivered: gone).
    report = releases.at_start()
    assert report.rolled_back is not None and report.rolled_back[:2] == (V2, VERSION)
    assert not report.restart
