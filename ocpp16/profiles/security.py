"""The certificate part of the OCPP 1.6 Security Whitepaper (edition 3).

Handlers (whitepaper section 5): InstallCertificate (M05), DeleteCertificate
(M04), GetInstalledCertificateIds (M03), CertificateSigned (A02/A03). The CSR
flow (A02): ``sign_charge_point_certificate`` is what the ExtendedTriggerMessage
handler (Remote Trigger, ``ocpp16.profiles.remote_trigger``) calls for
``requestedMessage`` SignChargePointCertificate: it answers Accepted, or
Rejected when CpoName is empty (A02 prerequisite: "CpoName MUST be set") or the
charge point has no serial number to put in the CN; once that answer is on the
wire (``CallChannel.after_answer``) a new key pair is made (A02.FR.02: "after
sending ExtendedTriggerMessage.conf") and SignCertificate sent. The task
"client certificate" (one per connection) renews the certificate in force a
month before its notAfter (A03.FR.02) and says when a stored certificate comes
into force at its notBefore (A02.FR.08).

The rules of the store (hash data, what is accepted, CertificateStoreMaxLength
per type, AdditionalRootCertificateCheck, "in use") are in
``ocpp16.certificates``; this module turns them into answers and events:

* InstallCertificate: the store's Accepted / Rejected / Failed. A refused
  CentralSystemRootCertificate raises InvalidCentralSystemCertificate (the
  compliance test TC_078 expects that event after a Rejected install); a
  refused ManufacturerRootCertificate is only logged (the whitepaper lists no
  event for it). A store full is no invalid certificate: no event.
* CertificateSigned: Accepted, or Rejected and InvalidChargePointCertificate
  (A02.FR.07) for a chain the store refuses (a store that cannot write is
  Rejected and logged, no event: the certificate was not invalid).
* Every change of the stores (a root installed or deleted, a client
  certificate accepted) raises ReconfigurationOfSecurityParameters (section 8:
  "security parameters, such as keys ... were changed").
* Times are the charge point's (``ChargePoint.now``: the central system's
  clock once it has said it), so validity is judged as the central system
  judges it.

The connection side is the transport's: it asks the store for the roots
(``ca_bundle``, ``fallback_root``, ``confirm_root`` / ``revert_root``), the
client certificate (``client_certificate(now)``) and reports the verified
server chain (``note_connection``). ``on_client_certificate`` is called when
the client certificate in force changes (a CertificateSigned whose notBefore
has passed, once its answer is written; or a stored one reaching its
notBefore): with security profile 3 the session reconnects with it (TC_074).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ocpp16.certificates import (
    MIN_RSA_BITS,
    CertificateStore,
    CertificateUse,
    HashData,
    InvalidCertificate,
)
from ocpp16.channel import CallFailed
from ocpp16.errors import CertificateError
from ocpp16.profiles import Handler, Lifetime, Task

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)

#: The longest the "client certificate" task sleeps before looking again: the
#: wall clock can step (a new offset from the central system's currentTime).
RECHECK = 3600.0
#: After a renewal's SignCertificate was refused or not answered.
RENEWAL_RETRY = 24 * 3600.0
#: SecurityEventNotification.req techInfo is string[0..255] (5.15).
TECH_INFO_MAX = 255


def _no_event(event_type: str, tech_info: str | None) -> None:
    """The default ``emit``: no security log (tests, a station without one)."""


def _nothing() -> None:
    """The default ``on_client_certificate``."""


class CertificateManagementProfile:
    """The whitepaper's certificate messages, on a ``CertificateStore``."""

    def __init__(
        self,
        cp: ChargePoint,
        store: CertificateStore,
        *,
        emit: Callable[[str, str | None], None] = _no_event,
        on_client_certificate: Callable[[], None] = _nothing,
        key_type: str = "EC",
        rsa_bits: int = MIN_RSA_BITS,
        additional_root_check: Callable[[], bool] | None = None,
        name: str = "Security",
    ) -> None:
        if key_type not in ("EC", "RSA") or rsa_bits < MIN_RSA_BITS:
            raise ValueError(f"key type {key_type!r} / {rsa_bits} bits: EC, or RSA >= 2048")
        self.cp = cp
        self.store = store
        self._emit_to = emit
        self.on_client_certificate = on_client_certificate
        self.key_type = key_type
        self.rsa_bits = rsa_bits
        self._additional_root_check = additional_root_check or (
            lambda: cp.config.get_bool("AdditionalRootCertificateCheck")
        )
        #: The feature profile name; it appears in SupportedFeatureProfiles.
        self.name = name
        self.handlers: dict[str, Handler] = {
            "InstallCertificate": self.install_certificate,
            "DeleteCertificate": self.delete_certificate,
            "GetInstalledCertificateIds": self.get_installed_certificate_ids,
            "CertificateSigned": self.certificate_signed,
        }
        current = store.client_in_force(cp.now())
        #: The client certificate in force when last looked at (by name).
        self._announced: str | None = current.name if current is not None else None
        self._wake = trio.Event()

    def tasks(self) -> Sequence[Task]:
        return (Task("client certificate", self._watch, Lifetime.CONNECTION),)

    def _emit(self, event_type: str, tech_info: str | None) -> None:
        text = tech_info[:TECH_INFO_MAX] if tech_info else None
        try:
            self._emit_to(event_type, text)
        except Exception:
            # The answer to the central system must not depend on the security log.
            log.exception("security event %s could not be raised", event_type)

    # -- M05, M04, M03 ---------------------------------------------------------------

    async def install_certificate(self, p: dict[str, Any]) -> dict[str, Any]:
        """InstallCertificate (M05)."""
        use = CertificateUse(p["certificateType"])
        install = partial(
            self.store.install,
            use,
            p["certificate"],
            self.cp.now(),
            additional_root_check=self._additional_root_check(),
            max_per_type=self.cp.config.get_int("CertificateStoreMaxLength"),
        )
        outcome = await trio.to_thread.run_sync(install)
        if outcome.status == "Accepted":
            log.info("InstallCertificate: %s", outcome.reason)
            if outcome.changed:
                self._emit("ReconfigurationOfSecurityParameters", outcome.reason)
        else:
            log.warning("InstallCertificate %s: %s: %s", use.value, outcome.status, outcome.reason)
            if outcome.invalid and use is CertificateUse.CENTRAL_SYSTEM_ROOT:
                self._emit("InvalidCentralSystemCertificate", outcome.reason)
        return {"status": outcome.status}

    async def delete_certificate(self, p: dict[str, Any]) -> dict[str, Any]:
        """DeleteCertificate (M04)."""
        wanted = HashData.from_ocpp(p["certificateHashData"])
        outcome = await trio.to_thread.run_sync(self.store.delete, wanted)
        log.info("DeleteCertificate %s: %s", outcome.status, outcome.reason)
        if outcome.changed:
            self._emit("ReconfigurationOfSecurityParameters", outcome.reason)
        return {"status": outcome.status}

    async def get_installed_certificate_ids(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetInstalledCertificateIds (M03): NotFound for none (M03.FR.02)."""
        await trio.lowlevel.checkpoint()
        ids = self.store.installed_ids(CertificateUse(p["certificateType"]))
        if not ids:
            return {"status": "NotFound"}
        return {"status": "Accepted", "certificateHashData": [h.to_ocpp() for h in ids]}

    # -- A02 / A03 ---------------------------------------------------------------

    def sign_charge_point_certificate(self) -> str:
        """For ExtendedTriggerMessage SignChargePointCertificate, from its handler
        (before it returns): "Accepted" (the CSR follows the answer) or "Rejected"."""
        if not self.cp.config.get_str("CpoName"):
            log.info("ExtendedTriggerMessage SignChargePointCertificate: CpoName is empty")
            return "Rejected"
        if not self.cp.identity.serial:
            log.info("ExtendedTriggerMessage SignChargePointCertificate: no serial number")
            return "Rejected"
        self.cp.channel.after_answer("triggered SignCertificate", self._triggered)
        return "Accepted"

    async def _triggered(self) -> None:
        await self.request_certificate("ExtendedTriggerMessage")

    async def request_certificate(self, why: str) -> bool:
        """A new key pair and SignCertificate with its CSR; True when Accepted."""
        organization = self.cp.config.get_str("CpoName")
        serial = self.cp.identity.serial
        if not organization or not serial:
            log.warning("no certificate request (%s): CpoName or serial number empty", why)
            return False
        new_csr = partial(
            self.store.new_csr,
            serial,
            organization,
            key_type=self.key_type,
            rsa_bits=self.rsa_bits,
        )
        try:
            csr = await trio.to_thread.run_sync(new_csr)
        except (OSError, ValueError, CertificateError) as exc:
            log.error("no certificate request (%s): %s", why, exc)
            return False
        try:
            answer = await self.cp.call("SignCertificate", {"csr": csr})
        except CallFailed as exc:
            # The pending key stays: a central system that got the CSR may still
            # answer with CertificateSigned.
            log.warning("SignCertificate (%s) failed: %s", why, exc)
            return False
        if answer.get("status") != "Accepted":
            log.warning("SignCertificate (%s): %s", why, answer.get("status"))
            await trio.to_thread.run_sync(self.store.discard_pending)
            return False
        log.info("SignCertificate (%s) accepted; waiting for CertificateSigned", why)
        return True

    async def certificate_signed(self, p: dict[str, Any]) -> dict[str, Any]:
        """CertificateSigned (A02.FR.06..08)."""
        accept = partial(self.store.accept_signed, p["certificateChain"], self.cp.now())
        try:
            client = await trio.to_thread.run_sync(accept)
        except InvalidCertificate as exc:
            log.warning("CertificateSigned Rejected: %s", exc.reason)
            self._emit("InvalidChargePointCertificate", exc.reason)
            return {"status": "Rejected"}
        except CertificateError as exc:
            log.error("CertificateSigned Rejected: %s", exc.reason)
            return {"status": "Rejected"}
        self._emit(
            "ReconfigurationOfSecurityParameters",
            f"charge point certificate {client.serial} installed, valid from "
            f"{client.not_before.isoformat()}",
        )
        self._wake.set()
        self.cp.channel.after_answer("client certificate in force", self._after_signed)
        return {"status": "Accepted"}

    async def _after_signed(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check_switch(self.cp.now())

    def _check_switch(self, now: datetime) -> None:
        """Tell ``on_client_certificate`` when the certificate in force changed."""
        current = self.store.client_in_force(now)
        name = current.name if current is not None else None
        if name == self._announced:
            return
        self._announced = name
        if current is None:
            log.warning("no client certificate in force any more")
            return
        log.info("client certificate %s in force", current.name)
        self.on_client_certificate()

    async def _watch(self) -> None:
        """The "client certificate" task: switch at notBefore, renew a month before
        notAfter (A03.FR.02), drop what is expired or long superseded."""
        while True:
            now = self.cp.now()
            try:
                await trio.to_thread.run_sync(self.store.prune, now)
            except (OSError, CertificateError) as exc:
                log.error("expired client certificates not removed: %s", exc)
            self._check_switch(now)
            wait = RECHECK
            renew_at = self.store.renewal_time(now)
            if renew_at is not None and now >= renew_at:
                current = self.store.client_in_force(now)
                assert current is not None  # renewal_time says so
                wait = RENEWAL_RETRY
                if await self.request_certificate(f"renewal of {current.serial}"):
                    try:
                        await trio.to_thread.run_sync(self.store.renewal_requested, current.serial)
                        continue
                    except (OSError, CertificateError) as exc:
                        # Not recorded: asked again after RENEWAL_RETRY, not at once.
                        log.error("renewal of %s not recorded: %s", current.serial, exc)
            else:
                for moment in (renew_at, self.store.next_switch(now)):
                    if moment is not None:
                        wait = min(wait, max((moment - now).total_seconds(), 0.0))
            self._wake = trio.Event()
            with trio.move_on_after(wait):
                await self._wake.wait()
