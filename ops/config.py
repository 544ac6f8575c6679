"""The station's configuration file (TOML), declared once as a table.

Theory of operation: ``SECTIONS`` below lists every setting of the file with
its type, default, range or choices, unit and description (the EVerest
manifest idea), as ``ocpp16.settings.Key``: the one declaration type, shared
with the registry's table (``ocpp16.config.KEYS``). Everything else reads
that table: validation, defaults, the dataclasses' contents, the error
messages, ``evse config list`` (``ops.settings_view``) and the documented
example file (``example_toml()``, shipped as ``docs/config.example.toml``).

Ownership: the file's own settings (hardware, installation) are read at start
and read-only at run time. A few registry keys take their first value from
the file: their *seats* (``seat``: ``station.id`` is ChargePointId,
``limits.fallback`` FallbackLimit, ``authorization.connection_timeout``
ConnectionTimeOut, ``connection.central_system_address``
CentralSystemAddress) are made from the registry key itself, so range, unit,
rules and description are declared once, and a seat's value is checked by
the key's own parser too (the file cannot hold what the registry refuses).
At start ``seed_registry`` applies them by the registry's rule
(``Configuration.seed``): a changed file wins and is logged, an unchanged one
leaves a change made at run time in force.

A bad file is refused as a whole with ONE ``ConfigError`` naming the file,
the setting (dotted, ``board.unit``, ``authorization.tags[2]``) and the
reason, so nothing starts half-configured. Unknown keys are errors, with the
closest known key suggested (a typo must not silently leave a default in
force). Types are strict: TOML has numbers, so ``"16"`` is not 16 A; an
integer is accepted where a number is expected, a boolean never is.

Order of checks: unknown sections and keys first (so a misspelt required key
is reported as the typo, not as "missing"), then each section's settings in
table order (so a default derived from an earlier setting, such as
``board.unit`` from ``board.kind``, can be computed), then the checks that
relate settings to each other.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evse.budget import off_budget
from evse.limits import effective_fallback, fallback_max
from fieldbus.boards import BOARD_MODELS, BoardModel
from fieldbus.errors import PortConfigError
from fieldbus.meters import METER_MODELS, MeterModel
from fieldbus.ports import STANDARD_BAUDS, PortSpec, RtuPort, parse_port
from ocpp16.config import KEY_BY_NAME, KEYS, Configuration, Seeded
from ocpp16.errors import ConfigRejected
from ocpp16.settings import REQUIRED, Access, Derived, Key, Kind, Owner, format_float

#: Retries the station's plan gives each device's requests (ops.run.plan_from_config):
#: the board one (a lost reply is retried once), the meter none (its next poll is the retry).
BOARD_RETRIES = 1
METER_RETRIES = 0

#: Longest AF_UNIX socket path: sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107

BUILTIN_SOURCE = "<builtin>"

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The configuration is refused; ``str()`` is ``FILE: KEY: REASON``."""

    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}")


class _SettingError(Exception):
    """A refusal inside the checker; turned into ConfigError with the file name."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# --- the declaration --------------------------------------------------------
#
# A file setting is an ``ocpp16.settings.Key`` (the one declaration type, shared
# with the registry) owned by the file: read-only at run time. A seat is the
# file's place for a registry key that the file seeds: made from that key, so
# its range, unit, rules and description are declared once, in ocpp16/config.py.


def file_setting(
    name: str,
    kind: Kind,
    description: str,
    *,
    default: Any = REQUIRED,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[Any, ...] = (),
    unit: str = "",
    rule: Callable[[Any], Any] | None = None,
    rule_text: str = "",
    example: Any = None,
) -> Key:
    """A setting of the file (hardware, installation): read at start only.

    ``default``: a value, ``REQUIRED`` or a ``Derived``. ``rule`` returns the
    normalized value or raises ValueError(reason); ``rule_text`` says what it
    demands, for the example file. ``example`` is written uncommented in the
    example file (required settings must have one).
    """
    return Key(
        name,
        kind,
        default,
        description,
        access=Access.R,
        lo=lo,
        hi=hi,
        choices=choices,
        ocpp=False,
        unit=unit,
        rule=rule,
        rule_text=rule_text,
        owner=Owner.FILE,
        example=example,
    )


def seat(
    ocpp_name: str,
    *,
    default: Any = None,
    lo: float | None = None,
    description: str | None = None,
    rule_text: str | None = None,
) -> Key:
    """The file's place for the registry key ``ocpp_name`` (its ``Key.file``).

    Its value is read and checked like any file setting, then by the key's own
    parser (``check_seat``), and seeds the registry at start
    (``Configuration.seed``, from ``file_seeds``). ``default``, ``lo``,
    ``description`` and ``rule_text`` are what the file says differently (the
    charge point id defaults to the serial number); all else is the key's.
    """
    key = KEY_BY_NAME[ocpp_name]
    assert key.file is not None, ocpp_name
    where = key.installer or key.name
    note = (
        f"At start this seeds {where}: a change of this line wins at the next start "
        "(logged); while it is unchanged, a change made since (evse config, the "
        "installer page" + (", the central system" if key.ocpp else "") + ") stays."
    )
    return Key(
        key.file.partition(".")[2],
        key.kind,
        key.default_value() if default is None else default,
        f"{description or key.description} {note}",
        access=Access.R,
        lo=key.lo if lo is None else lo,
        hi=key.hi,
        choices=key.choices,
        zero_disables=key.zero_disables,
        ocpp=False,
        unit=key.unit,
        rule_text=key.rule_text if rule_text is None else rule_text,
        owner=Owner.FILE,
        file=key.file,
        seeds=key.name,
    )


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    description: str
    settings: tuple[Key, ...]
    #: An optional section that is absent gives ``None`` instead of defaults.
    optional: bool = False

    def setting(self, name: str) -> Key:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)


# --- rules --------------------------------------------------------------------


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError(f"{_show(value)} contains a control or unprintable character")
    return value


def _id_tag(value: str) -> str:
    # OCPP 1.6 IdToken is CiString20Type: compared case-insensitively, so tags
    # are kept upper-case. ASCII only: RFID UIDs are hex, and upper-casing
    # other scripts can change a tag's length ('ß' -> 'SS').
    if not 1 <= len(value) <= 20:
        raise ValueError(f"{_show(value)} is {len(value)} characters; an id tag has 1..20")
    if not all("!" <= c <= "~" for c in value):
        raise ValueError(
            f"{_show(value)} has a character that is not printable ASCII (or is whitespace)"
        )
    return value.upper()


def _port(value: str) -> PortSpec:
    try:
        return parse_port(value)
    except PortConfigError as exc:
        raise ValueError(str(exc)) from None


def _one_group_regex(value: str) -> str:
    try:
        pattern = re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"{_show(value)} is not a regular expression ({exc})") from None
    if pattern.groups != 1:
        raise ValueError(
            f"{_show(value)} has {pattern.groups} groups; it needs exactly one (the tag)"
        )
    # Kept as text: evse.rfid.RfidConfig compiles it (searched in each line).
    return value


def _socket_path(value: Path) -> Path:
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"{_show(str(value))} is {size} bytes; a unix socket path has at most {MAX_SOCKET_PATH}"
        )
    return value


def _listen_host(value: str) -> str:
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError(f"{value!r} is not an address to listen on")
    return value


def _web_certificate(value: Path) -> Path:
    from ocpp16.settings import verify_client_certificate  # noqa: PLC0415 - cryptography: lazy

    verify_client_certificate(str(value))
    return value


def _web_key(value: Path) -> Path:
    from ocpp16.settings import verify_private_key  # noqa: PLC0415

    verify_private_key(str(value))
    return value


def _board_model(values: Mapping[str, Any]) -> BoardModel:
    return BOARD_MODELS[values["board.kind"]]


def _meter_model(values: Mapping[str, Any]) -> MeterModel:
    return METER_MODELS[values["meter.kind"]]


_ID_TAG_TEXT = "1..20 printable ASCII characters without spaces, stored upper-case"
_PORT_TEXT = "tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600&parity=N&stopbits=1"
_DEFAULT_RFID_PATTERN = r"^\W*([0-9A-Fa-f]{4,20})\W*$"

SECTIONS: tuple[Section, ...] = (
    Section(
        "station",
        "The charge point: identity, state directory and connector.",
        (
            file_setting(
                "serial",
                Kind.STR,
                "Serial number, sent as OCPP chargePointSerialNumber (CiString25).",
                lo=1,
                hi=25,
                rule=_printable,
                rule_text="printable",
                example="EVSE-0001",
            ),
            # The charge point id (ChargePointId): the serial number unless given.
            seat(
                "ChargePointId",
                default=Derived("same as station.serial", lambda v: v["station.serial"]),
                lo=1,
                description="Charge point id: the last segment of the central system URL "
                "and the HTTP Basic user-id.",
                rule_text="printable ASCII, no whitespace, '/' or ':'",
            ),
            file_setting(
                "data_dir",
                Kind.PATH,
                "Where transactions, the message queue and settings are kept.",
                example="/var/lib/evse",
            ),
            file_setting(
                "connector",
                Kind.STR,
                "socket: a socket outlet (the plugged cable's PP rating also limits "
                "the current; on a board that drives a socket lock, ev-cc-basic, the "
                "plug is locked before charging and released after); cable: a fixed "
                "cable (no lock; UnlockConnector is NotSupported).",
                default="socket",
                choices=("socket", "cable"),
            ),
            file_setting(
                "phases",
                Kind.INT,
                "Phases wired to the connector.",
                default=3,
                choices=(1, 3),
            ),
        ),
    ),
    Section(
        "limits",
        "Currents per phase.",
        (
            file_setting(
                "installer_max",
                Kind.FLOAT,
                "Largest current the installation may supply (the circuit's rating); "
                "never above the board's own maximum.",
                default=32.0,
                lo=6,
                hi=80,
                unit="A",
            ),
            # FallbackLimit; the cross-checks keep it at most limits.installer_max.
            seat("FallbackLimit"),
        ),
    ),
    Section(
        "board",
        "The EVSE controller board (control pilot, contactor).",
        (
            file_setting(
                "kind",
                Kind.STR,
                "Board model.",
                choices=tuple(BOARD_MODELS),
                example="evse-din",
            ),
            file_setting(
                "port",
                Kind.STR,
                "The bus the board is on.",
                rule=_port,
                rule_text=_PORT_TEXT,
                example="rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1",
            ),
            file_setting(
                "unit",
                Kind.INT,
                "Modbus unit id.",
                default=Derived(
                    "the board model's default unit", lambda v: _board_model(v).default_unit
                ),
                lo=1,
                hi=247,
            ),
            file_setting(
                "poll_interval",
                Kind.FLOAT,
                "Time between status reads.",
                default=0.1,
                lo=0.02,
                hi=2,
                unit="s",
            ),
            file_setting(
                "timeout",
                Kind.FLOAT,
                "Time to wait for a reply to one request.",
                default=0.5,
                lo=0.05,
                hi=5,
                unit="s",
            ),
            file_setting(
                "failsafe_watchdog",
                Kind.FLOAT,
                "Hardware failsafe: with no request for this long the board falls "
                "back to limits.fallback on its own. Only boards with a failsafe "
                "use it.",
                default=10.0,
                lo=1,
                hi=600,
                unit="s",
            ),
        ),
    ),
    Section(
        "meter",
        "The energy meter of the connector.",
        (
            file_setting(
                "kind",
                Kind.STR,
                "Meter model.",
                choices=tuple(METER_MODELS),
                example="sdm630",
            ),
            file_setting(
                "port",
                Kind.STR,
                "The bus the meter is on (may be the board's bus, with another unit id).",
                rule=_port,
                rule_text=_PORT_TEXT,
                example="rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1",
            ),
            file_setting(
                "unit",
                Kind.INT,
                "Modbus unit id.",
                default=Derived(
                    "the meter model's default unit", lambda v: _meter_model(v).default_unit
                ),
                lo=1,
                hi=247,
                example=2,
            ),
            file_setting(
                "poll_interval",
                Kind.FLOAT,
                "Time between readings.",
                default=1.0,
                lo=0.2,
                hi=60,
                unit="s",
            ),
            file_setting(
                "timeout",
                Kind.FLOAT,
                "Time to wait for a reply to one request.",
                default=0.5,
                lo=0.05,
                hi=5,
                unit="s",
            ),
        ),
    ),
    Section(
        "authorization",
        "Who may charge.",
        (
            file_setting(
                "mode",
                Kind.STR,
                "free: anyone, transactions are started with free_id_tag; local: an id "
                "tag must be presented and authorized.",
                default="local",
                choices=("free", "local"),
            ),
            file_setting(
                "free_id_tag",
                Kind.STR,
                "The id tag of transactions in free mode.",
                default="FREECHARGING",
                rule=_id_tag,
                rule_text=_ID_TAG_TEXT,
            ),
            file_setting(
                "tags",
                Kind.TAGS,
                'Id tags always accepted, e.g. ["04A2B3C4D5", "DEADBEEF"].',
                default=(),
                rule=_id_tag,
                rule_text=_ID_TAG_TEXT,
            ),
            file_setting(
                "blocked",
                Kind.TAGS,
                "Id tags always refused.",
                default=(),
                rule=_id_tag,
                rule_text=_ID_TAG_TEXT,
            ),
            seat("ConnectionTimeOut"),
        ),
    ),
    Section(
        "connection",
        "The central system (OCPP 1.6J). The rest of its settings (security "
        "profile, access key, certificates, intervals) live in the station's "
        "registry: evse config list shows them all, evse config set changes them.",
        (seat("CentralSystemAddress"),),
    ),
    Section(
        "rfid",
        "RFID reader on a serial line (optional: leave the section out for none).",
        (
            file_setting(
                "device",
                Kind.PATH,
                "Serial device of the reader.",
                example="/dev/ttyACM0",
            ),
            file_setting(
                "baud",
                Kind.INT,
                "Baud rate.",
                default=9600,
                choices=STANDARD_BAUDS,
            ),
            file_setting(
                "pattern",
                Kind.STR,
                "Regular expression matched against each line the reader sends; its "
                "group is the tag.",
                default=_DEFAULT_RFID_PATTERN,
                rule=_one_group_regex,
                rule_text="exactly one group",
            ),
            file_setting(
                "reverse_bytes",
                Kind.BOOL,
                "Reverse the byte order of the tag (readers differ in UID byte order).",
                default=False,
            ),
            file_setting(
                "debounce",
                Kind.FLOAT,
                "The same tag read again within this time is ignored.",
                default=2.0,
                lo=0,
                hi=60,
                unit="s",
            ),
        ),
        optional=True,
    ),
    Section(
        "safety",
        "Fault detection. Every fault switches the contactor off.",
        (
            file_setting(
                "board_timeout",
                Kind.FLOAT,
                "No good board reading for this long is a fault.",
                default=1.0,
                lo=0.1,
                hi=10,
                unit="s",
            ),
            file_setting(
                "meter_timeout",
                Kind.FLOAT,
                "No good meter reading for this long is a fault.",
                default=5.0,
                lo=1,
                hi=60,
                unit="s",
            ),
            file_setting(
                "overcurrent_margin",
                Kind.FLOAT,
                "Measured current above the offered current plus this margin is overcurrent.",
                default=2.0,
                lo=0.5,
                hi=10,
                unit="A",
            ),
            file_setting(
                "overcurrent_time",
                Kind.FLOAT,
                "Overcurrent lasting this long is a fault (IEC 61851-1 Annex A gives "
                "the vehicle 5 s to follow a lower PWM duty).",
                default=5.0,
                lo=0.1,
                hi=60,
                unit="s",
            ),
            file_setting(
                "welded_time",
                Kind.FLOAT,
                "Current flowing this long after the contactor was opened means it is welded.",
                default=1.0,
                lo=0.1,
                hi=10,
                unit="s",
            ),
            file_setting(
                "off_deadline",
                Kind.FLOAT,
                "Time the whole switch-off (current 0, then disable) may take before "
                "it is given up as failed. It must cover the board's worst case: "
                "each request's timeout times its attempts, the model's request "
                "gaps, the read-modify-write of an enable bit, and an exchange "
                "already on the bus; a shorter value is refused with the time "
                "needed. A healthy board is off in a fraction of this.",
                default=5.0,
                lo=0.5,
                hi=60,
                unit="s",
            ),
            file_setting(
                "persist_interval",
                Kind.FLOAT,
                "How often the running transaction's meter reading is written to disk.",
                default=5.0,
                lo=1,
                hi=300,
                unit="s",
            ),
            file_setting(
                "start_timeout",
                Kind.FLOAT,
                "How long the board and the meter may take to answer at start. "
                "Beyond it the station exits 69 (a device unreachable) and systemd "
                "starts it again; it never runs without both.",
                default=10.0,
                lo=1,
                hi=600,
                unit="s",
            ),
            file_setting(
                "power_status_file",
                Kind.PATH,
                "Where the UPS daemon says, on SIGPWR, whether mains power is lost (the "
                "sysvinit convention: F failing, L low battery, O back). SIGPWR with the "
                "file missing counts as lost.",
                default="/run/powerstatus",
            ),
            file_setting(
                "mains_lost_voltage",
                Kind.FLOAT,
                "Mains is lost when the meter reads less than this on every phase "
                "(a station on a UPS whose meter stays powered); 0 = not used.",
                default=0.0,
                lo=0,
                hi=250,
                unit="V",
            ),
        ),
    ),
    Section(
        "control",
        "The local control interface (evse status and friends).",
        (
            file_setting(
                "socket",
                Kind.PATH,
                "Unix socket of the control interface.",
                default=Derived(
                    "<station.data_dir>/control.sock",
                    lambda v: str(v["station.data_dir"] / "control.sock"),
                ),
                rule=_socket_path,
                rule_text=f"at most {MAX_SOCKET_PATH} bytes",
            ),
        ),
    ),
    Section(
        "web",
        "The installer's web page (status, settings, /metrics), served by the station.",
        (
            file_setting(
                "enabled",
                Kind.BOOL,
                "Serve the page. Off saves the memory of the web server (about 10 MB).",
                default=True,
            ),
            file_setting(
                "host",
                Kind.STR,
                "Address to listen on. 127.0.0.1: this machine only (reach it through an "
                "SSH tunnel); 0.0.0.0 or an interface's address opens it to the network: "
                "then give a certificate and key for HTTPS.",
                default="127.0.0.1",
                rule=_listen_host,
                rule_text="an IP address or a host name",
            ),
            file_setting(
                "port",
                Kind.INT,
                "TCP port (0: any free port; the log names it).",
                default=8080,
                lo=0,
                hi=65535,
            ),
            file_setting(
                "certificate",
                Kind.PATH,
                "PEM certificate (chain) of the page, for HTTPS; with web.key.",
                default=None,
                rule=_web_certificate,
                rule_text="a PEM certificate, the server's own first",
            ),
            file_setting(
                "key",
                Kind.PATH,
                "PEM private key of web.certificate (unencrypted, readable by the station only).",
                default=None,
                rule=_web_key,
                rule_text="an unencrypted PEM private key",
            ),
            file_setting(
                "session_lifetime",
                Kind.FLOAT,
                "How long an installer stays logged in.",
                default=28800.0,
                lo=60,
                hi=7 * 86400,
                unit="s",
            ),
        ),
    ),
    Section(
        "firmware",
        "Firmware updates (OCPP UpdateFirmware, SignedUpdateFirmware): releases installed "
        "side by side in the layout evse install makes (ops/release.py).",
        (
            file_setting(
                "releases",
                Kind.PATH,
                "The releases root: releases/<version> (a venv each) and the current link "
                "the unit starts. An update is installed there and the station restarts "
                "into it (exit 1: systemd restarts the unit); only where evse install laid "
                "it out (a current link) is anything installed. A new release's trial "
                "applies only to a station run from one of these releases, never to one "
                "run from a checkout or another venv (nor evse run --sim, which uses none).",
                default="/opt/evse",
            ),
            file_setting(
                "trial",
                Kind.FLOAT,
                "A new release must reach BootNotification Accepted (with no central "
                "system: a station loop that answers) within this time after the switch, "
                "and within 3 starts; otherwise the station goes back to the previous "
                "release and reports InstallationFailed with a FirmwareRolledBack security "
                "event.",
                default=600.0,
                lo=60,
                hi=86400,
                unit="s",
            ),
        ),
    ),
    Section(
        "logging",
        "Log output (to standard error: the journal under systemd).",
        (
            file_setting(
                "level",
                Kind.STR,
                "Least severe messages logged.",
                default="info",
                choices=("debug", "info", "warning", "error"),
            ),
            file_setting(
                "format",
                Kind.STR,
                "How each line is written: 'journal' (a syslog priority prefix such as <4>,"
                " no timestamp: journald adds its own), 'text' (timestamped), 'json' (one"
                " object per line), or 'auto' (journal when standard error is the journal,"
                " else text). evse run --log-format overrides it.",
                default="auto",
                choices=("auto", "journal", "text", "json"),
            ),
        ),
    ),
)

SECTION_BY_NAME: Mapping[str, Section] = {s.name: s for s in SECTIONS}

#: Every setting by its dotted key, in table order.
SETTINGS: Mapping[str, Key] = {f"{sec.name}.{s.name}": s for sec in SECTIONS for s in sec.settings}

#: The seats: dotted file key -> the registry key it seeds (OCPP name).
SEATS: Mapping[str, str] = {
    dotted: s.seeds for dotted, s in SETTINGS.items() if s.seeds is not None
}


def _check_table() -> None:
    """Every registry key the file seeds has exactly its seat, where it says."""
    wanted = {k.file: k.name for k in KEYS if k.file is not None}
    if wanted != dict(SEATS):
        raise ValueError(f"the file's seats {dict(SEATS)} are not the registry's {wanted}")
    for dotted, s in SETTINGS.items():
        if s.owner is not Owner.FILE or not s.readonly:
            raise ValueError(f"{dotted}: a file setting is owned by the file and read-only")


_check_table()


# --- the result -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StationConfig:
    serial: str
    id: str
    data_dir: Path
    connector: str
    phases: int


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    #: Empty: none configured (the station charges on its own).
    central_system_address: str


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    installer_max: float
    #: As written; see ``fallback_current``.
    fallback: float

    @property
    def fallback_current(self) -> float:
        """The fallback to apply: ``evse.limits.effective_fallback`` (below 6 A it is 0 A).

        The check has made installer_max at most the board's maximum, so the
        installer maximum bounds both here.
        """
        return effective_fallback(
            self.fallback, installer_max=self.installer_max, hardware_max=self.installer_max
        )


@dataclass(frozen=True, slots=True)
class BoardConfig:
    kind: str
    port: PortSpec
    unit: int
    poll_interval: float
    timeout: float
    failsafe_watchdog: float

    @property
    def model(self) -> BoardModel:
        return BOARD_MODELS[self.kind]


@dataclass(frozen=True, slots=True)
class MeterConfig:
    kind: str
    port: PortSpec
    unit: int
    poll_interval: float
    timeout: float

    @property
    def model(self) -> MeterModel:
        return METER_MODELS[self.kind]


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    mode: str
    free_id_tag: str
    tags: tuple[str, ...]
    blocked: tuple[str, ...]
    connection_timeout: int


@dataclass(frozen=True, slots=True)
class RfidConfig:
    device: Path
    baud: int
    #: A regular expression with exactly one group (checked).
    pattern: str
    reverse_bytes: bool
    debounce: float


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    board_timeout: float
    meter_timeout: float
    overcurrent_margin: float
    overcurrent_time: float
    welded_time: float
    off_deadline: float
    persist_interval: float
    start_timeout: float
    power_status_file: Path
    mains_lost_voltage: float


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path


@dataclass(frozen=True, slots=True)
class WebConfig:
    enabled: bool
    host: str
    port: int
    certificate: Path | None
    key: Path | None
    session_lifetime: float


@dataclass(frozen=True, slots=True)
class FirmwareConfig:
    #: None: no releases at all (evse run --sim): an update fails at Installing.
    releases: Path | None
    trial: float


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str


#: The dataclass of each section; a test checks their fields equal the table.
SECTION_CLASSES: Mapping[str, type[Any]] = {
    "station": StationConfig,
    "limits": LimitsConfig,
    "board": BoardConfig,
    "meter": MeterConfig,
    "authorization": AuthorizationConfig,
    "connection": ConnectionConfig,
    "rfid": RfidConfig,
    "safety": SafetyConfig,
    "control": ControlConfig,
    "web": WebConfig,
    "firmware": FirmwareConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    station: StationConfig
    limits: LimitsConfig
    board: BoardConfig
    meter: MeterConfig
    authorization: AuthorizationConfig
    connection: ConnectionConfig
    rfid: RfidConfig | None
    safety: SafetyConfig
    control: ControlConfig
    web: WebConfig
    firmware: FirmwareConfig
    logging: LoggingConfig
    #: The file it was read from; None when built in memory.
    source: Path | None = None
    #: The dotted settings written in the file (the others have their default).
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def fallback_max(self) -> float:
        """The highest fallback limit this station may hold (``evse.limits.fallback_max``)."""
        amps, _ = fallback_max(
            installer_max=self.limits.installer_max,
            hardware_max=self.board.model.capabilities.max_current,
        )
        return amps


def registry_maxima(config: Config) -> dict[str, float]:
    """The registry's bounds that come from this file: ``Configuration(store, maxima=...)``.

    FallbackLimit may not be set above the installer or the board maximum, by
    any source (``evse config set``, the installer page, the control socket).
    """
    return {"FallbackLimit": config.fallback_max}


def file_seeds(config: Config) -> dict[str, str]:
    """The file's values of the registry keys it seeds: OCPP name -> canonical text
    (``Configuration.seed``). A value left out of the file seeds its default."""
    seeds: dict[str, str] = {}
    for dotted, name in SEATS.items():
        section, _, attribute = dotted.partition(".")
        value = getattr(getattr(config, section), attribute)
        seeds[name] = seed_text(SETTINGS[dotted], value)
    return seeds


def seed_registry(registry: Configuration, config: Config) -> list[Seeded]:
    """Apply the file's seats to the registry by its one rule (``Configuration.seed``)
    and say what happened: one log line per key whose value the file set or could
    not set (key, old and new value).

    A value the registry refuses (a rule between keys) is a ``ConfigError``
    naming the file, its setting, both values and the reason; nothing changes.
    """
    try:
        outcomes = registry.seed(file_seeds(config))
    except ConfigRejected as exc:
        raise ConfigError(config.source or BUILTIN_SOURCE, exc.key, exc.reason) from None
    for outcome in outcomes:
        text = outcome.message()
        if not text:
            continue
        if outcome.action in ("file wins", "kept"):
            log.warning("configuration: %s", text)
        else:
            log.info("configuration: %s", text)
    return outcomes


# --- checking ---------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as an installer wrote it, shortened for a one-line message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 50 else text[:46] + "...'"
    return repr(value)


def _describe(value: object) -> str:
    """What kind of TOML value this is, for "expected X, got Y"."""
    if isinstance(value, bool):
        return f"{_show(value)} (a boolean)"
    if isinstance(value, int):
        return f"the whole number {value}"
    if isinstance(value, float):
        return f"the number {_show(value)}"
    if isinstance(value, str):
        return f"the text {_show(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dt.date | dt.time):
        return "a date/time"
    return f"a {type(value).__name__}"


def _num(value: float) -> str:
    return f"{value:g}"


def _with_unit(value: float, unit: str) -> str:
    return f"{_num(value)} {unit}" if unit else _num(value)


def _suggest(word: str, candidates: Sequence[str]) -> str | None:
    # Only for a key the file misspelt: not loaded by every start (issue 7, memory).
    import difflib  # noqa: PLC0415

    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _check_item(setting: Key, key: str, value: Any) -> Any:
    """Check one value (not a list) of ``setting``; raises _SettingError."""
    kind = setting.kind
    text_kinds = (Kind.STR, Kind.PATH, Kind.TAGS, Kind.URL, Kind.CHOICE, Kind.MEASURANDS)
    if kind in text_kinds and not isinstance(value, str):
        expected = "an id tag (text)" if kind is Kind.TAGS else kind.value
        raise _SettingError(key, f"expected {expected}, got {_describe(value)}")
    if kind is Kind.INT and (isinstance(value, bool) or not isinstance(value, int)):
        raise _SettingError(key, f"expected a whole number, got {_describe(value)}")
    if kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _SettingError(key, f"expected a number, got {_describe(value)}")
        value = float(value)
    if kind is Kind.BOOL and not isinstance(value, bool):
        raise _SettingError(key, f"expected true or false, got {_describe(value)}")

    if kind in (Kind.INT, Kind.FLOAT) and (setting.lo is not None or setting.hi is not None):
        lo = -math.inf if setting.lo is None else setting.lo
        hi = math.inf if setting.hi is None else setting.hi
        if not lo <= value <= hi:
            raise _SettingError(
                key,
                f"{_with_unit(value, setting.unit)} is outside "
                f"{_num(lo)}..{_with_unit(hi, setting.unit)}",
            )
    if (
        kind is Kind.STR
        and setting.lo is not None
        and setting.hi is not None
        and not setting.lo <= len(value) <= setting.hi
    ):
        raise _SettingError(
            key,
            f"{_show(value)} is {len(value)} characters; allowed "
            f"{_num(setting.lo)}..{_num(setting.hi)}",
        )
    if setting.choices and value not in setting.choices:
        allowed = ", ".join(_show(c) for c in setting.choices)
        hint = ""
        if isinstance(value, str):
            close = _suggest(value, [str(c) for c in setting.choices])
            hint = f"; did you mean {close!r}?" if close else ""
        raise _SettingError(key, f"{_show(value)} is not one of {allowed}{hint}")
    if kind is Kind.PATH:
        if not value or "\0" in value:
            raise _SettingError(key, f"{_show(value)} is not a path")
        if not os.path.isabs(value):
            raise _SettingError(
                key,
                f"{_show(value)} is relative; write an absolute path (a service's "
                "working directory is /)",
            )
        value = Path(value)
    if setting.rule is not None:
        try:
            value = setting.rule(value)
        except ValueError as exc:
            raise _SettingError(key, str(exc)) from None
    if setting.seeds is not None:
        value = _check_seat(setting, key, value)
    return value


def seed_text(setting: Key, value: Any) -> str:
    """The registry's canonical text of a seat's value (what ``file_seeds`` gives)."""
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_seat(setting: Key, key: str, value: Any) -> Any:
    """A seat's value is also one its registry key takes: the same parser, so the
    file cannot hold what the registry would refuse at start."""
    assert setting.seeds is not None
    registry_key = KEY_BY_NAME[setting.seeds]
    text = seed_text(setting, value)
    if isinstance(value, float) and float(text) != value:
        raise _SettingError(
            key, f"{_with_unit(value, setting.unit)} has more than 3 decimals ({text} is stored)"
        )
    try:
        return registry_key.parse(text)
    except ValueError as exc:
        raise _SettingError(key, str(exc)) from None


def _check_value(setting: Key, key: str, value: Any) -> Any:
    if setting.kind is not Kind.TAGS:
        return _check_item(setting, key, value)
    if not isinstance(value, list | tuple):
        raise _SettingError(key, f"expected a list of id tags, got {_describe(value)}")
    seen: dict[str, int] = {}
    items: list[str] = []
    for i, item in enumerate(value):
        tag = _check_item(setting, f"{key}[{i}]", item)
        if tag in seen:
            raise _SettingError(f"{key}[{i}]", f"{tag!r} repeats {key}[{seen[tag]}]")
        seen[tag] = i
        items.append(tag)
    return tuple(items)


def _check_unknown(data: Mapping[str, Any]) -> None:
    section_names = [s.name for s in SECTIONS]
    bare_names = {s.name: key for key, s in SETTINGS.items()}
    for name, content in data.items():
        if name not in SECTION_BY_NAME:
            close = _suggest(name, section_names)
            if close:
                hint = f"did you mean [{close}]?"
            elif name in bare_names:
                hint = (
                    f"did you mean {bare_names[name]} (under [{bare_names[name].split('.')[0]}])?"
                )
            else:
                hint = f"the sections are {', '.join(section_names)}"
            raise _SettingError(name, f"unknown section; {hint}")
        if not isinstance(content, dict):
            raise _SettingError(name, f"expected a table [{name}], got {_describe(content)}")
        section = SECTION_BY_NAME[name]
        names = [s.name for s in section.settings]
        for key in content:
            if key in names:
                continue
            close = _suggest(key, names)
            if close is None:
                # Perhaps a setting of another section.
                close_key = _suggest(key, [s.name for s in SETTINGS.values()])
                if close_key is not None:
                    dotted = next(k for k, s in SETTINGS.items() if s.name == close_key)
                    raise _SettingError(f"{name}.{key}", f"unknown setting; did you mean {dotted}?")
                raise _SettingError(
                    f"{name}.{key}", f"unknown setting; [{name}] has {', '.join(names)}"
                )
            raise _SettingError(f"{name}.{key}", f"unknown setting; did you mean {name}.{close}?")


def _read_sections(data: Mapping[str, Any], given: set[str] | None = None) -> dict[str, Any]:
    """Dotted key -> checked value, for every setting of every present section;
    ``given`` collects the dotted keys the document writes."""
    values: dict[str, Any] = {}
    for section in SECTIONS:
        content = data.get(section.name)
        if content is None and section.optional:
            continue
        content = content or {}
        for setting in section.settings:
            key = f"{section.name}.{setting.name}"
            if setting.name in content:
                values[key] = _check_value(setting, key, content[setting.name])
                if given is not None:
                    given.add(key)
            elif setting.required:
                raise _SettingError(key, "required setting is missing")
            elif isinstance(setting.default, Derived):
                derived = setting.default
                try:
                    values[key] = _check_value(setting, key, derived.compute(values))
                except _SettingError as exc:
                    raise _SettingError(
                        exc.key,
                        f"{exc.reason} (the default, {derived.text}); set {key}",
                    ) from None
            elif setting.default is None:
                values[key] = None  # optional, and not given: none (web.certificate)
            else:
                values[key] = _check_value(setting, key, setting.default)
    return values


def _check_web_tls(v: Mapping[str, Any]) -> None:
    cert, key = v.get("web.certificate"), v.get("web.key")
    if (cert is None) != (key is None):
        raise _SettingError("web.key", "web.certificate and web.key go together (HTTPS needs both)")
    if cert is not None and key is not None:
        from ocpp16.settings import key_matches_certificate  # noqa: PLC0415

        why = key_matches_certificate(str(cert), str(key))
        if why is not None:
            raise _SettingError("web.key", why)


def _cross_check(v: Mapping[str, Any]) -> None:
    """Rules relating settings; each refusal names the setting that was read last."""
    _check_web_tls(v)
    board = BOARD_MODELS[v["board.kind"]]
    meter = METER_MODELS[v["meter.kind"]]

    hardware_max = board.capabilities.max_current
    if v["limits.installer_max"] > hardware_max:
        raise _SettingError(
            "limits.installer_max",
            f"{_num(v['limits.installer_max'])} A is above the {board.title}'s maximum of "
            f"{_num(hardware_max)} A",
        )
    # evse.limits' one rule: a fallback (and so the failsafe current) never
    # above the installer or board maximum.
    highest, bound_by = fallback_max(
        installer_max=v["limits.installer_max"], hardware_max=hardware_max
    )
    if v["limits.fallback"] > highest:
        bound = (
            f"limits.installer_max ({_num(highest)} A)"
            if bound_by == "installer"
            else f"the {board.title}'s maximum of {_num(highest)} A"
        )
        raise _SettingError("limits.fallback", f"{_num(v['limits.fallback'])} A is above {bound}")
    if v["station.phases"] > meter.phases:
        raise _SettingError(
            "meter.kind",
            f"the {meter.title} measures {meter.phases} phase(s) but station.phases is "
            f"{v['station.phases']}: energy on the other phases would not be counted",
        )

    board_port: PortSpec = v["board.port"]
    meter_port: PortSpec = v["meter.port"]
    if (
        isinstance(board_port, RtuPort)
        and isinstance(meter_port, RtuPort)
        and board_port.device == meter_port.device
        and board_port != meter_port
    ):
        raise _SettingError(
            "meter.port",
            f"{meter_port.device} is also the board's bus, with other line settings "
            f"({board_port.url}); one bus has one baud rate and parity",
        )
    if board_port == meter_port and v["board.unit"] == v["meter.unit"]:
        raise _SettingError(
            "meter.unit",
            f"unit {v['meter.unit']} on {meter_port.url} is already the board's; "
            "two devices on one bus need different unit ids",
        )

    rfid_device = v.get("rfid.device")
    if rfid_device is not None:
        for name, port in (("board", board_port), ("meter", meter_port)):
            if isinstance(port, RtuPort) and Path(port.device) == rfid_device:
                raise _SettingError(
                    "rfid.device", f"{rfid_device} is the {name}'s Modbus bus ({name}.port)"
                )

    for device in ("board", "meter"):
        needed = v[f"{device}.poll_interval"] + v[f"{device}.timeout"]
        limit = v[f"safety.{device}_timeout"]
        if limit <= needed:
            raise _SettingError(
                f"safety.{device}_timeout",
                f"{_num(limit)} s must be longer than {device}.poll_interval + "
                f"{device}.timeout ({_num(needed)} s), or one lost reply is a fault",
            )

    _check_off_deadline(v, board)

    blocked_at = {tag: i for i, tag in enumerate(v["authorization.blocked"])}
    for i, tag in enumerate(v["authorization.tags"]):
        if tag in blocked_at:
            raise _SettingError(
                f"authorization.blocked[{blocked_at[tag]}]",
                f"{tag!r} is also accepted by authorization.tags[{i}]",
            )
    if v["authorization.free_id_tag"] in blocked_at:
        tag = v["authorization.free_id_tag"]
        raise _SettingError(
            f"authorization.blocked[{blocked_at[tag]}]",
            f"{tag!r} is authorization.free_id_tag",
        )


def _check_off_deadline(v: Mapping[str, Any], board: BoardModel) -> None:
    """safety.off_deadline must cover the board's switch-off worst case (evse.budget)."""
    board_port: PortSpec = v["board.port"]
    shared = board_port == v["meter.port"]
    budget = off_budget(
        board,
        board_port,
        timeout=v["board.timeout"],
        retries=BOARD_RETRIES,
        bus_timeout=max(v["board.timeout"], v["meter.timeout"]) if shared else None,
    )
    # Shown rounded up, so that writing the number shown is enough.
    needed = math.ceil(budget.seconds * 100 - 1e-6) / 100
    deadline = v["safety.off_deadline"]
    if deadline < needed:
        bus = board_port.url + (" (shared with the meter)" if shared else "")
        retries = f"{BOARD_RETRIES} {'retry' if BOARD_RETRIES == 1 else 'retries'}"
        raise _SettingError(
            "safety.off_deadline",
            f"{_num(deadline)} s is shorter than the {needed:.2f} s the {board.title} may "
            f"need to switch off on {bus} with board.timeout {_num(v['board.timeout'])} s "
            f"and {retries} ({budget.describe()}); raise safety.off_deadline to at least "
            f"{needed:.2f} s or lower board.timeout",
        )


def config_from_dict(data: Mapping[str, Any], source: str | Path = BUILTIN_SOURCE) -> Config:
    """Check a parsed TOML document; ``source`` names it in errors.

    ``evse run --sim`` builds its configuration this way, in memory.
    """
    given: set[str] = set()
    try:
        _check_unknown(data)
        values = _read_sections(data, given)
        _cross_check(values)
    except _SettingError as exc:
        raise ConfigError(source, exc.key, exc.reason) from None

    parts: dict[str, Any] = {}
    for section in SECTIONS:
        cls = SECTION_CLASSES[section.name]
        if section.optional and section.name not in data:
            parts[section.name] = None
            continue
        parts[section.name] = cls(
            **{s.name: values[f"{section.name}.{s.name}"] for s in section.settings}
        )
    return Config(
        **parts, source=source if isinstance(source, Path) else None, given=frozenset(given)
    )


_TOML_POSITION = re.compile(
    r"^(?P<what>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)


def _syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    match = _TOML_POSITION.match(message)
    if match is None:
        return ConfigError(path, "", f"not valid TOML: {message}")
    what = match["what"]
    what = what[:1].lower() + what[1:]
    if match["line"] is None:
        return ConfigError(path, "end of file", what)
    return ConfigError(path, f"line {match['line']}", f"{what} (column {match['col']})")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the configuration file; any problem is one ConfigError."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(file, f"line {line}", "not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(file, exc) from None
    return config_from_dict(data, source=file)


# --- the documented example -------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if "\\" in value and "'" not in value and value.isprintable():
            return f"'{value}'"  # a literal string: regular expressions stay readable
        return json.dumps(value)  # JSON's escapes are TOML's (ensure_ascii escapes DEL)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _example_data() -> dict[str, dict[str, Any]]:
    """The example's uncommented settings: every required one, and examples."""
    data: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        if section.optional:
            continue
        for s in section.settings:
            if s.example is not None:
                data.setdefault(section.name, {})[s.name] = s.example
    return data


def _type_line(s: Key) -> str:
    parts = [s.kind.value + (f" ({s.unit})" if s.unit else "")]
    if s.kind is Kind.STR and s.lo is not None and s.hi is not None:
        parts.append(f"{_num(s.lo)}..{_num(s.hi)} characters")
    elif s.lo is not None and s.hi is not None:
        parts.append(f"{_num(s.lo)}..{_num(s.hi)}")
    if s.choices:
        parts.append("one of " + ", ".join(_toml(c) for c in s.choices))
    if s.rule_text:
        parts.append(s.rule_text)
    text = ", ".join(parts)
    text = text[:1].upper() + text[1:]
    if s.required:
        return f"{text}. Required."
    if isinstance(s.default, Derived):
        return f"{text}. Default: {s.default.text}."
    if s.default is None:
        return f"{text}. Default: none."
    return f"{text}. Default: {_toml(s.default)}."


def _wrap(text: str, prefix: str = "# ", width: int = 80) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(prefix) + len(current) + 1 + len(word) > width:
            lines.append(prefix + current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(prefix + current)
    return lines


def example_toml() -> str:
    """The documented example configuration, generated from ``SECTIONS``.

    Required settings (and a few examples) are written out; every other
    setting is shown commented out with the value it takes, so uncommenting
    any line changes nothing until it is edited.
    """
    data = _example_data()
    # Built with the optional sections present, to show the values they take.
    optional = {
        sec.name: {s.name: s.example for s in sec.settings if s.required}
        for sec in SECTIONS
        if sec.optional
    }
    example = config_from_dict({**data, **optional})
    out = [
        "# evse station configuration: evse run --config /etc/evse/evse.toml",
        "#",
        "# Generated from the table of settings in ops/config.py (example_toml()).",
        "# Copy it to /etc/evse/evse.toml and edit the copy. A commented-out line",
        "# shows the value a setting takes when it is left out. An error names this",
        "# file, the setting and the reason, and the station does not start until",
        "# it is fixed.",
    ]
    for section in SECTIONS:
        built = getattr(example, section.name)
        lead = "# " if section.optional else ""
        out.append("")
        out.extend(_wrap(section.description))
        out.append(f"{lead}[{section.name}]")
        for s in section.settings:
            out.append("")
            out.extend(_wrap(s.description))
            out.extend(_wrap(_type_line(s)))
            given = data.get(section.name, {})
            if s.name in given:
                out.append(f"{s.name} = {_toml(given[s.name])}")
            elif section.optional and s.required:
                out.append(f"# {s.name} = {_toml(s.example)}")
            elif s.default is None:
                # No line to uncomment: an unset optional setting has no TOML form.
                out.append(f'# (not set; e.g. {s.name} = "/etc/evse/web.{s.name}.pem")')
            else:
                # The value it takes (a derived default as computed for this example).
                out.append(f"# {s.name} = {_toml(getattr(built, s.name))}")
    return "\n".join(out) + "\n"
