"""The station's configuration keys: one registry for OCPP and the installer.

Theory of operation
-------------------
``KEYS`` declares every registry setting once, as ``ocpp16.settings.Key``
(the one declaration type, shared with the TOML file's table in
``ops.config``): its name, kind, default, range, access, whether it needs a
restart, whether the central system sees it, its local installer name, the
TOML setting that seeds it (``file``), and a description (the EVerest
manifest idea). Everything else reads that table: ChangeConfiguration and
GetConfiguration (OCPP 1.6 §5.3, §5.8, §9.1), the installer's settings page
(station-spec §3), ``evse config``, validation, persistence and the texts
shown to people.

A value lives in the station's settings store under ``ocpp.<Name>`` as its
canonical OCPP text ("true", "3600", "Energy.Active.Import.Register,Voltage").
An unset key has its default. Read-only keys are facts about this firmware and
always report their default, whatever the store holds.

The same value has up to two names: the OCPP name (``HeartbeatInterval``) and a
local installer name (``monitoring.connection_check_frequency`` is
``WebSocketPingInterval``). The central system (``source=OCPP``) reaches only
the keys marked ``ocpp`` and only by OCPP name; a local source ("installer",
"cli") reaches every key by either name. Either way one value changes.

A change is validated completely before anything is written: the key exists
for that source, it is writable, the text parses and is in range, the file a
path names exists and holds the right kind of PEM (``Key.verify``), a
``monotonic`` key is not lowered, and the rules that relate keys to each other
hold (a security profile needs its credentials, a client key its
certificate). Then every changed key is written with ONE ``set_settings``
call, which the store makes all-or-nothing, so a Rejected change, or a store
that fails, leaves everything as it was. Only after the write are the cached
values replaced and the subscribers told.

The central system's ChangeConfiguration goes through ``central_system_change``:
the same rules, plus what a SecurityProfile raise implies (Security Whitepaper
ed. 3; docs/security.md). A raise from 0/1 to 2/3 also switches a ws://
CentralSystemAddress to wss:// (``tls_address``: OCPP has no key for it), and
every raise is put on trial (``ProfileTrial``, stored with it in one write):
the charge point restores the previous profile and address if the new one does
not connect within SecurityProfileFallbackTime (``end_profile_trial``), the one
way SecurityProfile ever goes down. With ``credentials`` given, a profile's
prerequisites (root certificate, client certificate) are checked too.

The file and the command line: a few keys take their first value from the
TOML file (``Key.file``: FallbackLimit from ``limits.fallback``, ChargePointId
from ``station.id``, ...). ``seed`` applies them at every start by one rule,
with the file value last seeded from kept in the store: a file that changed
wins, and says so; an unchanged file leaves a value changed since by the
central system or the installer in force (see ``seed``). ``override`` puts
values given on the command line in force for one run without storing them.
``source`` tells which of these a value in force comes from.

Key names are CiString50Type and values CiString500Type (OCPP 1.6 §6.9 and
the CiString types of §7: "case insensitive"). So ``heartbeatinterval`` finds
HeartbeatInterval, and "TRUE", "rst" or "voltage" are accepted and stored in
the canonical spelling; free text (CpoName, AuthorizationKey) is kept exactly
as given.

Maxima learned at open: a key's declared range is what the firmware allows
anywhere; a station may allow less (FallbackLimit: never above the installer
maximum or the board's maximum, ``evse.limits.fallback_max``). Whoever opens
the registry for a station passes those as ``maxima`` (ops.config's
``registry_maxima``); they narrow the key's range for every source, so a
change above one is Rejected and nothing changes, and the installer page
shows the narrowed range. They are also kept in the store (``bound.<Name>``),
so a registry opened without them (``evse config set`` while no station
runs) keeps refusing what the station would. A value stored before a maximum
was lowered reads as the maximum (logged): never above it, and not silently
back at the default.

Restarts: OCPP answers RebootRequired when a change takes effect only after
a restart. This firmware applies every key live, so none does: the components
read their values on each use or subscribe (the OCPP session reconnects by
itself when the address, identity, credentials, certificate or security
profile change, which the Security Whitepaper asks for after a profile
change). ``Key.reboot_required`` stays for a key that ever has to be read at
start only; a component that cannot follow a key live must set it.

Threads: ``value()`` and friends read an in-memory copy and never touch the
store. ``change`` and ``change_many`` write synchronously (SQLite with a full
fsync); trio code uses ``change_async`` / ``change_many_async``, which run the
write in a worker thread and call the subscribers back in the trio task.
Writes are serialized by a lock, so a monotonic check always sees the latest
value.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import trio

from ocpp16.errors import CallError, ConfigRejected
from ocpp16.settings import (
    MAX_VALUE_LENGTH,
    SECRET_SET,
    SECRET_UNSET,
    Access,
    Key,
    Kind,
    Owner,
    Value,
    format_number,
    key_matches_certificate,
    verify_ca_certificate,
    verify_client_certificate,
    verify_private_key,
)

__all__ = [
    "BOUND_PREFIX",
    "GROUPS",
    "KEYS",
    "KEY_BY_NAME",
    "MAX_VALUE_LENGTH",
    "OCPP",
    "SECRET_SET",
    "SECRET_UNSET",
    "SEED_PREFIX",
    "STORE_PREFIX",
    "Access",
    "ChangeResult",
    "Configuration",
    "Key",
    "Kind",
    "Owner",
    "Seeded",
    "Value",
]

log = logging.getLogger(__name__)

#: Settings-store keys are this prefix and the OCPP name.
STORE_PREFIX: Final = "ocpp."

#: Settings-store keys of the maxima a station gave (``Configuration(maxima=)``).
BOUND_PREFIX: Final = "bound."

#: The ``source`` of a change made by the central system.
OCPP: Final = "ocpp"

#: Settings-store key of a security profile raise on trial (``ProfileTrial``).
TRIAL_KEY: Final = "trial.SecurityProfile"

#: How the AuthorizationKey becomes the Basic auth password (the
#: BasicAuthPasswordForm key; ``ocpp16.transport.basic_auth_password``).
AUTHORIZATION_KEY_FORMS: Final = ("hex", "literal")

#: OCPP 1.6 §7 ConfigurationStatus.
ConfigurationStatus = Literal["Accepted", "Rejected", "RebootRequired", "NotSupported"]

Listener = Callable[[str, Value], None]

#: Settings-store keys of the file values the registry was last seeded from
#: (``Configuration.seed``), by OCPP name.
SEED_PREFIX: Final = "seed."

#: Where a value in force comes from (``Configuration.source``).
Source = Literal["default", "file", "registry", "command line"]


# --- rules beyond a kind's own checks ----------------------------------------

#: Characters the identity may contain. The identity is the last URL segment
#: and, with security profiles 1 and 2, the HTTP Basic user-id, which RFC 7617
#: §2 forbids to contain ':'; so printable ASCII without whitespace, '/', ':'.
_IDENTITY: Final = re.compile(r"[!-.0-9;-~]{1,48}")


def _charge_point_id(text: str) -> str:
    if not text or _IDENTITY.fullmatch(text) is not None:
        return text
    # The first thing wrong, said so that the installer knows what to fix (the
    # same words for the file's station.id, which seeds this key).
    if "/" in text:
        raise ValueError(f"{text!r} contains '/' (it is the last segment of the URL)")
    if any(c.isspace() for c in text):
        raise ValueError(f"{text!r} contains whitespace (it is the last segment of the URL)")
    if ":" in text:
        raise ValueError(f"{text!r} contains ':' (the HTTP Basic user-id cannot, RFC 7617)")
    if not text.isascii():
        raise ValueError(f"{text!r} has a character that is not printable ASCII")
    raise ValueError(f"{text!r} is not 1..48 printable ASCII characters")


def _authorization_key(text: str) -> str:
    # Never echo the text: it is a password.
    if not all(" " <= c <= "~" for c in text):
        raise ValueError("the key has a character that is not printable ASCII")
    return text


_R = Access.R

#: Every key. Order: station-spec §2 as published, then the OCPP 1.6 keys the
#: spec adds, then the installer-only settings of §3. GetConfiguration with no
#: names lists the OCPP keys in this order.
KEYS: Final[tuple[Key, ...]] = (
    # -- station-spec §2 (OCPP 1.6 §9.1 Core, §9.2 LocalAuthList, §9.4 SmartCharging,
    #    and the Security Whitepaper ed. 3 keys) --
    Key(
        "AllowOfflineTxForUnknownId",
        Kind.BOOL,
        "false",
        "Offline, start a transaction for an id tag the station does not know.",
    ),
    Key(
        "AuthorizeRemoteTxRequests",
        Kind.BOOL,
        "true",
        "Authorize the id tag of a RemoteStartTransaction like a local one first.",
    ),
    Key(
        "AuthorizationCacheEnabled",
        Kind.BOOL,
        "true",
        "Keep the answers to Authorize in the authorization cache (at most 20 entries).",
    ),
    Key(
        "ClockAlignedDataInterval",
        Kind.INT,
        "3600",
        "Interval of the clock-aligned meter values, aligned to midnight.",
        lo=300,
        hi=86400,
        zero_disables=True,
        unit="s",
    ),
    Key(
        "ConnectionTimeOut",
        Kind.INT,
        "120",
        "How long an authorized user has to plug in before the authorization lapses.",
        lo=1,
        hi=3600,
        unit="s",
        file="authorization.connection_timeout",
    ),
    Key(
        "ConnectorPhaseRotation",
        Kind.CHOICE,
        "Unknown",
        "Phase rotation of the connector relative to the grid connection.",
        choices=("Unknown", "RST", "RTS", "SRT", "STR", "TRS", "TSR"),
    ),
    Key(
        "GetConfigurationMaxKeys",
        Kind.INT,
        "60",
        "Most key names one GetConfiguration may ask for.",
        access=_R,
    ),
    Key(
        "HeartbeatInterval",
        Kind.INT,
        "3600",
        "Interval of Heartbeat when nothing else was sent.",
        lo=60,
        hi=86400,
        unit="s",
    ),
    Key(
        "LocalAuthorizeOffline",
        Kind.BOOL,
        "false",
        "Offline, start a transaction for an id tag the cache or local list accepts.",
    ),
    Key(
        "LocalPreAuthorize",
        Kind.BOOL,
        "true",
        "Online, start at once for an id tag the cache or local list accepts.",
    ),
    Key(
        "MeterValuesAlignedData",
        Kind.MEASURANDS,
        "",
        "Measurands of the clock-aligned meter values.",
    ),
    Key(
        "MeterValuesSampledData",
        Kind.MEASURANDS,
        "Energy.Active.Import.Register",
        "Measurands sampled during a transaction (measurement toggles).",
        installer="metering.measurands",
    ),
    Key(
        "MeterValueSampleInterval",
        Kind.INT,
        "3600",
        "Interval of the sampled meter values during a transaction.",
        # 84600 as the reference publishes it (86400 was likely meant); kept,
        # since "the same defaults, ranges and limits" is the requirement.
        lo=5,
        hi=84600,
        # 0: no sampled data (OCPP 1.6 9.1.19; station-spec 2).
        zero_disables=True,
        unit="s",
        installer="metering.interval",
    ),
    Key("NumberOfConnectors", Kind.INT, "1", "Connectors of this station.", access=_R),
    Key(
        "ResetRetries",
        Kind.INT,
        "10",
        "Attempts at a reset that did not succeed.",
        lo=0,
        hi=10,
    ),
    Key(
        "StopTransactionOnEVSideDisconnect",
        Kind.BOOL,
        "true",
        # RW as OCPP 1.6 9.1.27 has it (read-only in the reference; station-spec 2).
        "Unplugging at the vehicle stops the transaction (false: it is suspended"
        " until the cable is plugged in again).",
    ),
    Key(
        "StopTransactionOnInvalidId",
        Kind.BOOL,
        "false",
        "Stop a running transaction whose id tag the central system finds invalid.",
    ),
    Key(
        "StopTxnAlignedData",
        Kind.MEASURANDS,
        "",
        # RW as OCPP 1.6 9.1.28 has it (read-only in the reference; station-spec 2).
        "Clock-aligned measurands in StopTransaction's transactionData.",
    ),
    Key(
        "StopTxnSampledData",
        Kind.MEASURANDS,
        "",
        "Sampled measurands in StopTransaction's transactionData.",
    ),
    Key(
        "TransactionMessageAttempts",
        Kind.INT,
        "3",
        "Failed sends of a transaction message before it is given up.",
        lo=1,
        hi=100,
        installer="data_sending.max_failed_attempts",
    ),
    Key(
        "TransactionMessageRetryInterval",
        Kind.INT,
        "20",
        "Wait after a failed send before the next attempt (multiplied by the attempt number).",
        lo=5,
        hi=60,
        unit="s",
        installer="data_sending.retry_interval",
    ),
    Key(
        "UnlockConnectorOnEVSideDisconnect",
        Kind.BOOL,
        "true",
        "Unlock the socket when the vehicle side is unplugged.",
    ),
    Key(
        "WebSocketPingInterval",
        Kind.INT,
        "10",
        "Interval of the websocket pings that check the link to the central system.",
        lo=1,
        hi=1200,
        unit="s",
        installer="monitoring.connection_check_frequency",
    ),
    Key("LocalAuthListEnabled", Kind.BOOL, "true", "Use the local authorization list."),
    Key(
        "LocalAuthListMaxLength",
        Kind.INT,
        "50",
        "Most entries the local list holds.",
        access=_R,
    ),
    Key(
        "SendLocalListMaxLength",
        Kind.INT,
        "10",
        "Most entries one SendLocalList may carry.",
        access=_R,
    ),
    Key(
        "ChargeProfileMaxStackLevel",
        Kind.INT,
        "5",
        "Highest stackLevel of a charging profile.",
        access=_R,
    ),
    Key(
        "ChargingScheduleAllowedChargingRateUnit",
        Kind.STR,
        "Current",
        "Rate units a charging schedule may use.",
        access=_R,
    ),
    Key(
        "ChargingScheduleMaxPeriods",
        Kind.INT,
        "5",
        "Most periods in one charging schedule.",
        access=_R,
    ),
    Key(
        "MaxChargingProfilesInstalled",
        Kind.INT,
        "9",
        "Most charging profiles installed at once.",
        access=_R,
    ),
    Key(
        "SupportedFileTransferProtocols",
        Kind.STR,
        "HTTP,HTTPS,FTP",
        "Protocols for diagnostics upload and firmware download.",
        access=_R,
    ),
    Key(
        "SecurityProfile",
        Kind.INT,
        "0",
        "OCPP security profile: 0 none, 1 Basic auth, 2 TLS + Basic auth, 3 TLS with a "
        "client certificate. May only be raised. A change reconnects the session.",
        lo=0,
        hi=3,
        monotonic=True,
        # Not on the §3 page of the reference, but the access key is useless
        # without a profile that sends it, so the installer can raise it too.
        installer="security.profile",
    ),
    Key("CpoName", Kind.STR, "", "The operator's name, for its certificates.", lo=0, hi=128),
    Key(
        "AdditionalRootCertificateCheck",
        Kind.BOOL,
        "false",
        "Check a new central system root certificate against the old one (not supported).",
        access=_R,
    ),
    Key(
        "CertificateStoreMaxLength",
        Kind.INT,
        "1",
        "Most root certificates the station keeps.",
        access=_R,
    ),
    Key(
        "AuthorizationKey",
        Kind.STR,
        "",
        "HTTP Basic authentication password for the central system (security profiles "
        "1 and 2), in hex: 32..40 hex digits are the 16..20 bytes sent (Security "
        "Whitepaper; BasicAuthPasswordForm literal sends the text itself). Write-only: "
        "never shown. A change reconnects the session.",
        access=Access.W,
        lo=32,
        hi=40,
        rule=_authorization_key,
        rule_text="printable ASCII",
        installer="security.access_key",
    ),
    # -- OCPP 1.6 §9.1 keys station-spec §2 asks for where the reference is silent --
    # Not a declared fact: the OCPP session answers GetConfiguration with exactly
    # the feature profiles registered with it (ocpp16.profiles), so a profile
    # that would answer NotSupported is never advertised. This default is what
    # is read without a session (evse config get): the one profile always there.
    Key(
        "SupportedFeatureProfiles",
        Kind.STR,
        "Core",
        "Feature profiles the station offers (the OCPP session reports the ones it runs).",
        access=_R,
    ),
    Key(
        "MinimumStatusDuration",
        Kind.INT,
        "0",
        "How long a status must hold before StatusNotification reports it (0: at once).",
        # OCPP gives no bound; an hour keeps a fault from being hidden for long.
        lo=0,
        hi=3600,
        unit="s",
    ),
    Key(
        "ConnectorSwitch3to1PhaseSupported",
        Kind.BOOL,
        "false",
        "The connector cannot switch between three phases and one during a session.",
        access=_R,
    ),
    # OCPP 1.6 §9.5 (Reservation profile). true: with one connector, "any connector
    # of the charge point" (ReserveNow connectorId 0) can only be connector 1, so a
    # reservation on 0 is the same as one on 1 (same answers, Reserved shown on 1)
    # and central systems that reserve the charge point rather than a connector
    # are served; false would only refuse them (Rejected) for nothing.
    Key(
        "ReserveConnectorZeroSupported",
        Kind.BOOL,
        "true",
        "ReserveNow may name connector 0 (the charge point): its one connector is reserved.",
        access=_R,
    ),
    # -- installer-only settings, station-spec §3 --
    Key(
        "Protocol",
        Kind.STR,
        "OCPP 1.6 JSON",
        "Protocol to the central system (the only one this firmware ships).",
        access=_R,
        ocpp=False,
        installer="connection.protocol",
    ),
    Key(
        "ConnectionEnabled",
        Kind.BOOL,
        "true",
        "Connect to the central system; off closes the session and keeps it closed.",
        ocpp=False,
        installer="connection.enabled",
    ),
    Key(
        "CentralSystemAddress",
        Kind.URL,
        "",
        "The central system's ws:// or wss:// URL, ending in '/'; the charge point id is "
        "appended. Empty: none configured (no connection).",
        ocpp=False,
        installer="connection.central_system_address",
        file="connection.central_system_address",
    ),
    Key(
        "ChargePointId",
        Kind.STR,
        "",
        "Charge point id: the last segment of the URL and the Basic auth user. "
        "Empty: the station's serial number.",
        lo=0,
        hi=48,
        rule=_charge_point_id,
        rule_text="printable ASCII, no whitespace, '/' or ':'; empty: the serial number",
        ocpp=False,
        installer="connection.charge_point_id",
        file="station.id",
    ),
    Key(
        "CentralSystemRootCertificate",
        Kind.PATH,
        "",
        "PEM file of the central system's root certificate (TLS, security profiles 2 "
        "and 3). Empty: none.",
        ocpp=False,
        installer="security.certificate",
        rule_text="a PEM CA certificate",
        verify=verify_ca_certificate,
    ),
    Key(
        "ChargePointCertificate",
        Kind.PATH,
        "",
        "PEM file of this charge point's client certificate chain, presented in TLS "
        "(security profile 3). Empty: none.",
        ocpp=False,
        installer="security.client_certificate",
        rule_text="a PEM certificate (chain)",
        verify=verify_client_certificate,
    ),
    Key(
        "ChargePointPrivateKey",
        Kind.PATH,
        "",
        "PEM file of the private key of the client certificate (security profile 3). Empty: none.",
        ocpp=False,
        installer="security.client_key",
        rule_text="an unencrypted PEM private key",
        verify=verify_private_key,
    ),
    Key(
        "FallbackLimit",
        Kind.FLOAT,
        # evse.limits.MIN_CURRENT (ocpp16 may not import evse; tests/test_limits.py
        # checks that the two agree).
        "6",
        "Current applied when the central system cannot be reached and no limit can be "
        "obtained, and the failsafe current of a board with a hardware watchdog. Never "
        "above the installer maximum or the board's maximum (a higher value is Rejected). "
        "Below 6 A means 0 A: no charging (IEC 61851-1: 6 A is the lowest offer).",
        lo=0,
        hi=80,
        unit="A",
        # A vendor key (OCPP 1.6 §9: a charge point may add its own): the
        # central system sees it and may change it, by the same rule as the
        # installer (never above the installer or the board maximum).
        installer="monitoring.fallback_limit",
        file="limits.fallback",
    ),
    # -- security profile and Basic auth rules of this firmware (docs/security.md);
    #    set with `evse config set` (not on the section 3 page, not seen by OCPP) --
    Key(
        "BasicAuthPasswordForm",
        Kind.CHOICE,
        "hex",
        "How the AuthorizationKey becomes the HTTP Basic password: hex (the Security "
        "Whitepaper's form and OCTT TC_085: the bytes the hex digits encode) or literal "
        "(the key's text itself, for a central system that compares that). A key that "
        "is not an even number of hex digits is always sent as its text.",
        choices=AUTHORIZATION_KEY_FORMS,
        ocpp=False,
    ),
    Key(
        "SecurityProfileFallbackTime",
        Kind.INT,
        "120",
        "After the central system raises SecurityProfile: how long the station tries the "
        "new profile before it restores the previous one (and its address), persists it "
        "and reports a security event. The new profile counts as working once a "
        "WebSocket with it is open.",
        lo=1,
        hi=3600,
        unit="s",
        ocpp=False,
    ),
    Key(
        "ReconnectFrequency",
        Kind.INT,
        "30",
        "Longest wait between attempts to reconnect a lost connection (the back-off cap).",
        lo=1,
        hi=3600,
        unit="s",
        ocpp=False,
        installer="monitoring.reconnect_frequency",
    ),
)

#: Installer page groups, in station-spec §3 order.
GROUPS: Final = ("connection", "security", "monitoring", "data sending", "metering")

#: Every registry key by its OCPP name.
KEY_BY_NAME: Final[Mapping[str, Key]] = {k.name: k for k in KEYS}


def _check_declaration(keys: Sequence[Key]) -> None:
    """Refuse a table with clashing names or a default its own rules refuse."""
    seen: set[str] = set()
    seats: set[str] = set()
    for key in keys:
        if key.owner is not Owner.REGISTRY:
            raise ValueError(f"{key.name}: a file setting is not a registry key")
        for name in (key.name.lower(), key.installer):
            if name is None:
                continue
            if name in seen:
                raise ValueError(f"configuration name {name!r} is declared twice")
            seen.add(name)
        if key.file is not None:
            if key.file in seats or key.file.count(".") != 1:
                raise ValueError(
                    f"{key.name}: file setting {key.file!r} is not one new dotted name"
                )
            if key.readonly or key.secret:
                raise ValueError(f"{key.name}: only a writable, visible key is seeded by the file")
            seats.add(key.file)
        if key.verify is not None and key.kind is not Kind.PATH:
            raise ValueError(f"{key.name}: only a path names a file to verify")
        if key.installer is not None and key.group not in GROUPS:
            raise ValueError(f"{key.name}: installer group {key.group!r} is not one of {GROUPS}")
        value = key.default_value()
        if key.format(value) != key.default:
            raise ValueError(f"{key.name}: default {key.default!r} is not canonical")


_check_declaration(KEYS)


def _narrow(key: Key, maximum: float) -> Key:
    """``key`` with its range's top lowered to ``maximum``; ValueError if it cannot be."""
    if key.kind not in (Kind.INT, Kind.FLOAT) or key.readonly:
        raise ValueError(f"{key.name}: only a writable number key can have a maximum")
    if not math.isfinite(maximum):
        raise ValueError(f"{key.name}: maximum {maximum!r} is not a finite number")
    top = int(maximum // 1) if key.kind is Kind.INT else float(maximum)
    if key.hi is not None and top >= key.hi:
        return key
    default = key.default_value()
    assert isinstance(default, int | float)
    if (key.lo is not None and top < key.lo) or top < default:
        raise ValueError(
            f"{key.name}: maximum {format_number(top)} is below its default {key.default} "
            f"or its lowest value"
        )
    return replace(key, hi=top, bounded=True)


# --- security profile changes (Security Whitepaper ed. 3; docs/security.md) --------


def tls_address(address: str) -> str:
    """The wss:// address a raise to security profile 2 or 3 switches ``address`` to.

    OCPP 1.6 has no key for the address, so the central system cannot set it:
    the same host and path, the scheme wss://. The port: one written in the
    address is kept (a central system serving both on one port, as the OCTT
    does when it restarts its server with TLS), except :80, ws's default
    written out, which becomes wss's default (443, written as no port). An
    address without a port gets none (443). A wss:// or empty address is
    returned as it is.
    """
    parts = urlsplit(address)
    if parts.scheme.lower() != "ws":
        return address
    netloc = parts.netloc
    if parts.port is not None:
        host, port = netloc[: netloc.rindex(":")], parts.port
        netloc = host if port == 80 else f"{host}:{port}"
    return urlunsplit(("wss", netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class ProfileTrial:
    """A SecurityProfile raise by the central system, not yet proven to connect.

    ``previous_*`` is what the station last connected with (restored if the new
    profile does not connect within SecurityProfileFallbackTime), ``profile`` /
    ``address`` what the raise set. Kept in the store (``TRIAL_KEY``), so a
    restart during the trial (the central system's Reset) keeps it.
    """

    previous_profile: int
    previous_address: str
    profile: int
    address: str

    def text(self) -> str:
        return json.dumps(
            {
                "from": self.previous_profile,
                "from_address": self.previous_address,
                "to": self.profile,
                "to_address": self.address,
            },
            sort_keys=True,
        )

    @classmethod
    def parse(cls, text: str | None) -> ProfileTrial | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            trial = cls(
                int(data["from"]),
                str(data["from_address"]),
                int(data["to"]),
                str(data["to_address"]),
            )
        except (ValueError, KeyError, TypeError):
            log.error("stored security profile trial %r ignored (damaged)", text)
            return None
        return trial


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class InstalledCredentials:
    """What the certificate store holds besides the path settings, asked when
    SecurityProfile is raised (``Configuration(credentials=)``): an installed
    CentralSystemRootCertificate (InstallCertificate), and a charge point
    certificate with its key (the CSR flow). Each is a cheap, synchronous read."""

    central_system_root: Callable[[], bool] = _never
    client_certificate: Callable[[], bool] = _never


# --- the store and the results -----------------------------------------------


class SettingsStore(Protocol):
    """What the registry needs of the station's settings store (``evse.store.Store``)."""

    def get_setting(self, key: str) -> str | None: ...

    def set_settings(self, values: Mapping[str, str]) -> None:
        """Store every pair or none of them."""
        ...


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """The answer to a change: OCPP ConfigurationStatus, the key, and why (for logs)."""

    status: ConfigurationStatus
    key: str  # the OCPP name, or the name as given when it is not known
    reason: str = ""

    @property
    def ok(self) -> bool:
        """The value was stored."""
        return self.status in ("Accepted", "RebootRequired")

    def raise_for_status(self) -> None:
        """``ConfigRejected(key, reason)`` unless the value was stored."""
        if not self.ok:
            raise ConfigRejected(self.key, self.reason or self.status)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A validated change: the new values by OCPP name, ready to be written."""

    values: dict[str, Value]
    texts: dict[str, str]
    reboot_required: bool
    keys: list[str] = field(default_factory=list)  # every key given, OCPP names


SeedAction = Literal["seeded", "file wins", "kept", "unchanged"]


@dataclass(frozen=True, slots=True)
class Seeded:
    """What ``Configuration.seed`` did with one value of the file."""

    name: str  # the OCPP name
    file_key: str  # the dotted TOML name
    #: seeded: first value from the file; file wins: the file changed since the
    #: last start and replaced the registry's value; kept: a value stored before
    #: the file was known stays; unchanged: the file is as at the last start.
    action: SeedAction
    file_value: str
    #: The registry's value before (canonical text).
    before: str
    #: The file value the registry was seeded from at the last start, if any.
    last_seed: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.file_value and self.action in ("seeded", "file wins")

    def message(self) -> str:
        """One log line for the start (empty when there is nothing to say)."""
        if self.action == "file wins":
            return (
                f"{self.file_key} changed in the file from {self.last_seed!r} to "
                f"{self.file_value!r}: the file wins, {self.name} {self.before!r} -> "
                f"{self.file_value!r}"
            )
        if self.action == "kept":
            return (
                f"{self.name} stays {self.before!r} (stored before the file was read); the "
                f"file's {self.file_key} {self.file_value!r} is now its seed: change the file "
                "to make it win"
            )
        if self.action == "unchanged" and self.before != self.file_value:
            return (
                f"{self.name} is {self.before!r}, changed at run time; the file's "
                f"{self.file_key} is unchanged ({self.file_value!r}), so that change stays"
            )
        if self.changed:
            return f"{self.name} = {self.file_value!r} from the file's {self.file_key}"
        return ""


# --- the registry ---------------------------------------------------------------


class Configuration:
    """The station's configuration: typed reads, validated atomic changes, listeners.

    One instance per store: it keeps the values in memory and is the only
    writer of the ``ocpp.*`` and ``seed.*`` settings.

    ``profile_check(profile)`` is asked before SecurityProfile is raised and
    returns why the station cannot run that profile (no CentralSystemRootCertificate
    installed for 2 and 3, no client certificate for 3), or None.

    ``credentials``: given, SecurityProfile is raised to 2 or 3 only when the
    station has a CentralSystemRootCertificate (the path setting, or one the
    store holds), to 3 only with a client certificate and key (both path
    settings, or the store's), and such a credential in use cannot be
    removed (Security Whitepaper ed. 3, security profiles: prerequisites,
    Rejected otherwise). None keeps the older, looser rule (only the
    AuthorizationKey for 1 and 2 is required).

    ``maxima`` (OCPP name -> number) lowers the top of number keys' ranges for
    this station (FallbackLimit: ``ops.config.registry_maxima``); they are
    stored, and a registry opened without them uses the stored ones. A maximum
    below a key's lowest value or its default raises ValueError.

    Where a value comes from (``source``): the key's default, the file (the
    value is the one the file seeded, ``seed``), the registry (changed by the
    central system or the installer), or the command line (``override``: this
    run only).
    """

    def __init__(
        self,
        store: SettingsStore,
        *,
        keys: Sequence[Key] = KEYS,
        profile_check: Callable[[int], str | None] | None = None,
        maxima: Mapping[str, float] | None = None,
        credentials: InstalledCredentials | None = None,
    ) -> None:
        _check_declaration(keys)
        self._store = store
        self._credentials = credentials
        self._declared = {k.name: k for k in keys}
        self._keys = self._bounded(tuple(keys), dict(maxima or {}))
        self._profile_check = profile_check
        self._by_name = {k.name.lower(): k for k in self._keys}
        self._by_local = {k.installer: k for k in self._keys if k.installer is not None}
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        #: Keys whose value in force was read from the store.
        self._stored: set[str] = set()
        self._values: dict[str, Value] = {k.name: self._load(k) for k in self._keys}
        #: The file values the registry was last seeded from, by OCPP name.
        self._seeds: dict[str, str] = {}
        for key in self._keys:
            if key.file is not None:
                seed = store.get_setting(SEED_PREFIX + key.name)
                if seed is not None:
                    self._seeds[key.name] = seed
        #: Values given for this run only (``override``), by OCPP name.
        self._overrides: dict[str, str] = {}
        #: The SecurityProfile raise on trial, if any (``profile_trial``).
        self._trial = ProfileTrial.parse(store.get_setting(TRIAL_KEY))

    def _bounded(self, keys: tuple[Key, ...], maxima: dict[str, float]) -> tuple[Key, ...]:
        """The keys with the maxima given (stored when they differ) or stored before."""
        by_name = {k.name: k for k in keys}
        for name in maxima:
            if name not in by_name:
                raise ValueError(f"maximum for {name!r}: no such configuration key")
        bounded: list[Key] = []
        to_store: dict[str, str] = {}
        for key in keys:
            if key.name in maxima:
                bounded.append(_narrow(key, maxima[key.name]))
                text = format_number(maxima[key.name])
                if self._store.get_setting(BOUND_PREFIX + key.name) != text:
                    to_store[BOUND_PREFIX + key.name] = text
                continue
            stored = (
                None
                if key.kind not in (Kind.INT, Kind.FLOAT)
                else self._store.get_setting(BOUND_PREFIX + key.name)
            )
            if stored is None:
                bounded.append(key)
                continue
            try:
                bounded.append(_narrow(key, float(stored)))
            except ValueError as exc:
                log.error("configuration %s: stored maximum %r ignored (%s)", key.name, stored, exc)
                bounded.append(key)
        if to_store:
            self._store.set_settings(to_store)
        return tuple(bounded)

    def _load(self, key: Key) -> Value:
        default = key.default_value()
        if key.readonly:
            return default
        text = self._store.get_setting(STORE_PREFIX + key.name)
        if text is None:
            return default
        try:
            value = key.parse(text)
        except ValueError as exc:
            held = self._held_at_maximum(key, text)
            if held is not None:
                self._stored.add(key.name)
                return held
            # A value an older firmware allowed, or a damaged row: the default
            # is safer than refusing to start.
            log.error(
                "configuration %s: stored value refused (%s); using the default %r",
                key.name,
                SECRET_SET if key.secret else exc,
                key.default,
            )
            return default
        self._stored.add(key.name)
        return value

    def _held_at_maximum(self, key: Key, text: str) -> Value | None:
        """A stored value valid before the station's maximum was lowered reads as the
        maximum: never above it, and not back at the default. None otherwise."""
        if not key.bounded or key.hi is None:
            return None
        try:
            value = self._declared[key.name].parse(text)
        except ValueError:
            return None
        assert isinstance(value, int | float)
        if value <= key.hi:
            return None
        held: Value = int(key.hi) if key.kind is Kind.INT else float(key.hi)
        log.warning(
            "configuration %s: stored %s is above this station's maximum; using %s",
            key.name,
            text,
            key.format(held),
        )
        return held

    # -- names -------------------------------------------------------------

    @property
    def keys(self) -> tuple[Key, ...]:
        return self._keys

    def resolve(self, name: str, *, source: str = "installer") -> Key | None:
        """The key ``name`` means to ``source``, or None.

        The central system (source ``OCPP``) knows only the OCPP keys, by their
        OCPP names compared case-insensitively (CiString50Type); a local source
        also knows the installer-only keys and the installer names.
        """
        if source != OCPP:
            local = self._by_local.get(name)
            if local is not None:
                return local
        key = self._by_name.get(name.lower())
        if key is None or (source == OCPP and not key.ocpp):
            return None
        return key

    def _key(self, name: str) -> Key:
        key = self.resolve(name)
        if key is None:
            raise KeyError(f"no configuration key {name!r}")
        return key

    # -- reads ---------------------------------------------------------------

    def value(self, name: str) -> Value:
        """The typed value of a key (OCPP or installer name); the default if unset.

        For the firmware's own use: this returns the AuthorizationKey itself.
        """
        return self._values[self._key(name).name]

    def get_bool(self, name: str) -> bool:
        value = self._typed(name, Kind.BOOL)
        assert isinstance(value, bool)
        return value

    def get_int(self, name: str) -> int:
        value = self._typed(name, Kind.INT)
        assert isinstance(value, int)
        return value

    def get_float(self, name: str) -> float:
        """A number key as a float (whole-number keys too: seconds used as durations)."""
        value = self._typed(name, Kind.FLOAT, Kind.INT)
        assert isinstance(value, int | float) and not isinstance(value, bool)
        return float(value)

    def get_str(self, name: str) -> str:
        value = self._typed(name, Kind.STR, Kind.CHOICE, Kind.URL, Kind.PATH)
        assert isinstance(value, str)
        return value

    def get_measurands(self, name: str) -> tuple[str, ...]:
        value = self._typed(name, Kind.MEASURANDS)
        assert isinstance(value, tuple)
        return value

    def _typed(self, name: str, *kinds: Kind) -> Value:
        key = self._key(name)
        if key.kind not in kinds:
            raise TypeError(f"{key.name} is {key.kind.value}, not {kinds[0].value}")
        return self._values[key.name]

    def text(self, name: str) -> str:
        """The OCPP text of a key; a secret shows only whether it is set."""
        key = self._key(name)
        return self._text(key)

    def _text(self, key: Key) -> str:
        value = self._values[key.name]
        if key.secret:
            return SECRET_SET if value else SECRET_UNSET
        return key.format(value)

    def source(self, name: str) -> Source:
        """Where the value in force of a key comes from.

        "command line": given for this run (``override``); "file": the value the
        file seeded and nothing changed since; "registry": stored by a change
        (the central system, the installer); "default": nothing stored (and
        every read-only key, which always reads its default).
        """
        key = self._key(name)
        if key.name in self._overrides:
            return "command line"
        if key.readonly or key.name not in self._stored:
            return "default"
        seed = self._seeds.get(key.name)
        if seed is not None and seed == key.format(self._values[key.name]):
            return "file"
        return "registry"

    def connection_files(self) -> tuple[str | None, str | None, str | None]:
        """The PEM texts the security profile in force uses: (root certificate,
        client certificate, client key), None where it uses none.

        Only those files are read, so a certificate that went missing or bad
        after it was set fails only the TLS profiles (2, 3) that need it, never
        a profile 0 or 1 connection. Each is checked as when it was set; a
        problem raises ValueError naming the setting, the file and the reason
        (the central-system status shows it). Reads files: not on the station
        loop's path.
        """
        profile = self._values.get("SecurityProfile", 0)
        assert isinstance(profile, int)
        wanted = {
            "CentralSystemRootCertificate": profile >= 2,
            "ChargePointCertificate": profile == 3,
            "ChargePointPrivateKey": profile == 3,
        }
        texts: list[str | None] = []
        for name, used in wanted.items():
            key = self._declared.get(name)
            path = self._values.get(name) if key is not None else None
            if not used or not isinstance(path, str) or not path:
                texts.append(None)
                continue
            assert key is not None
            try:
                if key.verify is not None:
                    key.verify(path)
                with open(path, encoding="ascii") as file:
                    texts.append(file.read())
            except ValueError as exc:  # the verifier's reason names the file
                raise ValueError(f"{key.label}: {exc}") from None
            except OSError as exc:
                raise ValueError(f"{key.label}: {path}: {exc.strerror or exc}") from None
        ca, cert, private = texts
        return ca, cert, private

    def file_seed(self, name: str) -> str | None:
        """The file value this key was last seeded from (``seed``), or None."""
        return self._seeds.get(self._key(name).name)

    def get_configuration(
        self, keys: Sequence[str] | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """GetConfiguration.conf (OCPP 1.6 §5.8): (configurationKey, unknownKey).

        No names, or an empty list: every OCPP key. Otherwise each known name
        once, in the order asked, under its canonical spelling, and the others
        as given in the unknown list. A write-only key is listed without a
        value. More names than GetConfigurationMaxKeys raise
        ``CallError("OccurenceConstraintViolation")``: §5.8 lets the station
        limit the count, and answering part of the request (or calling known
        keys unknown) would tell the central system something false.
        """
        if not keys:
            return [self._entry(k) for k in self._keys if k.ocpp], []
        limit = self._values.get("GetConfigurationMaxKeys", 60)
        assert isinstance(limit, int)
        if len(keys) > limit:
            raise CallError(
                "OccurenceConstraintViolation",
                f"GetConfiguration asks for {len(keys)} keys; GetConfigurationMaxKeys is {limit}",
            )
        found: list[dict[str, Any]] = []
        unknown: list[str] = []
        listed: set[str] = set()
        for name in keys:
            key = self.resolve(name, source=OCPP)
            if key is None:
                if name not in unknown:
                    unknown.append(name)
            elif key.name not in listed:
                listed.add(key.name)
                found.append(self._entry(key))
        return found, unknown

    def _entry(self, key: Key) -> dict[str, Any]:
        entry: dict[str, Any] = {"key": key.name, "readonly": key.readonly}
        if not key.secret:
            entry["value"] = key.format(self._values[key.name])
        return entry

    def row(self, key: Key) -> dict[str, Any]:
        """Everything people are shown of one key (the installer page, ``evse config``).

        ``value`` and ``default`` are texts; a secret reads "set" or "not set".
        ``ocpp`` is the OCPP name when the central system also sees the key.
        """
        return {
            "group": key.group,
            "name": key.label,
            "ocpp": key.name if key.ocpp else None,
            "key": key.name,
            "value": self._text(key),
            "default": (SECRET_SET if key.default else SECRET_UNSET) if key.secret else key.default,
            "range": key.range_text,
            "unit": key.unit,
            "readonly": key.readonly,
            "secret": key.secret,
            "access": key.access_text,
            "source": self.source(key.name),
            "file": key.file,
            "file_seed": self._seeds.get(key.name),
            "reboot_required": key.reboot_required,
            "description": key.description,
        }

    def installer_view(self) -> list[dict[str, Any]]:
        """The installer settings page: every installer setting, grouped as in §3
        (the fields of ``row``)."""
        rows = [
            (GROUPS.index(k.group), i, k)
            for i, k in enumerate(self._keys)
            if k.installer is not None and k.group is not None
        ]
        return [self.row(key) for _, _, key in sorted(rows, key=lambda row: (row[0], row[1]))]

    # -- the file and the command line ---------------------------------------

    def seed(self, values: Mapping[str, str]) -> list[Seeded]:
        """Apply the file's values of the keys it seeds (OCPP name -> canonical text).

        The rule, per key, against the file value it was last seeded from
        (kept in the store as ``seed.<Name>``):

        * never seeded, nothing stored: the file's value is stored ("seeded");
        * never seeded, a value stored (by an older firmware, or set before the
          file was known): that value stays and the file's becomes the seed
          ("kept", logged: changing the file later makes it win);
        * the file is as at the last seed: the value in force stays, whether
          or not the central system or the installer changed it since
          ("unchanged");
        * the file changed since: the file wins ("file wins"), and the log
          names the key, the old and the new value.

        A file value the registry refuses (a rule between keys: a ws:// address
        while the security profile is TLS) raises ``ConfigRejected`` naming the
        file's setting, both values and the reason; nothing changes then. The
        values and the seeds are written in one all-or-nothing store call.
        """
        with self._lock:
            outcomes: list[Seeded] = []
            wins: dict[str, str] = {}
            seeds: dict[str, str] = {}
            for name, text in values.items():
                key = self._declared.get(name)
                if key is None or key.file is None:
                    raise ValueError(f"{name!r} is not a key the file seeds")
                before = self._text(key)
                last = self._seeds.get(name)
                action: SeedAction
                if last is None and name in self._stored:
                    action = "kept" if before != text else "unchanged"
                elif last is None:
                    action = "seeded"
                elif last != text:
                    action = "file wins"
                else:
                    action = "unchanged"
                if action in ("seeded", "file wins"):
                    wins[name] = text
                if last != text:
                    seeds[SEED_PREFIX + name] = text
                outcomes.append(Seeded(name, key.file, action, text, before, last))
            plan = self._plan(wins, "config file")
            if isinstance(plan, ChangeResult):
                blamed = next((o for o in outcomes if o.name == plan.key), None)
                if blamed is None:
                    # A rule between keys blamed one the file does not give.
                    blamed = next(o for o in outcomes if o.name in wins)
                raise ConfigRejected(
                    blamed.file_key,
                    f"{blamed.file_value!r} cannot become {blamed.name} (now {blamed.before!r}): "
                    f"{plan.reason}",
                )
            writes = {STORE_PREFIX + n: t for n, t in plan.texts.items()} | seeds
            if writes:
                self._store.set_settings(writes)
            old = self._values
            self._values = {**old, **plan.values}
            self._stored |= set(plan.values)
            self._seeds.update({k.removeprefix(SEED_PREFIX): t for k, t in seeds.items()})
        self._notify([(n, v) for n, v in plan.values.items() if old[n] != v])
        return outcomes

    def override(self, values: Mapping[str, str], *, source: str = "command line") -> ChangeResult:
        """Values for this run only (``evse run --csms-url/--id``), never stored.

        Validated like a change (all or nothing); then they are in force and
        ``source`` says "command line" until the process ends or a change of
        the same key (which is stored) replaces them.
        """
        with self._lock:
            plan = self._plan(values, source)
            if isinstance(plan, ChangeResult):
                return plan
            old = self._values
            self._values = {**old, **plan.values}
            self._overrides.update(plan.texts)
        for name, text in plan.texts.items():
            key = self._declared[name]
            shown = SECRET_SET if key.secret else text
            log.info(
                "configuration %s = %s for this run only (%s; not stored)", name, shown, source
            )
        self._notify([(n, v) for n, v in plan.values.items() if old[n] != v])
        return ChangeResult("Accepted", plan.keys[0] if plan.keys else "")

    # -- changes -------------------------------------------------------------

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(name, new_value)`` after each change of a value.

        ``name`` is the OCPP name. Called once per key whose value changed, after
        the write, in the thread (or trio task) that made the change. An exception
        from a callback is logged and goes no further. Returns an unsubscribe
        function.
        """
        self._listeners = (*self._listeners, callback)

        def unsubscribe() -> None:
            self._listeners = tuple(cb for cb in self._listeners if cb is not callback)

        return unsubscribe

    def change(self, name: str, text: str, *, source: str) -> ChangeResult:
        """ChangeConfiguration (OCPP 1.6 §5.3) or a local change of one key.

        Unknown key: NotSupported. Read-only, malformed, out of range, a file
        that a path names missing or of the wrong kind, a monotonic key
        lowered, a rule between keys broken, or the store failing: Rejected,
        and nothing changed. Never raises for any name or text.
        """
        return self.change_many({name: text}, source=source)

    def change_many(self, values: Mapping[str, str], *, source: str) -> ChangeResult:
        """Change several keys all or nothing (the installer page's Save).

        The result names the first key refused; Accepted (or RebootRequired if
        any of them needs a restart) when all were stored.
        """
        result, changed = self._apply(values, source)
        self._notify(changed)
        return result

    async def change_async(self, name: str, text: str, *, source: str) -> ChangeResult:
        """``change`` for trio code: the write runs in a worker thread."""
        return await self.change_many_async({name: text}, source=source)

    async def change_many_async(self, values: Mapping[str, str], *, source: str) -> ChangeResult:
        """``change_many`` for trio code: the write (and the reading of the files a
        path names) runs in a worker thread."""
        result, changed = await trio.to_thread.run_sync(self._apply, dict(values), source)
        self._notify(changed)
        return result

    # -- the central system's ChangeConfiguration, and security profile trials ---------

    def central_system_change(self, name: str, text: str) -> ChangeResult:
        """ChangeConfiguration (OCPP 1.6 §5.3) from the central system: ``change``
        with source OCPP, plus what a SecurityProfile raise implies.

        A raise from 0 or 1 to 2 or 3 also switches a ws:// CentralSystemAddress
        to wss:// (``tls_address``): OCPP has no key for the address, so the
        central system could never complete the raise otherwise. Any raise is
        put on trial (``profile_trial``), written in the same store call as
        the new values: the charge point restores the previous profile and
        address if the new one does not connect in time. Lowering is Rejected
        as by ``change`` (monotonic).
        """
        result, changed = self._apply({name: text}, OCPP, central=True)
        self._notify(changed)
        return result

    async def central_system_change_async(self, name: str, text: str) -> ChangeResult:
        """``central_system_change`` for trio code: the write runs in a worker thread."""
        result, changed = await trio.to_thread.run_sync(
            lambda: self._apply({name: text}, OCPP, central=True)
        )
        self._notify(changed)
        return result

    def profile_trial(self) -> ProfileTrial | None:
        """The SecurityProfile raise not yet proven to connect, or None."""
        return self._trial

    def end_profile_trial(self, *, restore: bool) -> ProfileTrial | None:
        """End the trial: the new profile works (``restore=False``), or it did not
        connect in time (``restore=True``: the previous profile and address are
        written back, in one store call with the end of the trial; the only way
        SecurityProfile ever goes down). Returns the trial ended, or None."""
        trial, changed = self._end_trial(restore)
        self._notify(changed)
        return trial

    async def end_profile_trial_async(self, *, restore: bool) -> ProfileTrial | None:
        """``end_profile_trial`` for trio code: the write runs in a worker thread,
        the subscribers are called back in the trio task."""
        trial, changed = await trio.to_thread.run_sync(self._end_trial, restore)
        self._notify(changed)
        return trial

    def _end_trial(self, restore: bool) -> tuple[ProfileTrial | None, list[tuple[str, Value]]]:
        with self._lock:
            trial = self._trial
            if trial is None:
                return None, []
            writes = {TRIAL_KEY: ""}
            new: dict[str, Value] = {}
            if restore:
                new = {
                    "SecurityProfile": trial.previous_profile,
                    "CentralSystemAddress": trial.previous_address,
                }
                for key_name, value in new.items():
                    writes[STORE_PREFIX + key_name] = self._declared[key_name].format(value)
            self._store.set_settings(writes)
            old = self._values
            self._values = {**old, **new}
            self._stored |= set(new)
            for key_name in new:
                self._overrides.pop(key_name, None)
            self._trial = None
        if restore:
            log.warning(
                "configuration SecurityProfile = %d, CentralSystemAddress = %s restored"
                " (security profile %d did not connect)",
                trial.previous_profile,
                trial.previous_address,
                trial.profile,
            )
        return trial, [(n, v) for n, v in new.items() if old[n] != v]

    def _central_implied(
        self, values: Mapping[str, str]
    ) -> tuple[dict[str, str], ProfileTrial | None]:
        """What a SecurityProfile raise by the central system also changes (the
        address's scheme) and the trial it starts; ({}, None) for anything else."""
        if len(values) != 1:
            return {}, None
        ((name, text),) = values.items()
        key = self.resolve(name, source=OCPP)
        if key is None or key.name != "SecurityProfile":
            return {}, None
        try:
            profile = key.parse(text)
        except ValueError:
            return {}, None  # the plan refuses it, with the reason
        current = self._values["SecurityProfile"]
        address = self._values.get("CentralSystemAddress", "")
        assert isinstance(profile, int) and isinstance(current, int)
        assert isinstance(address, str)
        if profile <= current:
            return {}, None
        implied: dict[str, str] = {}
        new_address = address
        if profile >= 2 and urlsplit(address).scheme == "ws":
            new_address = tls_address(address)
            implied["CentralSystemAddress"] = new_address
        earlier = self._trial
        if earlier is not None:
            # Raised again before the last raise connected: the profile to go
            # back to is still the one that last worked.
            trial = ProfileTrial(
                earlier.previous_profile, earlier.previous_address, profile, new_address
            )
        else:
            trial = ProfileTrial(current, address, profile, new_address)
        return implied, trial

    def _apply(
        self, values: Mapping[str, str], source: str, *, central: bool = False
    ) -> tuple[ChangeResult, list[tuple[str, Value]]]:
        """Validate, write and cache under the lock; returns the result and what changed.

        ``central``: the central system's ChangeConfiguration (``central_system_change``).
        """
        with self._lock:
            implied: dict[str, str] = {}
            trial: ProfileTrial | None = None
            if central:
                implied, trial = self._central_implied(values)
            plan = self._plan(values, source, implied=implied)
            if isinstance(plan, ChangeResult):
                log.info(
                    "configuration change by %s refused: %s %s: %s",
                    source,
                    plan.status,
                    plan.key,
                    plan.reason,
                )
                return plan, []
            first = plan.keys[0] if plan.keys else ""
            writes = {STORE_PREFIX + name: text for name, text in plan.texts.items()}
            if trial is not None:
                # In the same write as the raise: a raise is never stored
                # without the way back (a crash in between would lose it).
                writes[TRIAL_KEY] = trial.text()
            try:
                self._store.set_settings(writes)
            except Exception as exc:
                log.exception("configuration change by %s: the store failed", source)
                return ChangeResult("Rejected", first, f"cannot store the value: {exc}"), []
            old = self._values
            self._values = {**old, **plan.values}  # one assignment: readers see all or none
            self._stored |= set(plan.values)
            for name in plan.values:
                # A stored change replaces what the command line gave for this run.
                self._overrides.pop(name, None)
            if trial is not None:
                self._trial = trial
        changed = [(name, value) for name, value in plan.values.items() if old[name] != value]
        for name, _ in changed:
            key = self._by_name[name.lower()]
            shown = SECRET_SET if key.secret else plan.texts[name]
            log.info("configuration %s = %s (by %s)", name, shown, source)
        status: ConfigurationStatus = "RebootRequired" if plan.reboot_required else "Accepted"
        return ChangeResult(status, first), changed

    def _plan(
        self, values: Mapping[str, str], source: str, *, implied: Mapping[str, str] | None = None
    ) -> _Plan | ChangeResult:
        """Validate ``values`` as ``source`` gives them, with ``implied`` (OCPP names
        the station itself adds: the address a raise switches) checked the same."""
        new: dict[str, Value] = {}
        texts: dict[str, str] = {}
        given: list[str] = []
        reboot = False
        items = [(name, text, source) for name, text in values.items()]
        items += [(name, text, "station") for name, text in (implied or {}).items()]
        for name, text, by in items:
            key = self.resolve(name, source=by)
            if key is None:
                return ChangeResult("NotSupported", name, "unknown configuration key")
            if key.readonly:
                return ChangeResult("Rejected", key.name, "read-only")
            if key.name in new:
                return ChangeResult("Rejected", key.name, "given twice (under two names)")
            try:
                value = key.parse(text)
            except ValueError as exc:
                return ChangeResult("Rejected", key.name, str(exc))
            current = self._values[key.name]
            if key.monotonic and _less(value, current):
                return ChangeResult(
                    "Rejected", key.name, f"may only be raised: {current} is set, {value} is lower"
                )
            if key.verify is not None and isinstance(value, str):
                # Read here, under the lock and in the caller's thread (a worker
                # thread for change_async): the file as it is when it is set.
                try:
                    key.verify(value)
                except ValueError as exc:
                    return ChangeResult("Rejected", key.name, str(exc))
            new[key.name] = value
            texts[key.name] = key.format(value)
            if by == source:
                given.append(key.name)
            reboot = reboot or key.reboot_required
        broken = self._check_rules({**self._values, **new}, set(new))
        if broken is not None:
            return ChangeResult("Rejected", *broken)
        return _Plan(new, texts, reboot, given)

    def _check_rules(
        self, values: Mapping[str, Value], changed: set[str]
    ) -> tuple[str, str] | None:
        """The rules that relate keys (Security Whitepaper ed. 3, security profiles).

        Checked only when a key they involve changes, so a stored state that
        breaks one (from an older firmware) does not block unrelated changes.
        """
        pair = {"ChargePointCertificate", "ChargePointPrivateKey"}
        cert, private = values.get("ChargePointCertificate"), values.get("ChargePointPrivateKey")
        if (
            changed & pair
            and isinstance(cert, str)
            and isinstance(private, str)
            and cert
            and private
        ):
            # Both files were verified on their own; a key that is not the
            # certificate's would fail every TLS handshake of profile 3.
            reason = key_matches_certificate(cert, private)
            if reason is not None:
                blamed = (
                    "ChargePointPrivateKey"
                    if "ChargePointPrivateKey" in changed
                    else ("ChargePointCertificate")
                )
                return blamed, reason
        profile = values.get("SecurityProfile")
        if not isinstance(profile, int) or "SecurityProfile" not in self._values:
            return None
        if "SecurityProfile" in changed:
            # Profiles 1 and 2 send the AuthorizationKey as the Basic auth
            # password: the station must have one before it switches.
            if profile in (1, 2) and not values.get("AuthorizationKey"):
                return (
                    "SecurityProfile",
                    f"profile {profile} uses HTTP Basic authentication: set AuthorizationKey first",
                )
            if self._profile_check is not None and profile != self._values["SecurityProfile"]:
                reason = self._profile_check(profile)
                if reason is not None:
                    return "SecurityProfile", f"profile {profile}: {reason}"
        if self._credentials is not None:
            missing = self._missing_credentials(values, changed, profile)
            if missing is not None:
                return missing
        # Profiles 2 and 3 are TLS: a ws:// address would downgrade them.
        address = values.get("CentralSystemAddress")
        touched = changed & {"SecurityProfile", "CentralSystemAddress"}
        if (
            touched
            and profile >= 2
            and isinstance(address, str)
            and address
            and urlsplit(address).scheme != "wss"
        ):
            blamed = (
                "CentralSystemAddress" if "CentralSystemAddress" in changed else "SecurityProfile"
            )
            return blamed, f"security profile {profile} needs a wss:// central system address"
        return None

    def _missing_credentials(
        self, values: Mapping[str, Value], changed: set[str], profile: int
    ) -> tuple[str, str] | None:
        """Security Whitepaper ed. 3, security profiles: the prerequisites. TLS (2, 3)
        needs a CentralSystemRootCertificate to verify the server by; 3 needs
        the charge point's certificate and key. Checked when the profile is
        raised and when one of those is removed while the profile uses it."""
        credentials = self._credentials
        assert credentials is not None
        raised = "SecurityProfile" in changed and profile != self._values["SecurityProfile"]
        root = values.get("CentralSystemRootCertificate")
        if (
            profile >= 2
            and (raised or "CentralSystemRootCertificate" in changed)
            and not root
            and not credentials.central_system_root()
        ):
            blamed = "SecurityProfile" if raised else "CentralSystemRootCertificate"
            return blamed, (
                f"security profile {profile} is TLS: install a CentralSystemRootCertificate first"
            )
        pair = {"ChargePointCertificate", "ChargePointPrivateKey"}
        cert, private = values.get("ChargePointCertificate"), values.get("ChargePointPrivateKey")
        if (
            profile == 3
            and (raised or changed & pair)
            and not (cert and private)
            and not credentials.client_certificate()
        ):
            blamed = "SecurityProfile" if raised else sorted(changed & pair)[0]
            return blamed, (
                "security profile 3 authenticates with a client certificate: install the charge"
                " point's certificate and key first"
            )
        return None

    def _notify(self, changed: Iterable[tuple[str, Value]]) -> None:
        for name, value in changed:
            for callback in self._listeners:
                try:
                    callback(name, value)
                except Exception:
                    log.exception("configuration listener %r failed on %s", callback, name)


def _less(a: Value, b: Value) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and a < b
