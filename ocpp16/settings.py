"""One declaration of a station setting, shared by every reader.

Theory of operation
-------------------
Every setting of the station is one ``Key``: its name, kind, unit, default,
range, who may change it, whether it is secret, whether it needs a restart,
and a description. Two tables are made of this one type, split by owner:

* ``ocpp16.config.KEYS``: the registry's settings (``Owner.REGISTRY``), the
  OCPP 1.6 configuration keys and the installer settings of station-spec §3,
  stored in the station's SQLite file and changed at run time by the central
  system (ChangeConfiguration) and the installer (``evse config``, the control
  socket, the settings page);
* ``ops.config.SECTIONS``: the TOML file's settings (``Owner.FILE``), the
  hardware and the installation, read at start and read-only at run time.

Where the file gives the first value of a registry setting (``limits.fallback``
seeds FallbackLimit), the registry key names its place in the file
(``Key.file``) and the file's table holds a *seat* made from that same key
(``ops.config.seat``: its range, unit, rules and description are the key's),
so the setting is still declared once.

The TOML loader, the registry, OCPP Get/ChangeConfiguration, ``evse config``
(``ops.settings_view``), the settings page and the example file read these
fields; none keeps a table of its own.

Why here: the registry (ocpp16) needs the type, and ocpp16 may not import
ops/ or evse/ (ARCHITECTURE.md); fieldbus/ is the Modbus layer. So the type
lives in the lowest layer that uses it, with no I/O but the checks of the
certificate and key files a path setting names (``verify``), which run only
when a value is set.

Two readers of a value, one declaration: ``Key.parse`` reads the canonical
text the registry stores and OCPP sends ("true", "3600"); the TOML loader
(``ops.config``) reads typed TOML values with the same ``lo``/``hi``/
``choices``/``rule`` fields. ``default`` is the canonical text for a registry
key, and a TOML value, ``REQUIRED`` or a ``Derived`` for a file setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final
from urllib.parse import urlsplit

from ocpp16.metering import SUPPORTED_MEASURANDS

#: ChangeConfiguration.req ``value`` is CiString500Type (OCPP 1.6 §6.9).
MAX_VALUE_LENGTH: Final = 500

#: A key's typed value: bool, int, float, str, or a tuple of measurand names.
Value = bool | int | float | str | tuple[str, ...]

#: How a secret reads everywhere (installer page, ``evse config``, logs): only
#: whether it is set. OCPP GetConfiguration lists a write-only key without a value.
SECRET_SET: Final = "set"  # noqa: S105 -- a placeholder, not a password
SECRET_UNSET: Final = "not set"  # noqa: S105

#: The largest certificate or key file read (a PEM chain is a few kB).
MAX_PEM_BYTES: Final = 1 << 20


class Kind(Enum):
    """How a value is read; the value names the kind for people."""

    BOOL = "true or false"
    INT = "whole number"
    FLOAT = "number"
    STR = "text"
    CHOICE = "one of a list"
    MEASURANDS = "comma-separated measurands"
    URL = "websocket URL"
    PATH = "absolute path"
    TAGS = "list of id tags"


class Access(Enum):
    """OCPP 1.6 §9 accessibility: R read-only, RW read-write, W write-only (secret)."""

    R = "R"
    RW = "RW"
    W = "W"


class Owner(Enum):
    """Where a setting's value lives."""

    #: The TOML file: read at start, read-only at run time (hardware, installation).
    FILE = "file"
    #: The registry in the station's store: changed at run time (OCPP, installer).
    REGISTRY = "registry"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a file setting that must be given.
REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Derived:
    """A file default computed from settings read before this one (dotted key -> value)."""

    text: str
    compute: Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Key:
    """One setting, declared once (see the module docstring for who reads what)."""

    #: Registry: the OCPP name, also the store key. File: the name in its section.
    name: str
    kind: Kind
    #: Registry: canonical text. File: a TOML value, ``REQUIRED`` or a ``Derived``.
    default: Any
    description: str
    access: Access = Access.RW
    #: Inclusive range of an INT or FLOAT, or of a STR's length in characters.
    lo: int | float | None = None
    hi: int | float | None = None
    #: The allowed values (CHOICE; a file setting of any kind), canonical spelling.
    choices: tuple[Any, ...] = ()
    #: INT: 0 is also allowed and means "off" (OCPP 1.6 §9.1 ClockAlignedDataInterval).
    zero_disables: bool = False
    #: May only be raised (Security Whitepaper: SecurityProfile).
    monotonic: bool = False
    #: The change takes effect only after a restart: ChangeConfiguration answers RebootRequired.
    reboot_required: bool = False
    #: Visible to the central system (GetConfiguration / ChangeConfiguration).
    ocpp: bool = True
    #: The local installer name (``group.setting``), or None when not on the installer page.
    installer: str | None = None
    unit: str = ""
    #: A further check of a parsed value: returns the value to keep, or raises
    #: ValueError(reason) (a file rule may normalize: a port URL to a PortSpec).
    rule: Callable[[Any], Any] | None = None
    rule_text: str = ""
    #: ``hi`` is a maximum the station set at open (``Configuration(maxima=)``),
    #: below the declared one: refusals say so.
    bounded: bool = False
    owner: Owner = Owner.REGISTRY
    #: Registry key: the dotted TOML setting whose value seeds it at start.
    file: str | None = None
    #: A file seat (``ops.config.seat``): the registry key it seeds.
    seeds: str | None = None
    #: File: written uncommented in the example file (required settings must have one).
    example: Any = None
    #: Checked when a value is set, never when a stored one is read back (a file
    #: it names may change later; its user reports that): raises ValueError(reason).
    verify: Callable[[str], None] | None = None

    @property
    def secret(self) -> bool:
        """Write-only: the value is never shown, only whether it is set."""
        return self.access is Access.W

    @property
    def readonly(self) -> bool:
        """Nothing changes it at run time (a fact of the firmware, or the file's)."""
        return self.access is Access.R

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def group(self) -> str | None:
        """The installer page group ("data sending"), from the local name."""
        if self.installer is None:
            return None
        return self.installer.partition(".")[0].replace("_", " ")

    @property
    def label(self) -> str:
        """The name people use: the installer name where there is one."""
        return self.installer or self.name

    @property
    def changed_by(self) -> tuple[str, ...]:
        """Who may change the value at run time: "installer", "central system"."""
        if self.readonly or self.owner is Owner.FILE:
            return ()
        return ("installer", "central system") if self.ocpp else ("installer",)

    @property
    def access_text(self) -> str:
        """For people: read-only, installer, installer + central system, write-only."""
        who = self.changed_by
        if not who:
            return "read-only"
        text = " + ".join(who)
        return f"write-only, {text}" if self.secret else text

    def parse(self, text: str) -> Value:
        """The typed value of ``text``; ValueError(reason) if it is not valid here."""
        if len(text) > MAX_VALUE_LENGTH:
            raise ValueError(f"{len(text)} characters; a value has at most {MAX_VALUE_LENGTH}")
        parse = _PARSERS[self.kind]
        return parse(self, text)

    def default_value(self) -> Value:
        """The typed default of a registry key. A secret's empty default means "not
        set yet", a state a change cannot return to (the length rule refuses "")."""
        if self.secret and self.default == "":
            return ""
        return self.parse(self.default)

    def format(self, value: Value) -> str:
        """The canonical OCPP text of a typed value."""
        if self.kind is Kind.BOOL:
            return "true" if value else "false"
        if self.kind is Kind.MEASURANDS:
            assert isinstance(value, tuple)
            return ",".join(value)
        if self.kind is Kind.FLOAT:
            assert isinstance(value, float)
            return format_float(value)
        return str(value)

    @property
    def range_text(self) -> str:
        """The allowed values, for people (installer page, CLI, example file)."""
        unit = f" {self.unit}" if self.unit else ""
        if self.choices:
            return ", ".join(str(c) for c in self.choices)
        if self.kind is Kind.BOOL:
            return "true, false"
        if self.kind in (Kind.INT, Kind.FLOAT):
            if self.lo is None or self.hi is None:
                return ""
            text = f"{format_number(self.lo)}..{format_number(self.hi)}{unit}"
            return f"{text} (0 disables)" if self.zero_disables else text
        if self.kind is Kind.STR:
            text = "" if self.lo is None else f"{self.lo}..{self.hi} characters"
            if self.rule_text:
                return f"{text}, {self.rule_text}" if text else self.rule_text
            return text
        if self.kind is Kind.MEASURANDS:
            return "" if self.readonly else "comma list of: " + ", ".join(SUPPORTED_MEASURANDS)
        if self.kind is Kind.URL:
            return "ws://host[:port]/path/ or wss://..., ending in '/'; empty: none"
        if self.kind is Kind.TAGS:
            return self.rule_text
        if self.owner is Owner.FILE:
            return "absolute path" + (f", {self.rule_text}" if self.rule_text else "")
        return (
            "absolute path" + (f" of {self.rule_text}" if self.rule_text else "") + "; empty: none"
        )


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def format_float(value: float) -> str:
    """A FLOAT key's canonical text. Exact for every value the parser admits
    (at most 3 decimals)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


_INT: Final = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT: Final = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")


def _parse_bool(key: Key, text: str) -> Value:
    # OCPP 1.6 §9.1 types these keys "boolean": "true"/"false". The reference
    # table writes 0/1, so a central system configured from it may send those.
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"{text!r} is not true or false (or 1 or 0)")


def _above_station_maximum(key: Key, value: float) -> None:
    if key.bounded and key.hi is not None and value > key.hi:
        unit = f" {key.unit}" if key.unit else ""
        raise ValueError(
            f"{format_number(value)}{unit} is above {format_number(key.hi)}{unit}, "
            "the most this station allows"
        )


def _parse_int(key: Key, text: str) -> Value:
    if _INT.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a whole number")
    value = int(text)
    if key.zero_disables and value == 0:
        return 0
    _above_station_maximum(key, value)
    if (key.lo is not None and value < key.lo) or (key.hi is not None and value > key.hi):
        raise ValueError(f"{value} is outside {key.range_text}")
    return value


def _parse_float(key: Key, text: str) -> Value:
    if _FLOAT.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a number like 6 or 10.5 (at most 3 decimals)")
    value = float(text)
    _above_station_maximum(key, value)
    if (key.lo is not None and value < key.lo) or (key.hi is not None and value > key.hi):
        raise ValueError(f"{format_float(value)} is outside {key.range_text}")
    return value


def _parse_str(key: Key, text: str) -> Value:
    shown = "the value" if key.secret else repr(text)
    if (key.lo is not None and len(text) < key.lo) or (key.hi is not None and len(text) > key.hi):
        raise ValueError(f"{shown} is {len(text)} characters; {key.lo}..{key.hi} allowed")
    if not text.isprintable():
        raise ValueError(f"{shown} contains a control or unprintable character")
    if key.rule is not None:
        text = key.rule(text)
    return text


def _parse_choice(key: Key, text: str) -> Value:
    for choice in key.choices:
        if str(choice).lower() == text.lower():
            return str(choice)
    raise ValueError(f"{text!r} is not one of {', '.join(map(str, key.choices))}")


def _parse_measurands(key: Key, text: str) -> Value:
    if text == "":
        return ()
    if key.readonly:
        raise ValueError(f"{text!r}: only the empty list")
    canonical = {m.lower(): m for m in SUPPORTED_MEASURANDS}
    out: list[str] = []
    for item in text.split(","):
        name = canonical.get(item.strip().lower())
        if name is None:
            raise ValueError(
                f"{item.strip()!r} is not a supported measurand ({', '.join(SUPPORTED_MEASURANDS)})"
            )
        if name in out:
            raise ValueError(f"{name} is listed twice")
        out.append(name)
    return tuple(out)


def _parse_url(key: Key, text: str) -> Value:
    if text == "":
        return ""
    if (
        len(text) > 512
        or not text.isascii()
        or any(not c.isprintable() or c.isspace() for c in text)
    ):
        raise ValueError(f"{text!r} is not a URL (at most 512 ASCII characters, no whitespace)")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{text!r} is not a ws:// or wss:// URL")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r} holds credentials; the password is the AuthorizationKey")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"{text!r} has a query or fragment; the charge point id is appended")
    if not text.endswith("/"):
        raise ValueError(f"{text!r} does not end with '/' (the charge point id is appended)")
    return parts.scheme + text[len(parts.scheme) :]  # the scheme in lower case (RFC 3986 §3.1)


def _parse_path(key: Key, text: str) -> Value:
    if text == "":
        return ""
    if not text.startswith("/") or not text.isprintable() or len(text.encode()) > 4096:
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def _parse_tags(key: Key, text: str) -> Value:
    raise ValueError("a list of id tags is set in the file only")


_PARSERS: Final[dict[Kind, Callable[[Key, str], Value]]] = {
    Kind.BOOL: _parse_bool,
    Kind.INT: _parse_int,
    Kind.FLOAT: _parse_float,
    Kind.STR: _parse_str,
    Kind.CHOICE: _parse_choice,
    Kind.MEASURANDS: _parse_measurands,
    Kind.URL: _parse_url,
    Kind.PATH: _parse_path,
    Kind.TAGS: _parse_tags,
}


# --- the files a path setting names ----------------------------------------------------
#
# Checked when the path is set (``Key.verify``), by every way of setting it, so
# a wrong file is refused with its reason and nothing changes. The station
# reads the file again when it connects: a file that goes bad later fails only
# the connection that uses it (the central-system status says why).


def _read_pem(path: str) -> bytes:
    """The file's bytes; ValueError naming what is wrong with it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_PEM_BYTES:
            raise ValueError(f"{path} is {size} bytes; a PEM file has at most {MAX_PEM_BYTES}")
        with open(path, "rb") as file:
            return file.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a PEM file") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read (permission denied)") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _certificates(path: str) -> list[Any]:
    from cryptography import x509  # noqa: PLC0415 -- loaded only when a path is set

    data = _read_pem(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path} is not a PEM certificate (no BEGIN CERTIFICATE block)")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid PEM certificate ({exc})") from None
    return certificates


def _is_ca(certificate: Any) -> bool:
    from cryptography import x509  # noqa: PLC0415

    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.value.ca)


def verify_ca_certificate(path: str) -> None:
    """A PEM file of CA certificates (the central system's root: TLS trust anchors)."""
    if path == "":
        return
    for certificate in _certificates(path):
        if not _is_ca(certificate):
            raise ValueError(
                f"{path}: {certificate.subject.rfc4514_string() or 'a certificate'} is not a "
                "CA certificate (basicConstraints CA:TRUE); give the central system's root"
            )


def verify_client_certificate(path: str) -> None:
    """A PEM certificate chain, this charge point's own certificate first."""
    if path == "":
        return
    first = _certificates(path)[0]
    if _is_ca(first):
        raise ValueError(
            f"{path}: the first certificate is a CA certificate; give this charge point's "
            "own certificate (its chain may follow)"
        )


def verify_private_key(path: str) -> None:
    """An unencrypted PEM private key (OpenSSL would prompt for a password)."""
    if path == "":
        return
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_private_key,
    )

    data = _read_pem(path)
    if b"PRIVATE KEY-----" not in data:
        raise ValueError(f"{path} is not a PEM private key (no BEGIN PRIVATE KEY block)")
    try:
        load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{path}: the key is encrypted; install it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not a valid PEM private key ({exc})") from None


def key_matches_certificate(cert_path: str, key_path: str) -> str | None:
    """Why the private key does not belong to the certificate, or None."""
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    try:
        certificate = _certificates(cert_path)[0]
        private = load_pem_private_key(_read_pem(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return str(exc)

    def der(public: Any) -> bytes:
        return bytes(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))

    if der(certificate.public_key()) != der(private.public_key()):
        return f"{key_path} is not the private key of the certificate in {cert_path}"
    return None
