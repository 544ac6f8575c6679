"""ocpp16/certificates.py: the whitepaper's hash data against openssl's own
computation, the root store's rules (M03/M04/M05, CertificateStoreMaxLength per
type, AdditionalRootCertificateCheck with its fallback, the root in use), the
charge point's key pair, CSR and signed certificate (A02/A03), and firmware
signatures (L01) made by cryptography and by openssl.

Certificates are made here with cryptography (``issue``) and trustme; openssl
(the command) is the independent reference: ``openssl ocsp -req_text`` prints
RFC 6960's CertID (issuerNameHash, issuerKeyHash, serial) for a certificate and
its issuer, which is what whitepaper edition 3 section 6.1 defines.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ocpp16.certificates import (
    RENEW_BEFORE,
    CertificateStore,
    CertificateUse,
    HashData,
    InvalidCertificate,
    InvalidSignature,
    hash_data,
    public_key_bits,
    serial_hex,
    verify_firmware_signature,
    verify_signing_certificate,
)
from ocpp16.errors import CertificateError

#: The same instant as tests/chargepoint_rig.EPOCH: "now" in these tests.
NOW = datetime(2026, 5, 1, 8, 58, 20, tzinfo=UTC)
CS = CertificateUse.CENTRAL_SYSTEM_ROOT
MF = CertificateUse.MANUFACTURER_ROOT

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


# ------------------------------------------------------------------ certificates made here


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: Any

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def write(self, path: Path) -> Path:
        path.write_text(self.pem)
        return path

    def key_pem(self) -> bytes:
        data: bytes = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return data


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue(
    common_name: str,
    *,
    issuer: Issued | None = None,
    ca: bool = True,
    key: Any = None,
    public_key: Any = None,
    valid_from: datetime = NOW - timedelta(days=1),
    valid_for: timedelta = timedelta(days=365),
    serial: int | None = None,
    organization: str | None = "Example CPO",
    key_usage: x509.KeyUsage | None = None,
    extended: Sequence[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """A certificate for ``common_name``, signed by ``issuer`` (None: self-signed)."""
    key = key or ec_key()
    subject_key = public_key or key.public_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attributes)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(subject_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_from + valid_for)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    usage = key_usage or x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    builder = builder.add_extension(usage, critical=True)
    if extended is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended)), critical=False)
    signer = issuer.key if issuer else key
    if isinstance(signer, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        cert = builder.sign(signer, hashes.SHA256())
    else:  # pragma: no cover - only EC and RSA keys are made here
        raise TypeError(signer)
    return Issued(cert, key)


def chain_pem(*certs: Issued) -> str:
    return "".join(c.pem for c in certs)


@pytest.fixture
def store(tmp_path: Path) -> CertificateStore:
    return CertificateStore(tmp_path / "certs")


# --------------------------------------------------------------------- openssl's view


def openssl(*args: str, data: bytes | None = None) -> bytes:
    result = subprocess.run(
        ["openssl", *args], input=data, capture_output=True, check=True, timeout=30
    )
    return result.stdout


def openssl_cert_id(issuer: Path, cert: Path, algorithm: str = "SHA256") -> HashData:
    """RFC 6960 CertID as openssl computes it (``openssl ocsp -req_text``)."""
    text = openssl(
        "ocsp",
        f"-{algorithm.lower()}",
        "-issuer",
        str(issuer),
        "-cert",
        str(cert),
        "-req_text",
        "-no_nonce",
    ).decode()
    text = text.replace("\\\n", "")  # long hex values wrap with a backslash

    def field(label: str) -> str:
        match = re.search(rf"{label}: ([0-9A-Fa-f]+)", text)
        assert match is not None, text
        return match.group(1)

    return HashData(
        algorithm, field("Issuer Name Hash"), field("Issuer Key Hash"), field("Serial Number")
    )


def openssl_key_hash(cert: Path) -> str:
    """SHA-256 of the subjectPublicKey BIT STRING contents, found with asn1parse."""
    spki = openssl(
        "pkey",
        "-pubin",
        "-outform",
        "DER",
        data=openssl("x509", "-in", str(cert), "-noout", "-pubkey"),
    )
    listing = openssl("asn1parse", "-inform", "DER", data=spki).decode()
    match = re.search(r"(\d+):d=1\s+hl=(\d+)\s+l=\s*(\d+)\s+prim: BIT STRING", listing)
    assert match is not None, listing
    offset, header, length = (int(g) for g in match.groups())
    bits = spki[offset + header + 1 : offset + header + length]  # after the unused-bits octet
    digest = openssl("dgst", "-sha256", "-r", data=bits).decode().split()[0]
    return digest.upper()


def openssl_serial(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-serial").decode().strip().split("=")[1]


# ------------------------------------------------------------------------- hash data


@needs_openssl
@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_hash_data_of_trustme_roots_and_leaves_is_openssls_cert_id(
    tmp_path: Path, key_type: trustme.KeyType
) -> None:
    ca = trustme.CA(key_type=key_type)
    root_path = tmp_path / "root.pem"
    ca.cert_pem.write_to_path(str(root_path))
    leaf_path = tmp_path / "leaf.pem"
    ca.issue_cert("central.example", key_type=key_type).cert_chain_pems[0].write_to_path(
        str(leaf_path)
    )
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(leaf_path.read_bytes())
    for algorithm in ("SHA256", "SHA384", "SHA512"):
        ours = hash_data(root, None, algorithm)
        theirs = openssl_cert_id(root_path, root_path, algorithm)
        # Both upper case; openssl pads the serial to whole bytes ("0A1B"), 6.1 does not.
        assert (ours.issuer_name_hash, ours.issuer_key_hash) == (
            theirs.issuer_name_hash,
            theirs.issuer_key_hash,
        )
        assert ours.serial_number == theirs.serial_number.lstrip("0")
        assert hash_data(leaf, root, algorithm).matches(
            openssl_cert_id(root_path, leaf_path, algorithm)
        )
    # The key hash is over the BIT STRING's contents, not the SubjectPublicKeyInfo.
    assert hash_data(root).issuer_key_hash == openssl_key_hash(root_path)
    spki = root.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_bits(root) != spki and spki.endswith(public_key_bits(root))


@needs_openssl
def test_serial_numbers_have_no_leading_zeros_where_openssl_pads_them(tmp_path: Path) -> None:
    for serial, text in ((4095, "FFF"), (0x00A1, "A1"), (0x0F00000000000000000001, None)):
        root = issue("Serial CA", serial=serial)
        path = root.write(tmp_path / f"{serial}.pem")
        ours = hash_data(root.cert)
        assert ours.serial_number == (text or format(serial, "X"))
        assert not ours.serial_number.startswith("0")
        printed = openssl_serial(path)
        assert printed.lstrip("0") == ours.serial_number  # openssl pads to whole bytes
        assert ours.matches(openssl_cert_id(path, path))
    assert serial_hex(4095) == "FFF"


@needs_openssl
def test_a_cross_signed_root_is_hashed_with_its_issuers_key(tmp_path: Path) -> None:
    old = issue("Old CPO Root")
    new = issue("New CPO Root", issuer=old)
    old_path, new_path = old.write(tmp_path / "old.pem"), new.write(tmp_path / "new.pem")
    ours = hash_data(new.cert, old.cert)
    assert ours.matches(openssl_cert_id(old_path, new_path))
    assert ours.issuer_key_hash == openssl_key_hash(old_path)
    assert ours.issuer_key_hash != hash_data(new.cert, new.cert).issuer_key_hash


def test_hash_data_compare_case_insensitively_and_ignore_leading_zeros() -> None:
    a = HashData("SHA256", "ABCDEF", "0123AB", "0FFF")
    assert a.matches(HashData("sha256", "abcdef", "0123ab", "fff"))
    assert a.matches(HashData("SHA256", "abcdef", "0123ab", "FFF"))
    assert not a.matches(HashData("SHA384", "abcdef", "0123ab", "FFF"))
    assert not a.matches(HashData("SHA256", "abcdef", "0123ac", "FFF"))
    assert not a.matches(HashData("SHA256", "abcdef", "0123ab", "FFE"))
    assert HashData.from_ocpp(a.to_ocpp()) == a
    with pytest.raises(ValueError, match="MD5"):
        hash_data(issue("x").cert, None, "MD5")


# ------------------------------------------------------------------------ the roots


def test_install_list_and_persist_both_types(store: CertificateStore, tmp_path: Path) -> None:
    cs_root, mf_root = issue("CPO Root"), issue("Manufacturer Root", organization="Maker")
    assert store.installed_ids(CS) == []
    outcome = store.install(CS, cs_root.pem, NOW)
    assert (outcome.status, outcome.changed) == ("Accepted", True)
    # CertificateStoreMaxLength = 1 counts per type: the other type still fits.
    assert store.install(MF, mf_root.pem, NOW).status == "Accepted"
    assert store.installed_ids(CS) == [hash_data(cs_root.cert)]
    assert store.installed_ids(MF) == [hash_data(mf_root.cert)]
    assert store.manufacturer_roots() == [mf_root.pem.encode()]
    assert store.ca_bundle() == cs_root.pem
    # Installing it again: Accepted, nothing changes, no second place taken.
    again = store.install(CS, cs_root.pem, NOW)
    assert (again.status, again.changed) == ("Accepted", False)
    assert len(store.installed(CS)) == 1
    # A second, different one of the same type does not fit (M05.FR.03): no event.
    full = store.install(CS, issue("Other CPO Root").pem, NOW)
    assert (full.status, full.invalid) == ("Rejected", False)
    assert "CertificateStoreMaxLength" in full.reason
    # ...unless the limit allows it.
    assert store.install(CS, issue("Third").pem, NOW, max_per_type=2).status == "Accepted"
    reopened = CertificateStore(tmp_path / "certs")
    assert reopened.installed_ids(CS) == store.installed_ids(CS)
    assert reopened.installed_ids(MF) == store.installed_ids(MF)
    assert stat.S_IMODE(os.stat(tmp_path / "certs").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "certs" / "index.json").st_mode) == 0o600


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: "not a certificate", "not a PEM certificate"),
        (lambda: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "readable"),
        (lambda: chain_pem(issue("A"), issue("B")), "2 certificates"),
        (lambda: issue("Leaf", ca=False).pem, "not a CA"),
        (lambda: issue("Old", valid_from=NOW - timedelta(days=400)).pem, "expired"),
        (lambda: issue("Early", valid_from=NOW + timedelta(days=1)).pem, "not valid before"),
        (
            lambda: (
                issue(
                    "Weak", key=rsa.generate_private_key(public_exponent=65537, key_size=1024)
                ).pem
            ),
            "1024-bit",
        ),
        (lambda: issue("Sub CA", issuer=issue("Unknown Root")).pem, "neither self-signed"),
    ],
)
def test_invalid_certificates_are_rejected(store: CertificateStore, make: Any, why: str) -> None:
    outcome = store.install(CS, make(), NOW)
    assert (outcome.status, outcome.invalid) == ("Rejected", True)
    assert why in outcome.reason
    assert store.installed(CS) == []


def test_a_sub_ca_of_an_installed_root_is_hashed_with_the_roots_key(
    store: CertificateStore,
) -> None:
    root = issue("CPO Root")
    sub = issue("CPO Sub CA", issuer=root)
    assert store.install(CS, root.pem, NOW).status == "Accepted"
    assert store.install(CS, sub.pem, NOW, max_per_type=2).status == "Accepted"
    assert store.installed_ids(CS)[1] == hash_data(sub.cert, root.cert)
    # Its hash data were computed at installation: deleting the root keeps them.
    assert store.delete(hash_data(root.cert)).status == "Accepted"
    assert store.installed_ids(CS) == [hash_data(sub.cert, root.cert)]


def test_delete_by_any_algorithm_not_found_and_the_root_in_use(store: CertificateStore) -> None:
    root, maker = issue("CPO Root"), issue("Maker Root")
    store.install(CS, root.pem, NOW)
    store.install(MF, maker.pem, NOW)
    assert store.delete(hash_data(issue("Stranger").cert)).status == "NotFound"
    # The central system's server certificate was issued by it: in use (M04.FR.06).
    server = issue("central.example", issuer=root, ca=False)
    store.note_connection([server.cert.public_bytes(serialization.Encoding.DER)])
    failed = store.delete(hash_data(root.cert, None, "SHA512"))
    assert failed.status == "Failed" and "in use" in failed.reason
    assert len(store.installed(CS)) == 1
    # A server chain this store cannot place (an intermediate not reported): every
    # root counts as in use.
    other = issue("Other Root")
    stray = issue("central.example", issuer=issue("Intermediate", issuer=other), ca=False)
    store.note_connection([stray.cert.public_bytes(serialization.Encoding.DER)])
    assert store.delete(hash_data(root.cert)).status == "Failed"
    # Without TLS nothing is in use; the hash data are compared case-insensitively.
    store.note_connection(None)
    lower = hash_data(root.cert, None, "SHA384")
    lower = HashData(
        lower.hash_algorithm,
        lower.issuer_name_hash.lower(),
        lower.issuer_key_hash.lower(),
        "000" + lower.serial_number.lower(),
    )
    deleted = store.delete(lower)
    assert (deleted.status, deleted.changed) == ("Accepted", True)
    assert store.installed(CS) == []
    # A ManufacturerRootCertificate is never "in use".
    assert store.delete(hash_data(maker.cert)).status == "Accepted"
    assert store.delete(hash_data(maker.cert)).status == "NotFound"


def test_additional_root_check_replaces_keeps_a_fallback_and_confirms_or_reverts(
    store: CertificateStore, tmp_path: Path
) -> None:
    old = issue("CPO Root 2026")
    assert store.install(CS, old.pem, NOW, additional_root_check=True).status == "Accepted"
    # Not signed by the installed one (M05.FR.10): Rejected, nothing changes.
    stranger = store.install(CS, issue("CPO Root 2027").pem, NOW, additional_root_check=True)
    assert (stranger.status, stranger.invalid) == ("Rejected", True)
    new = issue("CPO Root 2027", issuer=old)
    # Signed by it (M05.FR.11): replaces it (no CertificateStoreMaxLength refusal),
    # the old one kept as the fallback, not reported.
    assert store.install(CS, new.pem, NOW, additional_root_check=True).status == "Accepted"
    assert store.installed_ids(CS) == [hash_data(new.cert, old.cert)]
    assert store.fallback_root() == old.pem.encode()
    assert store.ca_bundle() == new.pem
    assert store.delete(hash_data(old.cert)).status == "NotFound"
    reopened = CertificateStore(tmp_path / "certs")
    assert reopened.fallback_root() == old.pem.encode()
    # Reconnected with the new one (M05.FR.12): the fallback goes.
    store.confirm_root()
    assert store.fallback_root() is None
    assert store.installed_ids(CS) == [hash_data(new.cert, old.cert)]
    # Next rotation, and this time the new root fails where the fallback works
    # (M05.FR.13): the fallback is the root again.
    newer = issue("CPO Root 2028", issuer=new)
    assert store.install(CS, newer.pem, NOW, additional_root_check=True).status == "Accepted"
    store.revert_root()
    assert store.installed_ids(CS) == [hash_data(new.cert, old.cert)]
    assert store.fallback_root() is None
    assert CertificateStore(tmp_path / "certs").ca_bundle() == new.pem


def test_an_unreadable_index_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "index.json").write_text("{not json")
    with pytest.raises(CertificateError, match="not a certificate index"):
        CertificateStore(tmp_path / "certs")


# ------------------------------------------------------------ the charge point's certificate


def csr_of(text: str) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(text.encode())


def sign_csr(
    csr: x509.CertificateSigningRequest,
    ca: Issued,
    *,
    valid_from: datetime = NOW - timedelta(hours=1),
    valid_for: timedelta = timedelta(days=365),
    extended: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> Issued:
    """The certificate authority's part: the CSR's subject and key, signed by ``ca``."""
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    org = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert isinstance(cn, str) and isinstance(org, str)
    return issue(
        cn,
        organization=org,
        issuer=ca,
        ca=False,
        public_key=csr.public_key(),
        valid_from=valid_from,
        valid_for=valid_for,
        extended=extended,
    )


def test_the_csr_has_the_serial_and_cpo_name_and_its_key_stays_in_a_0600_file(
    store: CertificateStore,
) -> None:
    csr = csr_of(store.new_csr("SN-0001", "Example CPO"))
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "O=Example CPO,CN=SN-0001"
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    key_file = store.directory / "pending.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert store.pending
    rsa_csr = csr_of(store.new_csr("SN-0001", "Example CPO", key_type="RSA", rsa_bits=2048))
    rsa_key = rsa_csr.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
    with pytest.raises(ValueError, match="2048"):
        store.new_csr("SN-0001", "Example CPO", key_type="RSA", rsa_bits=1024)
    with pytest.raises(ValueError, match="organization"):
        store.new_csr("SN-0001", "")
    store.discard_pending()
    assert (store.pending, key_file.exists()) == (False, False)


def test_a_signed_chain_is_accepted_stored_and_used_from_its_not_before(
    store: CertificateStore, tmp_path: Path
) -> None:
    root = issue("CPO Root")
    sub = issue("CPO Sub CA", issuer=root)
    store.install(CS, root.pem, NOW)
    leaf = sign_csr(csr_of(store.new_csr("SN-0001", "Example CPO")), sub)
    client = store.accept_signed(chain_pem(leaf, sub), NOW)
    assert not store.pending
    assert store.client_certificate(NOW) == (client.cert_path, client.key_path)
    assert stat.S_IMODE(os.stat(client.key_path).st_mode) == 0o600
    stored = x509.load_pem_x509_certificates(client.cert_path.read_bytes())
    assert stored == [leaf.cert, sub.cert]
    assert client.serial == serial_hex(leaf.cert.serial_number)
    # A second one, valid from tomorrow: accepted, used from then (A02.FR.08), the
    # newest in force wins (A02.FR.09).
    tomorrow = NOW + timedelta(days=1)
    later = sign_csr(csr_of(store.new_csr("SN-0001", "Example CPO")), root, valid_from=tomorrow)
    second = store.accept_signed(later.pem, NOW)
    assert store.client_in_force(NOW) == client
    assert store.next_switch(NOW) == tomorrow
    assert store.client_in_force(tomorrow) == second
    assert store.next_switch(tomorrow) is None
    assert CertificateStore(tmp_path / "certs").client_certificate(tomorrow) == (
        second.cert_path,
        second.key_path,
    )
    # A02.FR.10: the superseded one is kept a month, then removed; expired ones too.
    store.prune(tomorrow + timedelta(days=29))
    assert client.cert_path.exists()
    store.prune(tomorrow + timedelta(days=31))
    assert not client.cert_path.exists() and not client.key_path.exists()
    assert store.client_certificates() == [second]
    store.prune(tomorrow + timedelta(days=366))
    assert store.client_certificates() == [] and store.client_certificate(NOW) is None


def test_renewal_a_month_before_not_after_once(store: CertificateStore) -> None:
    root = issue("CPO Root")
    store.install(CS, root.pem, NOW)
    assert store.renewal_time(NOW) is None  # no certificate
    leaf = sign_csr(csr_of(store.new_csr("SN-0001", "CPO")), root, valid_for=timedelta(days=90))
    client = store.accept_signed(leaf.pem, NOW)
    assert store.renewal_time(NOW) == client.not_after - RENEW_BEFORE
    store.renewal_requested(client.serial)
    assert store.renewal_time(NOW) is None
    # A newer certificate stored (not yet in force) needs no renewal either.
    store2 = CertificateStore(store.directory.parent / "other")
    store2.install(CS, root.pem, NOW)
    first = store2.accept_signed(sign_csr(csr_of(store2.new_csr("SN-0001", "CPO")), root).pem, NOW)
    assert store2.renewal_time(NOW) == first.not_after - RENEW_BEFORE
    store2.accept_signed(
        sign_csr(
            csr_of(store2.new_csr("SN-0001", "CPO")), root, valid_from=NOW + timedelta(days=300)
        ).pem,
        NOW,
    )
    assert store2.renewal_time(NOW) is None


def refused(store: CertificateStore, chain: str, now: datetime = NOW) -> str:
    with pytest.raises(InvalidCertificate) as caught:
        store.accept_signed(chain, now)
    assert store.client_certificates() == []
    return caught.value.reason


def test_what_certificate_signed_refuses(store: CertificateStore) -> None:
    root = issue("CPO Root")
    assert "no certificate signing request" in refused(store, issue("x", ca=False).pem)
    store.install(CS, root.pem, NOW)
    csr = csr_of(store.new_csr("SN-0001", "Example CPO"))
    assert "not a PEM" in refused(store, "garbage")
    # Another key than the CSR's (TC_077).
    assert "public key" in refused(
        store,
        issue("SN-0001", issuer=root, ca=False, extended=[ExtendedKeyUsageOID.CLIENT_AUTH]).pem,
    )
    assert "expired" in refused(
        store,
        sign_csr(csr, root, valid_from=NOW - timedelta(days=30), valid_for=timedelta(days=1)).pem,
    )
    assert "not an installed root" in refused(store, sign_csr(csr, issue("Stranger Root")).pem)
    sub = issue("Sub", issuer=issue("Stranger Root"))
    assert "not an installed root" in refused(store, chain_pem(sign_csr(csr, sub), sub))
    # The chain given is in the wrong order: not signed by the next one.
    sub2 = issue("Sub", issuer=root)
    assert "next certificate" in refused(store, chain_pem(sign_csr(csr, sub2), root, sub2))
    assert "clientAuth" in refused(
        store, sign_csr(csr, root, extended=[ExtendedKeyUsageOID.SERVER_AUTH]).pem
    )
    wrong_cn = issue(
        "SN-9999",
        issuer=root,
        ca=False,
        public_key=csr.public_key(),
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    assert "CN" in refused(store, wrong_cn.pem)
    no_org = issue("SN-0001", issuer=root, ca=False, public_key=csr.public_key(), organization=None)
    assert "organizationName" in refused(store, no_org.pem)
    assert store.pending  # still waiting for the right one
    assert store.accept_signed(sign_csr(csr, root).pem, NOW).serial


def test_no_central_system_root_installed_nothing_to_verify_against(
    store: CertificateStore,
) -> None:
    root = issue("CPO Root")
    csr = csr_of(store.new_csr("SN-0001", "Example CPO"))
    # Even with its root in the chain: the chain cannot vouch for itself.
    assert "no root certificate installed" in refused(store, chain_pem(sign_csr(csr, root), root))


# ------------------------------------------------------------------------- firmware


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "evse-1.3.0.tar"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # more than one read chunk
    return path


def digest_of(path: Path) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(path.read_bytes())
    return h.finalize()


def test_firmware_signatures_rsa_pss_pkcs1_and_ecdsa(image: Path) -> None:
    maker = issue("Maker Root", organization="Maker")
    rsa_signer = issue(
        "Firmware Signing",
        issuer=maker,
        ca=False,
        key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )
    ec_signer = issue("Firmware Signing EC", issuer=maker, ca=False)
    roots = [maker.pem.encode()]
    digest, pre = digest_of(image), Prehashed(hashes.SHA256())
    signatures = [
        (
            rsa_signer,
            rsa_signer.key.sign(
                digest, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), pre
            ),
        ),
        (
            rsa_signer,
            rsa_signer.key.sign(digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32), pre),
        ),
        (rsa_signer, rsa_signer.key.sign(digest, padding.PKCS1v15(), pre)),
        (ec_signer, ec_signer.key.sign(digest, ec.ECDSA(pre))),
    ]
    r, s = decode_dss_signature(signatures[-1][1])
    signatures.append((ec_signer, r.to_bytes(32, "big") + s.to_bytes(32, "big")))
    for signer, signature in signatures:
        verify_firmware_signature(
            image, base64.b64encode(signature).decode(), signer.pem, roots, now=NOW
        )
        # One byte more in the file: not this signature any more.
        tampered = image.with_suffix(".tampered")
        tampered.write_bytes(image.read_bytes() + b"\0")
        with pytest.raises(InvalidSignature) as caught:
            verify_firmware_signature(
                tampered, base64.b64encode(signature).decode(), signer.pem, roots, now=NOW
            )
        assert caught.value.kind == "InvalidSignature"
    # The signing certificate may be the installed root itself, where its keyUsage
    # allows signatures.
    both = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    signing_root = issue("Maker Signing Root", key_usage=both)
    own = base64.b64encode(signing_root.key.sign(digest, ec.ECDSA(pre))).decode()
    verify_firmware_signature(image, own, signing_root.pem, [signing_root.pem.encode()], now=NOW)
    with pytest.raises(InvalidCertificate, match="keyUsage"):
        verify_firmware_signature(image, own, maker.pem, roots, now=NOW)


@needs_openssl
def test_firmware_signed_by_openssl_verifies(image: Path, tmp_path: Path) -> None:
    maker = issue("Maker Root", organization="Maker")
    for name, key in (
        ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=3072)),
        ("ec", ec_key()),
    ):
        signer = issue(f"Firmware Signing {name}", issuer=maker, ca=False, key=key)
        key_path = tmp_path / f"{name}.key"
        key_path.write_bytes(signer.key_pem())
        options = ["-sigopt", "rsa_padding_mode:pss"] if name == "rsa" else []
        signature = openssl("dgst", "-sha256", "-sign", str(key_path), *options, str(image))
        verify_firmware_signature(
            image, base64.b64encode(signature).decode(), signer.pem, [maker.pem.encode()], now=NOW
        )
        plain = openssl("dgst", "-sha256", "-sign", str(key_path), str(image))
        verify_firmware_signature(
            image, base64.b64encode(plain).decode(), signer.pem, [maker.pem.encode()], now=NOW
        )


def test_firmware_signing_certificate_refusals(image: Path) -> None:
    maker = issue("Maker Root", organization="Maker")
    signer = issue("Firmware Signing", issuer=maker, ca=False)
    good = base64.b64encode(
        signer.key.sign(digest_of(image), ec.ECDSA(Prehashed(hashes.SHA256())))
    ).decode()
    roots = [maker.pem.encode()]

    def invalid_certificate(pem: str, roots: list[bytes] = roots, now: datetime = NOW) -> str:
        with pytest.raises(InvalidCertificate) as caught:
            verify_firmware_signature(image, good, pem, roots, now=now)
        assert caught.value.kind == "InvalidCertificate"
        return caught.value.reason

    assert "no ManufacturerRootCertificate" in invalid_certificate(signer.pem, [])
    assert "not a PEM" in invalid_certificate("junk")
    other = issue("Other Maker Root")
    assert "not signed by an installed" in invalid_certificate(signer.pem, [other.pem.encode()])
    assert "expired" in invalid_certificate(signer.pem, now=NOW + timedelta(days=400))
    # No intermediates (L01 remark): a signer one level further down is refused.
    middle = issue("Maker Intermediate", issuer=maker)
    deep = issue("Firmware Signing", issuer=middle, ca=False, key=signer.key)
    assert "not signed by an installed" in invalid_certificate(chain_pem(deep, middle))
    no_signing = issue(
        "Firmware Signing",
        issuer=maker,
        ca=False,
        key=signer.key,
        key_usage=x509.KeyUsage(False, False, True, False, False, False, False, False, False),
    )
    assert "keyUsage" in invalid_certificate(no_signing.pem)
    for text, why in (("not base64!", "not Base64"), ("", "empty")):
        with pytest.raises(InvalidSignature, match=why):
            verify_firmware_signature(image, text, signer.pem, roots, now=NOW)
    # Another key's signature over the same file.
    stranger = base64.b64encode(
        ec_key().sign(digest_of(image), ec.ECDSA(Prehashed(hashes.SHA256())))
    ).decode()
    with pytest.raises(InvalidSignature):
        verify_firmware_signature(image, stranger, signer.pem, roots, now=NOW)
    verify_firmware_signature(image, good, signer.pem, roots, now=NOW)
    # The certificate alone, as SignedUpdateFirmware is answered (L01.FR.23).
    assert verify_signing_certificate(signer.pem, roots, now=NOW) == signer.cert
    with pytest.raises(InvalidCertificate, match="not signed by an installed"):
        verify_signing_certificate(signer.pem, [other.pem.encode()], now=NOW)
    assert issubclass(InvalidSignature, CertificateError) and issubclass(
        InvalidCertificate, CertificateError
    )
