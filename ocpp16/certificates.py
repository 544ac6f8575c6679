"""Certificates of the OCPP 1.6 Security Whitepaper (edition 3): the root stores,
the charge point's own key pair and certificate, firmware signatures.

Everything here is pure (certificates, times and bytes in, answers out) except
``CertificateStore``, the one class that touches files. No trio: the security
profile (``ocpp16.profiles.security``) runs the store's blocking calls in
worker threads. ``cryptography`` does every cryptographic operation.

Hash data (whitepaper 6.1, CertificateHashDataType, as clarified by edition 3:
"the contents of these fields must follow the OCSP specification", RFC 6960
4.1.1 CertID):

* ``issuerNameHash``: the hash of the DER encoding of the certificate's
  ``issuer`` field, taken byte for byte from the certificate (not re-encoded);
* ``issuerKeyHash``: the hash of the issuer's public key: the contents of the
  ``subjectPublicKey`` BIT STRING of the issuer's certificate, without its tag,
  length and unused-bits octet (not the whole SubjectPublicKeyInfo). A root
  is its own issuer; a certificate signed by another (a new root cross-signed
  by the old one, 7.1) is hashed with its issuer's key, found among the
  installed certificates when it is installed, so its hash data are computed
  once, then and kept (they outlive the issuer's deletion);
* ``serialNumber``: hexadecimal, upper case, no leading zeros, no "0x"
  (4095 is "FFF").

Reported with SHA256 (A00.FR.506). A DeleteCertificate may name SHA384 or
SHA512 (M04.FR.07: "the hashAlgorithm which was used to install"): the three
are computed at installation. Compared case-insensitively (CiString128 and
CiString40, 6.5/6.6); a serial number sent with leading zeros still matches.

Rules where the whitepaper leaves room (decided here):

* **CertificateStoreMaxLength counts per certificate type.** The reference
  station's value is 1 and its two root types are separate trust stores (the
  central system's TLS and the manufacturer's firmware signatures); a total
  of 1 would make a station with a CentralSystemRootCertificate unable to
  accept signed firmware. So each type holds at most CertificateStoreMaxLength
  certificates (M05.FR.03: more is Rejected). The fallback kept under
  AdditionalRootCertificateCheck (M05.FR.08: "plus a temporarily fallback
  certificate") is not counted. Installing a certificate that is installed
  already is Accepted and changes nothing (it takes no second place).
  Consequence, stated so nobody is surprised: with a limit of 1 and security
  profile 2 or 3, the CentralSystemRootCertificate in use cannot be deleted
  (M04.FR.06) nor a second one installed, so it is replaced only with
  AdditionalRootCertificateCheck (the new root signed by the old one), or by
  the installer.
* **What InstallCertificate accepts** (M05.FR.06 "invalid and/or incorrect" ->
  Rejected): exactly one PEM certificate; a CA certificate (basicConstraints
  cA, RFC 5280 4.2.1.9; keyCertSign where keyUsage is present); valid now
  (an expired certificate, or one not yet valid, is Rejected); a key of at
  least 2048 bits (RSA/DSA) or 224 bits (EC) (A00.FR.501..503); either
  self-signed or signed by a certificate of the same type installed here (its
  issuer's key is needed for the hash data and to check it at all). A
  certificate this station cannot store (disk) is Failed (M05.FR.04).
* **AdditionalRootCertificateCheck** (7.1, M05.FR.08..13): when true and a
  CentralSystemRootCertificate is installed, a new one must be signed by the
  installed one (else Rejected), replaces it, and the old one is kept as the
  fallback until the transport reports a successful connection with the new
  one (``confirm_root``, M05.FR.12) or a failed one that the fallback
  verifies (``revert_root``, M05.FR.13: the old root comes back, the new one
  goes). With no CentralSystemRootCertificate installed the first one is
  installed as usual. The fallback is not reported by GetInstalledCertificateIds
  and cannot be deleted (it is not "installed", only kept).
* **In use** (M04.FR.06): the transport tells the store which certificates
  the current connection's server chain had (``note_connection``); a root that
  issued one of them, or is one, is in use; when none did directly (an
  intermediate the server sent is not in the chain reported), every
  CentralSystemRootCertificate counts as in use. Without TLS (profiles 0, 1)
  none is.
* **The charge point's certificate** (A02/A03): the key pair is made on the
  device (EC P-256 by default, RSA of 2048 bits or more as an option), its
  private key written with mode 0600 and never read back out of the store
  but as a path for the TLS context; the CSR's subject is CN = the charge
  point's serial number (A00.FR.511), O = CpoName (A02.FR.13). The signed
  chain (CertificateSigned) is accepted when: it is PEM; its first
  certificate's public key is the pending CSR's; that leaf is not a CA, has
  the CSR's CN and an O (A00.FR.509), allows digitalSignature and clientAuth
  where it restricts them, is not expired (a notBefore in the future is fine:
  it is used from then on, A02.FR.08); each certificate is signed by the next
  one in the chain; and the chain ends at, or is signed by, an installed
  CentralSystemRootCertificate (A02.FR.06, the CPO hierarchy), every CA in
  between valid now. Signatures with MD5 or SHA-1 are refused (A00.FR.504).
  Several certificates stored: the newest in force, by notBefore, is used
  (A02.FR.09); a superseded one is kept for a month as fallback (A02.FR.10),
  an expired one removed.
* **Renewal** (A03.FR.02): a month (``RENEW_BEFORE``, 30 days) before the
  notAfter of the certificate in force, once per certificate.

Firmware signatures (L01, ``verify_firmware_signature``; the certificate alone,
before SignedUpdateFirmware is answered: ``verify_signing_certificate``): the
signing certificate must be valid and be, or be signed directly by, an installed
ManufacturerRootCertificate (the whitepaper forbids intermediates, L01
remark), else ``InvalidCertificate``; the signature, Base64, is over the
SHA-256 of the whole file (L01.FR.04), checked with RSA-PSS (any salt length)
or, since several central systems and signing tools produce it, RSA PKCS#1
v1.5, or ECDSA (DER, or the raw r||s form some tools emit); else
``InvalidSignature``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _BadSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ocpp16.errors import CertificateError

log = logging.getLogger(__name__)

#: A03.FR.02: "will expire in one month".
RENEW_BEFORE = timedelta(days=30)
#: A02.FR.10: "It is RECOMMENDED to store old certificates for one month, as fallback."
KEEP_SUPERSEDED = timedelta(days=30)
#: A00.FR.502 / A00.FR.503.
MIN_RSA_BITS = 2048
MIN_EC_BITS = 224
#: HashAlgorithmEnumType (6.12).
HASH_ALGORITHMS: Mapping[str, type[hashes.HashAlgorithm]] = {
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}
#: The algorithm GetInstalledCertificateIds reports with (A00.FR.506).
REPORTED_HASH = "SHA256"
#: Reading a firmware image for its hash.
_CHUNK = 1 << 20
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)
_INDEX = "index.json"
_PENDING_KEY = "pending.key"
_CLIENT_DIR = "client"


class CertificateUse(StrEnum):
    """CertificateUseEnumType (6.4)."""

    CENTRAL_SYSTEM_ROOT = "CentralSystemRootCertificate"
    MANUFACTURER_ROOT = "ManufacturerRootCertificate"


class InvalidCertificate(CertificateError):
    """A certificate is refused: not PEM, expired, no chain to an installed root,
    not what it must be. For a firmware signing certificate: SignedUpdateFirmware
    InvalidCertificate (L01.FR.24)."""

    kind = "InvalidCertificate"


class InvalidSignature(CertificateError):
    """A firmware signature does not verify (L01: InvalidSignature)."""

    kind = "InvalidSignature"


# --------------------------------------------------------------------- DER, just enough


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at ``pos`` (X.690 8.1): (tag, content start, end)."""
    if pos + 2 > len(data):
        raise InvalidCertificate("malformed DER: truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # DER has no indefinite length (X.690 10.1); four octets cover any certificate.
        if count == 0 or count > 4 or pos + count > len(data):
            raise InvalidCertificate("malformed DER: length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise InvalidCertificate("malformed DER: truncated")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The elements inside a constructed one: (tag, element start, content start, end)."""
    out = []
    pos = start
    while pos < end:
        tag, content, stop = _tlv(data, pos)
        out.append((tag, pos, content, stop))
        pos = stop
    return out


def _tbs_fields(cert: x509.Certificate) -> list[tuple[int, int, int, int]]:
    """TBSCertificate's fields (RFC 5280 4.1), the optional ``version`` skipped:
    serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ..."""
    tbs = cert.tbs_certificate_bytes
    tag, start, end = _tlv(tbs, 0)
    if tag != 0x30:
        raise InvalidCertificate("malformed DER: TBSCertificate is not a SEQUENCE")
    fields = _children(tbs, start, end)
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    if len(fields) < 6:
        raise InvalidCertificate("malformed DER: TBSCertificate too short")
    return fields


def issuer_name_der(cert: x509.Certificate) -> bytes:
    """The DER encoding of the certificate's issuer field, as in the certificate."""
    _, start, _, end = _tbs_fields(cert)[2]
    return cert.tbs_certificate_bytes[start:end]


def public_key_bits(cert: x509.Certificate) -> bytes:
    """The contents of the certificate's subjectPublicKey BIT STRING (RFC 5280
    4.1.2.7), without the unused-bits octet: what RFC 6960's issuerKeyHash hashes."""
    tbs = cert.tbs_certificate_bytes
    _, _, content, end = _tbs_fields(cert)[5]
    parts = _children(tbs, content, end)
    if len(parts) != 2 or parts[1][0] != 0x03:
        raise InvalidCertificate("malformed DER: subjectPublicKeyInfo")
    _, _, bits_start, bits_end = parts[1]
    if bits_end <= bits_start or tbs[bits_start] != 0:
        raise InvalidCertificate("malformed DER: public key BIT STRING")
    return tbs[bits_start + 1 : bits_end]


# ------------------------------------------------------------------------- hash data


def serial_hex(serial: int) -> str:
    """6.1 serialNumber: hexadecimal without leading zeros (4095 -> "FFF")."""
    return format(serial, "X")


@dataclass(frozen=True, slots=True)
class HashData:
    """CertificateHashDataType (6.1)."""

    hash_algorithm: str
    issuer_name_hash: str
    issuer_key_hash: str
    serial_number: str

    def to_ocpp(self) -> dict[str, str]:
        return {
            "hashAlgorithm": self.hash_algorithm,
            "issuerNameHash": self.issuer_name_hash,
            "issuerKeyHash": self.issuer_key_hash,
            "serialNumber": self.serial_number,
        }

    @classmethod
    def from_ocpp(cls, data: Mapping[str, Any]) -> HashData:
        return cls(
            str(data["hashAlgorithm"]),
            str(data["issuerNameHash"]),
            str(data["issuerKeyHash"]),
            str(data["serialNumber"]),
        )

    def _normal(self) -> tuple[str, str, str, str]:
        # CiStrings: case-insensitive. A serial number with leading zeros names
        # the same number (6.1 says none are sent; a peer that sends them anyway
        # still means this certificate).
        serial = self.serial_number.strip().lower().removeprefix("0x").lstrip("0") or "0"
        return (
            self.hash_algorithm.upper(),
            self.issuer_name_hash.strip().lower(),
            self.issuer_key_hash.strip().lower(),
            serial,
        )

    def matches(self, other: HashData) -> bool:
        return self._normal() == other._normal()


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> str:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize().hex().upper()


def hash_data(
    cert: x509.Certificate, issuer: x509.Certificate | None = None, algorithm: str = REPORTED_HASH
) -> HashData:
    """The certificate's hash data; ``issuer`` is the certificate whose key signed
    it (None: ``cert`` itself, a root)."""
    make = HASH_ALGORITHMS.get(algorithm)
    if make is None:
        raise ValueError(f"hash algorithm {algorithm!r} is not one of {sorted(HASH_ALGORITHMS)}")
    name = _digest(make(), issuer_name_der(cert))
    key = _digest(make(), public_key_bits(issuer or cert))
    return HashData(algorithm, name, key, serial_hex(cert.serial_number))


# ------------------------------------------------------------------------ checks


def load_certificates(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in order; InvalidCertificate for none or a bad one."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidCertificate("not a PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidCertificate(f"not a readable PEM certificate: {exc}") from None


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    return now


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def check_validity(cert: x509.Certificate, now: datetime, *, future_ok: bool = False) -> None:
    """Valid at ``now`` (RFC 5280 4.1.2.5); with ``future_ok`` a notBefore ahead is fine."""
    now = _aware(now)
    if now >= cert.not_valid_after_utc:
        raise InvalidCertificate(
            f"{_subject(cert)}: expired {cert.not_valid_after_utc.isoformat()}"
        )
    if not future_ok and now < cert.not_valid_before_utc:
        raise InvalidCertificate(
            f"{_subject(cert)}: not valid before {cert.not_valid_before_utc.isoformat()}"
        )


def check_key_strength(cert: x509.Certificate) -> None:
    """A00.FR.501..503: 112-bit security: RSA/DSA >= 2048 bits, EC >= 224 bits."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCertificate(f"{_subject(cert)}: unreadable public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise InvalidCertificate(
            f"{_subject(cert)}: {key.key_size}-bit key, at least {MIN_RSA_BITS} required"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        raise InvalidCertificate(
            f"{_subject(cert)}: {key.curve.key_size}-bit curve, at least {MIN_EC_BITS} required"
        )


def _check_signature_hash(cert: x509.Certificate) -> None:
    """A00.FR.504: no MD5 or SHA-1 signature binds a certificate to its issuer."""
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise InvalidCertificate(f"{_subject(cert)}: unsupported signature algorithm") from None
    if isinstance(algorithm, _WEAK_HASHES):
        raise InvalidCertificate(f"{_subject(cert)}: signed with {algorithm.name}")


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # a malformed extension
        raise InvalidCertificate(f"{_subject(cert)}: bad extension ({exc})") from None


def is_ca(cert: x509.Certificate) -> bool:
    """basicConstraints cA (RFC 5280 4.2.1.9) and, where keyUsage is present, keyCertSign."""
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        return False
    usage = _extension(cert, x509.KeyUsage)
    return usage is None or bool(usage.key_cert_sign)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``cert``'s issuer is ``issuer``'s subject and ``issuer``'s key made its signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, _BadSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return signed_by(cert, cert)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, lower-case hex: a certificate's name here."""
    return hashlib.sha256(_der(cert)).hexdigest()


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def verify_chain(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], now: datetime
) -> None:
    """``chain`` (leaf first) links up to one of ``anchors``: each certificate is
    signed by the next, the last is an anchor or signed by one, every CA above
    the leaf is a CA valid ``now``. The leaf's own checks are the caller's."""
    if not chain:
        raise InvalidCertificate("no certificate")
    if not anchors:
        raise InvalidCertificate("no root certificate installed to verify it against")
    anchor_ders = {_der(a) for a in anchors}
    for position, cert in enumerate(chain):
        if position > 0:
            check_validity(cert, now)
            if not is_ca(cert):
                raise InvalidCertificate(f"{_subject(cert)}: in the chain but not a CA")
        if _der(cert) in anchor_ders:
            return
        _check_signature_hash(cert)
        if position + 1 < len(chain):
            if not signed_by(cert, chain[position + 1]):
                raise InvalidCertificate(
                    f"{_subject(cert)}: not signed by the next certificate in the chain"
                )
            continue
        for anchor in anchors:
            if signed_by(cert, anchor):
                check_validity(anchor, now)
                return
        raise InvalidCertificate(
            f"{_subject(cert)}: issued by {cert.issuer.rfc4514_string()}, "
            "which is not an installed root certificate"
        )


# ----------------------------------------------------------------------- firmware


def verify_signing_certificate(
    signing_cert_pem: str, roots: Sequence[bytes], *, now: datetime | None = None
) -> x509.Certificate:
    """L01.FR.23: the firmware signing certificate, checked before SignedUpdateFirmware
    is answered: valid at ``now`` (default: the system clock), a key strong enough,
    an installed ManufacturerRootCertificate (``roots``, PEM) or signed directly by
    one, keyUsage allowing signatures, an RSA or EC key. Returns it;
    ``InvalidCertificate`` otherwise."""
    when = now if now is not None else datetime.now(UTC)
    signer = load_certificates(signing_cert_pem)[0]
    anchors = [cert for pem in roots for cert in load_certificates(pem)]
    if not anchors:
        raise InvalidCertificate("no ManufacturerRootCertificate installed")
    check_validity(signer, when)
    check_key_strength(signer)
    # L01 remark: "The manufacturer SHALL NOT use intermediate certificates for
    # the firmware signing certificate": the signer is a root or one link below.
    if _der(signer) not in {_der(a) for a in anchors}:
        issuers = [a for a in anchors if signed_by(signer, a)]
        if not issuers:
            raise InvalidCertificate(
                f"{_subject(signer)}: not signed by an installed ManufacturerRootCertificate"
            )
        _check_signature_hash(signer)
        for issuer in issuers:
            check_validity(issuer, when)
    usage = _extension(signer, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise InvalidCertificate(f"{_subject(signer)}: keyUsage does not allow signatures")
    if not isinstance(signer.public_key(), rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise InvalidCertificate(f"{_subject(signer)}: key type cannot sign firmware here")
    return signer


def verify_firmware_signature(
    file: Path,
    signature_b64: str,
    signing_cert_pem: str,
    roots: Sequence[bytes],
    *,
    now: datetime | None = None,
) -> None:
    """L01: the firmware ``file`` was signed by ``signing_cert_pem``'s key, which an
    installed ManufacturerRootCertificate (``roots``, PEM) vouches for.

    Raises ``InvalidCertificate`` (``verify_signing_certificate`` refuses the
    certificate) or ``InvalidSignature`` (not Base64, or not a signature by that
    key over the file's SHA-256 with RSA-PSS, RSA PKCS#1 v1.5 or ECDSA, L01.FR.04).
    Reads the whole file: call it in a worker thread.
    """
    signer = verify_signing_certificate(signing_cert_pem, roots, now=now)
    key = signer.public_key()
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)  # checked above
    try:
        signature = base64.b64decode("".join(signature_b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature("the signature is not Base64") from None
    if not signature:
        raise InvalidSignature("the signature is empty")
    digest = file_sha256(file)
    if not _signature_ok(key, signature, digest):
        raise InvalidSignature(f"the signature does not match {file.name} and {_subject(signer)}")


def file_sha256(file: Path) -> bytes:
    """SHA-256 over the whole file (L01.FR.04), read in chunks."""
    digest = hashlib.sha256()
    try:
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InvalidSignature(f"{file}: cannot be read ({exc.strerror or exc})") from None
    return digest.digest()


def _signature_ok(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, signature: bytes, digest: bytes
) -> bool:
    prehashed = Prehashed(hashes.SHA256())
    if isinstance(key, rsa.RSAPublicKey):
        # A00.FR.505 names RSA-PSS; PKCS#1 v1.5 is what several central systems
        # and openssl dgst -sign produce: both are accepted.
        schemes: list[padding.AsymmetricPadding] = [
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
            padding.PKCS1v15(),
        ]
        for scheme in schemes:
            with contextlib.suppress(_BadSignature):
                key.verify(signature, digest, scheme, prehashed)
                return True
        return False
    candidates = [signature]
    size = (key.curve.key_size + 7) // 8
    if len(signature) == 2 * size:
        # Raw r||s (IEEE P1363), as some signing tools write it.
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        candidates.append(encode_dss_signature(r, s))
    for candidate in candidates:
        with contextlib.suppress(_BadSignature, ValueError):
            key.verify(candidate, digest, ec.ECDSA(prehashed))
            return True
    return False


# ------------------------------------------------------------------------- the store


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to an install or a delete: ``status`` as OCPP spells it; ``reason``
    for the log and the security event; ``invalid`` when the certificate itself
    was refused (not the store being full); ``changed`` when the store changed
    (ReconfigurationOfSecurityParameters)."""

    status: str
    reason: str = ""
    invalid: bool = False
    changed: bool = False


@dataclass(frozen=True, slots=True)
class InstalledCertificate:
    use: CertificateUse
    pem: str
    fingerprint: str
    #: By algorithm name (``HASH_ALGORITHMS``), computed at installation.
    hashes: Mapping[str, HashData]

    @property
    def certificate(self) -> x509.Certificate:
        return load_certificates(self.pem)[0]


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A signed certificate of this charge point, with its key, in the store."""

    name: str
    serial: str
    not_before: datetime
    not_after: datetime
    cert_path: Path
    key_path: Path


def _installed_to_json(entry: InstalledCertificate) -> dict[str, Any]:
    return {
        "pem": entry.pem,
        "fingerprint": entry.fingerprint,
        "hashes": {name: h.to_ocpp() for name, h in entry.hashes.items()},
    }


def _installed_from_json(use: CertificateUse, data: Mapping[str, Any]) -> InstalledCertificate:
    return InstalledCertificate(
        use,
        str(data["pem"]),
        str(data["fingerprint"]),
        {name: HashData.from_ocpp(h) for name, h in data["hashes"].items()},
    )


class CertificateStore:
    """The charge point's certificates in one directory (mode 0700).

    ``index.json`` (replaced atomically: written aside, fsynced, renamed) holds
    the installed roots of both types with their hash data, the fallback root,
    the pending CSR and the client certificates; ``pending.key`` is the pending
    CSR's private key, ``client/<name>.pem`` / ``client/<name>.key`` the signed
    certificates (chain) and their keys. Key files are created with mode 0600
    and only their paths leave the store.

    ``max_per_type`` is the CertificateStoreMaxLength an installation is held to
    unless it names its own (``install(max_per_type=)``: the profile passes the
    key's value); it counts per type (module docstring). Every method is
    blocking (file writes, key generation): trio code calls the writing ones in
    a worker thread. A lock makes them safe from several threads.
    """

    def __init__(self, directory: Path, *, max_per_type: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_per_type = 1 if max_per_type is None else max_per_type
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        (self.directory / _CLIENT_DIR).mkdir(exist_ok=True)
        os.chmod(self.directory / _CLIENT_DIR, 0o700)
        self._roots: dict[CertificateUse, list[InstalledCertificate]] = {
            use: [] for use in CertificateUse
        }
        self._fallback: InstalledCertificate | None = None
        self._pending: dict[str, Any] | None = None
        self._clients: list[ClientCertificate] = []
        self._renewals: set[str] = set()
        #: Fingerprints of the CentralSystemRootCertificates the current connection
        #: was verified with (M04.FR.06); None: every one counts (unknown).
        self._in_use: set[str] | None = set()
        self._load()

    # -- persistence ------------------------------------------------------------

    @property
    def _index(self) -> Path:
        return self.directory / _INDEX

    def _load(self) -> None:
        try:
            text = self._index.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CertificateError(f"{self._index}: unreadable ({exc.strerror})") from None
        try:
            data = json.loads(text)
            for use in CertificateUse:
                self._roots[use] = [
                    _installed_from_json(use, e) for e in data.get("roots", {}).get(use, [])
                ]
            fallback = data.get("fallback")
            self._fallback = (
                _installed_from_json(CertificateUse.CENTRAL_SYSTEM_ROOT, fallback)
                if fallback
                else None
            )
            self._pending = data.get("pending") or None
            self._clients = [self._client_from_json(c) for c in data.get("clients", [])]
            self._renewals = set(data.get("renewals", []))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Losing the roots silently would lower security: say so instead.
            raise CertificateError(f"{self._index}: not a certificate index ({exc})") from None

    def _client_from_json(self, data: Mapping[str, Any]) -> ClientCertificate:
        name = str(data["name"])
        return ClientCertificate(
            name,
            str(data["serial"]),
            datetime.fromisoformat(data["not_before"]),
            datetime.fromisoformat(data["not_after"]),
            self.directory / _CLIENT_DIR / f"{name}.pem",
            self.directory / _CLIENT_DIR / f"{name}.key",
        )

    def _save(self) -> None:
        data = {
            "version": 1,
            "roots": {
                use.value: [_installed_to_json(e) for e in self._roots[use]]
                for use in CertificateUse
            },
            "fallback": _installed_to_json(self._fallback) if self._fallback else None,
            "pending": self._pending,
            "clients": [
                {
                    "name": c.name,
                    "serial": c.serial,
                    "not_before": c.not_before.isoformat(),
                    "not_after": c.not_after.isoformat(),
                }
                for c in self._clients
            ],
            "renewals": sorted(self._renewals),
        }
        _write_atomically(self._index, json.dumps(data, indent=1).encode("utf-8"), 0o600)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Change the in-memory state and save it; on a failed save, the state
        is read back from disk (what is on disk is what counts)."""
        with self._lock:
            try:
                yield
                self._save()
            except OSError:
                self._reload()
                raise

    def _reload(self) -> None:
        for use in CertificateUse:
            self._roots[use] = []
        self._fallback, self._pending, self._clients, self._renewals = None, None, [], set()
        with contextlib.suppress(CertificateError):
            self._load()

    # -- root certificates (M03, M04, M05) -----------------------------------------

    def installed(self, use: CertificateUse) -> list[InstalledCertificate]:
        with self._lock:
            return list(self._roots[use])

    def installed_ids(self, use: CertificateUse) -> list[HashData]:
        """GetInstalledCertificateIds (M03.FR.04): the SHA256 hash data of each."""
        return [entry.hashes[REPORTED_HASH] for entry in self.installed(use)]

    def roots(self, use: CertificateUse) -> list[bytes]:
        """The installed certificates of ``use``, PEM, oldest first."""
        return [entry.pem.encode("ascii") for entry in self.installed(use)]

    def manufacturer_roots(self) -> list[bytes]:
        """The ManufacturerRootCertificates: what firmware signatures are checked against."""
        return self.roots(CertificateUse.MANUFACTURER_ROOT)

    def central_system_roots(self) -> list[bytes]:
        """The CentralSystemRootCertificates the central system's TLS certificate is
        verified with (the fallback not among them: ``fallback_root``)."""
        return self.roots(CertificateUse.CENTRAL_SYSTEM_ROOT)

    def ca_bundle(self) -> str:
        """``central_system_roots`` as one PEM text (``ssl`` cadata); "" for none."""
        return "".join(entry.pem for entry in self.installed(CertificateUse.CENTRAL_SYSTEM_ROOT))

    def fallback_root(self) -> bytes | None:
        """The CentralSystemRootCertificate replaced under AdditionalRootCertificateCheck
        and kept until the new one has worked (M05.FR.11, M05.FR.13), PEM; or None."""
        with self._lock:
            return self._fallback.pem.encode("ascii") if self._fallback else None

    def install(
        self,
        use: CertificateUse | str,
        pem: str,
        now: datetime,
        *,
        additional_root_check: bool = False,
        max_per_type: int | None = None,
    ) -> Outcome:
        """InstallCertificate (M05): Accepted, Rejected or Failed, with the reason.

        ``additional_root_check``: AdditionalRootCertificateCheck (7.1);
        ``max_per_type``: CertificateStoreMaxLength (default: the store's)."""
        use = CertificateUse(use)
        limit = self.max_per_type if max_per_type is None else max_per_type
        try:
            certs = load_certificates(pem)
            if len(certs) != 1:
                raise InvalidCertificate(f"{len(certs)} certificates; one is installed at a time")
            (cert,) = certs
            if not is_ca(cert):
                raise InvalidCertificate(f"{_subject(cert)}: not a CA certificate")
            check_validity(cert, now)
            check_key_strength(cert)
        except InvalidCertificate as exc:
            return Outcome("Rejected", exc.reason, invalid=True)
        with self._lock:
            installed = self._roots[use]
            fp = fingerprint(cert)
            if any(e.fingerprint == fp for e in installed):
                return Outcome("Accepted", f"{_subject(cert)}: installed already")
            replace = bool(
                additional_root_check and use is CertificateUse.CENTRAL_SYSTEM_ROOT and installed
            )
            replaced: InstalledCertificate | None = None
            try:
                if replace:
                    # M05.FR.09/10: the new root must be signed by the one it replaces.
                    olds = [e for e in installed if signed_by(cert, e.certificate)]
                    if not olds:
                        raise InvalidCertificate(
                            f"{_subject(cert)}: not signed by the installed "
                            "CentralSystemRootCertificate (AdditionalRootCertificateCheck)"
                        )
                    replaced = olds[0]
                    issuer = replaced.certificate
                    _check_signature_hash(cert)
                elif is_self_signed(cert):
                    issuer = cert
                else:
                    found = [e.certificate for e in installed if signed_by(cert, e.certificate)]
                    if not found:
                        raise InvalidCertificate(
                            f"{_subject(cert)}: neither self-signed nor signed by an installed "
                            f"{use.value}"
                        )
                    issuer = found[0]
                    _check_signature_hash(cert)
            except InvalidCertificate as exc:
                return Outcome("Rejected", exc.reason, invalid=True)
            if not replace and len(installed) >= limit:
                # M05.FR.03, counted per type (module docstring).
                return Outcome(
                    "Rejected",
                    f"{use.value}: {len(installed)} installed, "
                    f"CertificateStoreMaxLength is {limit}",
                )
            entry = InstalledCertificate(
                use,
                _pem(cert),
                fp,
                {name: hash_data(cert, issuer, name) for name in HASH_ALGORITHMS},
            )
            try:
                with self._changing():
                    if replaced is not None:
                        # M05.FR.11: installed, the old one kept as the fallback.
                        self._fallback = replaced
                        self._roots[use] = [entry]
                    else:
                        self._roots[use] = [*installed, entry]
            except OSError as exc:
                return Outcome("Failed", f"cannot store it: {exc.strerror or exc}")
        log.info(
            "%s installed: %s (serial %s)",
            use.value,
            _subject(cert),
            serial_hex(cert.serial_number),
        )
        return Outcome("Accepted", f"{use.value} {_subject(cert)} installed", changed=True)

    def delete(self, wanted: HashData) -> Outcome:
        """DeleteCertificate (M04): Accepted, NotFound, or Failed (the root in use,
        M04.FR.06, or the store failing). Only root certificates can match: the
        charge point's own certificate is never deleted this way (M04.FR.05)."""
        with self._lock:
            for use in CertificateUse:
                for entry in self._roots[use]:
                    own = entry.hashes.get(wanted.hash_algorithm.upper())
                    if own is None or not own.matches(wanted):
                        continue
                    if use is CertificateUse.CENTRAL_SYSTEM_ROOT and self._root_in_use(entry):
                        return Outcome(
                            "Failed", f"{_subject(entry.certificate)}: in use for the connection"
                        )
                    try:
                        with self._changing():
                            self._roots[use] = [e for e in self._roots[use] if e is not entry]
                    except OSError as exc:
                        return Outcome("Failed", f"cannot delete it: {exc.strerror or exc}")
                    log.info("%s deleted: %s", use.value, _subject(entry.certificate))
                    return Outcome(
                        "Accepted",
                        f"{use.value} {_subject(entry.certificate)} deleted",
                        changed=True,
                    )
        return Outcome("NotFound", "no installed certificate has this hash data")

    def note_connection(self, peer_chain: Sequence[bytes] | None) -> None:
        """The transport's report of a verified connection (M04.FR.06): the server's
        certificates as it got them (DER, leaf first), or None without TLS."""
        with self._lock:
            if peer_chain is None:
                self._in_use = set()
                return
            peers = []
            for der in peer_chain:
                with contextlib.suppress(ValueError):
                    peers.append(x509.load_der_x509_certificate(der))
            used = set()
            for entry in [
                *self._roots[CertificateUse.CENTRAL_SYSTEM_ROOT],
                *filter(None, [self._fallback]),
            ]:
                root = entry.certificate
                if any(_der(p) == _der(root) or signed_by(p, root) for p in peers):
                    used.add(entry.fingerprint)
            self._in_use = used or None

    def _root_in_use(self, entry: InstalledCertificate) -> bool:
        return self._in_use is None or entry.fingerprint in self._in_use

    def confirm_root(self) -> None:
        """The central system was reached with the new CentralSystemRootCertificate:
        the fallback goes (M05.FR.12)."""
        with self._lock:
            if self._fallback is None:
                return
            with self._changing():
                self._fallback = None
        log.info("CentralSystemRootCertificate confirmed; the fallback removed")

    def revert_root(self) -> None:
        """The new CentralSystemRootCertificate did not verify the central system and
        the fallback did (M05.FR.13): the fallback is the root again, the new one goes."""
        with self._lock:
            fallback = self._fallback
            if fallback is None:
                return
            with self._changing():
                self._roots[CertificateUse.CENTRAL_SYSTEM_ROOT] = [fallback]
                self._fallback = None
        log.warning("CentralSystemRootCertificate reverted to %s", _subject(fallback.certificate))

    # -- the charge point's own certificate (A02, A03) -------------------------------

    def new_csr(
        self,
        common_name: str,
        organization: str,
        *,
        key_type: str = "EC",
        rsa_bits: int = MIN_RSA_BITS,
    ) -> str:
        """A new key pair and its CSR (RFC 2986, PEM), subject CN ``common_name``
        (the serial number, A00.FR.511), O ``organization`` (CpoName, A02.FR.13).

        The private key is written to ``pending.key`` (0600) and replaces any
        earlier pending one: a CertificateSigned for an older CSR no longer fits.
        ``key_type`` "EC" (P-256) or "RSA" (``rsa_bits`` >= 2048)."""
        if not common_name or not organization:
            raise ValueError("the CSR needs a common name and an organization")
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if key_type == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
        elif key_type == "RSA":
            if rsa_bits < MIN_RSA_BITS:
                raise ValueError(f"RSA keys of at least {MIN_RSA_BITS} bits (A00.FR.502)")
            key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        else:
            raise ValueError(f"key type {key_type!r}: EC or RSA")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            ]
        )
        csr = (
            x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self._lock:
            _write_atomically(self.directory / _PENDING_KEY, key_pem, 0o600)
            with self._changing():
                self._pending = {"common_name": common_name, "organization": organization}
        return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def pending(self) -> bool:
        """A CSR was sent and its certificate not yet accepted."""
        with self._lock:
            return self._pending is not None

    def discard_pending(self) -> None:
        """The central system refused the CSR: its key is of no use."""
        with self._lock:
            if self._pending is None:
                return
            with self._changing():
                self._pending = None
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _PENDING_KEY).unlink()

    def accept_signed(self, chain_pem: str, now: datetime) -> ClientCertificate:
        """CertificateSigned (A02.FR.06): the chain checked (module docstring) and
        stored with the pending key; InvalidCertificate otherwise (nothing kept)."""
        chain = load_certificates(chain_pem)
        leaf = chain[0]
        with self._lock:
            pending = self._pending
            if pending is None:
                raise InvalidCertificate("no certificate signing request is pending")
            key_file = self.directory / _PENDING_KEY
            try:
                key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise InvalidCertificate(f"the pending key cannot be read ({exc})") from None
            if _spki(leaf.public_key()) != _spki(key.public_key()):
                raise InvalidCertificate(
                    f"{_subject(leaf)}: its public key is not the one of the pending request"
                )
            _check_leaf(leaf, str(pending["common_name"]))
            check_validity(leaf, now, future_ok=True)
            anchors = [e.certificate for e in self._roots[CertificateUse.CENTRAL_SYSTEM_ROOT]]
            verify_chain(chain, anchors, now)
            client = self._store_client(chain, key_file)
            log.info(
                "client certificate %s accepted, valid %s .. %s",
                client.name,
                client.not_before.isoformat(),
                client.not_after.isoformat(),
            )
            self.prune(now)
            return client

    def _store_client(self, chain: Sequence[x509.Certificate], key_file: Path) -> ClientCertificate:
        leaf = chain[0]
        serial = serial_hex(leaf.serial_number)
        name = f"{leaf.not_valid_before_utc:%Y%m%dT%H%M%SZ}-{serial[-16:]}"
        base = self.directory / _CLIENT_DIR
        client = ClientCertificate(
            name,
            serial,
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            base / f"{name}.pem",
            base / f"{name}.key",
        )
        try:
            _write_atomically(client.cert_path, "".join(_pem(c) for c in chain).encode(), 0o644)
            os.replace(key_file, client.key_path)
            _fsync_dir(base)
            _fsync_dir(self.directory)
            with self._changing():
                self._clients = [c for c in self._clients if c.name != name] + [client]
                self._pending = None
        except OSError as exc:
            raise CertificateError(f"cannot store the certificate: {exc.strerror or exc}") from None
        return client

    def client_certificates(self) -> list[ClientCertificate]:
        with self._lock:
            return list(self._clients)

    def client_in_force(self, now: datetime) -> ClientCertificate | None:
        """The newest certificate, by notBefore, valid at ``now`` (A02.FR.08/09)."""
        now = _aware(now)
        valid = [c for c in self.client_certificates() if c.not_before <= now < c.not_after]
        return max(valid, key=lambda c: c.not_before, default=None)

    def client_certificate(self, now: datetime) -> tuple[Path, Path] | None:
        """(certificate chain file, key file) for security profile 3 at ``now``, or None."""
        client = self.client_in_force(now)
        return (client.cert_path, client.key_path) if client is not None else None

    def next_switch(self, now: datetime) -> datetime | None:
        """When a stored certificate newer than the one in force becomes valid."""
        current = self.client_in_force(now)
        later = [
            c.not_before
            for c in self.client_certificates()
            if c.not_before > now
            and c.not_after > c.not_before
            and (current is None or c.not_before > current.not_before)
        ]
        return min(later, default=None)

    def renewal_time(self, now: datetime) -> datetime | None:
        """When the certificate in force is to be renewed (A03.FR.02: a month before
        its notAfter), None when it needs none: no certificate, a renewal asked for
        already, or a newer certificate stored."""
        current = self.client_in_force(now)
        if current is None or self.next_switch(now) is not None:
            return None
        with self._lock:
            if current.serial in self._renewals:
                return None
        return current.not_after - RENEW_BEFORE

    def renewal_requested(self, serial: str) -> None:
        """A SignCertificate for renewing ``serial`` was Accepted: not again (A03 error
        handling: no automatic retries once the central system has the CSR)."""
        with self._changing():
            self._renewals.add(serial)

    def prune(self, now: datetime) -> None:
        """Remove the client certificates that expired, and those superseded by one
        that has been in force for longer than ``KEEP_SUPERSEDED`` (A02.FR.10)."""
        with self._lock:
            current = self.client_in_force(now)
            keep = []
            for c in self._clients:
                expired = c.not_after <= now
                superseded = (
                    current is not None
                    and c.not_before < current.not_before
                    and now - current.not_before > KEEP_SUPERSEDED
                )
                if expired or superseded:
                    for path in (c.cert_path, c.key_path):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                else:
                    keep.append(c)
            if len(keep) != len(self._clients):
                live = {c.serial for c in keep}
                with self._changing():
                    self._clients = keep
                    self._renewals &= live


def _check_leaf(leaf: x509.Certificate, common_name: str) -> None:
    """The charge point certificate's properties (2.6.1)."""
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise InvalidCertificate(f"{_subject(leaf)}: a CA certificate, not a charge point's")
    names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [common_name]:
        raise InvalidCertificate(f"{_subject(leaf)}: CN is not {common_name!r} (A00.FR.511)")
    if not leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME):
        raise InvalidCertificate(f"{_subject(leaf)}: no O (organizationName, A00.FR.509)")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise InvalidCertificate(f"{_subject(leaf)}: keyUsage without digitalSignature")
    purposes = _extension(leaf, x509.ExtendedKeyUsage)
    if purposes is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
        raise InvalidCertificate(f"{_subject(leaf)}: extendedKeyUsage without clientAuth")
    check_key_strength(leaf)
    _check_signature_hash(leaf)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
