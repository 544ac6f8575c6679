"""OCPP 1.6 payload validation against the ocpp package's JSON schemas.

Theory of operation
-------------------
The ocpp package ships a draft-04 JSON schema per action and direction
(``ocpp/v16/schemas/<Action>.json`` for the request, ``<Action>Response.json``
for the response; 39 actions, the security whitepaper's included). We load
them with ``importlib.resources`` and validate with a ``Draft4Validator``
extended in two keywords; its asyncio runtime is not used.

Nothing of this is loaded before it is needed (issue 7, resident memory): a
station with no central system configured never validates a payload.
jsonschema (with referencing, rpds and attrs) is imported, and each action's
schema read, on the first validation. The package's enums (``OCPP_ENUMS``:
the action names here, the smart-charging values in ``smart_charging.py``)
come from ``ocpp/v16/enums.py`` loaded by itself: importing it as
``ocpp.v16.enums`` would run ``ocpp/v16/__init__.py`` first, which imports
the package's asyncio ChargePoint and with it asyncio, jsonschema and its
message classes, none of which the station uses (rpc.py is its RPC, on trio).

* ``multipleOf``. The smart-charging schemas require ``limit`` and
  ``minChargingRate`` to be a ``multipleOf 0.1``. jsonschema tests that in
  binary floating point: ``6.1 / 0.1 == 60.99999999999999``, so a correct 6.1
  fails. The ocpp package cures it by parsing payload and schema with
  ``parse_float=Decimal`` for three actions, which leaks ``Decimal`` into the
  payloads the application sees. We instead decide ``multipleOf`` exactly on
  the decimal number the float was written as: ``repr(float)`` is the shortest
  decimal string that reads back as the same float (for a JSON literal
  ``6.1`` that is ``"6.1"``), and ``Fraction("6.1") / Fraction("0.1")`` is an
  integer. This holds for every action and payloads stay plain ``float``.
  Consequence for senders: a computed ``0.1 + 0.2`` is ``0.30000000000000004``
  and is (rightly) refused; round limits with ``round(x, 1)`` before sending.
* ``format``. The schemas carry ``"format": "date-time"``, which jsonschema
  ignores without a format checker. We check those fields here: RFC 3339
  (``2024-05-01T12:00:00Z``, ``...T12:00:00.250+02:00``), an explicit offset
  or ``Z`` is required, the date must exist. Leap seconds (``:60``) are
  refused: nothing downstream can represent them. ``"format": "uri"``
  (GetDiagnostics, UpdateFirmware ``location``) is left to the application,
  which must parse the URL anyway.

Schema errors map to the OCPP-J 1.6 §4.2.3 codes (``_CODES``); the
description names the field as a path (``csChargingProfiles.chargingSchedule.
chargingSchedulePeriod[0].limit``) and never quotes more than a short excerpt
of the offending value.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from importlib.resources.abc import Traversable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from ocpp16.errors import CallError

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

Direction = Literal["request", "response"]

#: The ocpp package's ``v16`` directory; importing ``ocpp`` (an empty
#: ``__init__.py``) finds it without running ``ocpp/v16/__init__.py``.
_V16: Traversable = resources.files("ocpp") / "v16"
#: The name ``ocpp/v16/enums.py`` is loaded under (see the module docstring).
_ENUMS_MODULE = "ocpp16._ocpp_v16_enums"


def _load_enums() -> ModuleType:
    """``ocpp/v16/enums.py`` by itself (it needs nothing but the standard library),
    from its cached bytecode like any import; once per process."""
    loaded = sys.modules.get(_ENUMS_MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_ENUMS_MODULE, str(_V16 / "enums.py"))
    if spec is None or spec.loader is None:  # pragma: no cover - the ocpp package is broken
        raise ImportError(f"no ocpp/v16/enums.py in {_V16}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as the import system does: pickling an enum
    # member looks its module up by name.
    sys.modules[_ENUMS_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_ENUMS_MODULE]
        raise
    return module


#: The ocpp package's OCPP 1.6 enums (``Action``, ``ChargingProfileStatus``...),
#: without its asyncio runtime.
OCPP_ENUMS: ModuleType = _load_enums()

#: The 39 OCPP 1.6 actions (core profiles and the security whitepaper's).
ACTIONS: frozenset[str] = frozenset(a.value for a in OCPP_ENUMS.Action)

# jsonschema keyword -> OCPP-J 1.6 §4.2.3 code. "type" on the payload itself
# (not an object) is a FormationViolation, see _code().
_CODES: dict[str, str] = {
    "type": "TypeConstraintViolation",
    "required": "OccurenceConstraintViolation",
    "minItems": "OccurenceConstraintViolation",
    "maxItems": "OccurenceConstraintViolation",
    "additionalProperties": "FormationViolation",
    "maxLength": "PropertyConstraintViolation",
    "minLength": "PropertyConstraintViolation",
    "enum": "PropertyConstraintViolation",
    "pattern": "PropertyConstraintViolation",
    "format": "PropertyConstraintViolation",
    "multipleOf": "PropertyConstraintViolation",
    "minimum": "PropertyConstraintViolation",
    "maximum": "PropertyConstraintViolation",
}
# When a payload has several faults, the shallowest is reported; among equally
# deep ones, the structural fault first.
_RANK = {
    "FormationViolation": 0,
    "OccurenceConstraintViolation": 1,
    "TypeConstraintViolation": 2,
    "PropertyConstraintViolation": 3,
}

_DATE_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_date_time(text: str) -> datetime:
    """Parse an RFC 3339 date-time with a time zone into an aware ``datetime``.

    The same rule the validators apply to every ``"format": "date-time"``
    field, so a payload that passed validation always parses. Raises
    ``ValueError`` for anything else (naive times, ``2024-02-30``, ``+24:00``).
    Fractions beyond microseconds are truncated.
    """
    m = _DATE_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 date-time with a time zone: {text[:40]!r}")
    day, clock, fraction, zulu, sign, off_h, off_m = m.groups()
    if zulu:
        offset = "+00:00"
    else:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"time zone offset out of range: {text[:40]!r}")
        offset = f"{sign}{off_h}:{off_m}"
    micro = (fraction or "")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{day}T{clock}.{micro}{offset}")


def format_date_time(moment: datetime) -> str:
    """An aware ``datetime`` as OCPP's usual UTC form, ``2024-05-01T12:00:00.250Z``.

    Naive datetimes are refused (``ValueError``): OCPP times carry a zone.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a naive datetime has no place in OCPP: give it a time zone")
    utc = moment.astimezone(UTC)
    spec = "milliseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _exact(number: object) -> Fraction | None:
    """The exact decimal value of a JSON number, None if it is not a finite number."""
    if isinstance(number, float):
        return Fraction(repr(number)) if math.isfinite(number) else None
    if isinstance(number, Decimal):
        return Fraction(number) if number.is_finite() else None
    if isinstance(number, int | Fraction) and not isinstance(number, bool):
        return Fraction(number)
    return None


def _multiple_of(
    validator: Any, divisor: object, instance: object, schema: object
) -> Iterator[ValidationError]:
    from jsonschema.exceptions import ValidationError  # noqa: PLC0415 - loaded by now

    if not validator.is_type(instance, "number"):
        return
    value, step = _exact(instance), _exact(divisor)
    if value is None or step is None or step == 0:
        yield ValidationError(f"{instance!r} is not a finite number")
    elif (value / step).denominator != 1:
        yield ValidationError(f"{instance!r} is not a multiple of {divisor}")


def _format(
    validator: Any, fmt: object, instance: object, schema: object
) -> Iterator[ValidationError]:
    from jsonschema.exceptions import ValidationError  # noqa: PLC0415 - loaded by now

    if fmt != "date-time" or not isinstance(instance, str):
        return
    try:
        parse_date_time(instance)
    except ValueError as exc:
        yield ValidationError(str(exc))


@functools.cache
def _validator_class() -> Any:
    """Draft4Validator with our two keywords; jsonschema imported on the first call."""
    from jsonschema import Draft4Validator, validators  # noqa: PLC0415 - see the module docstring

    return validators.extend(
        Draft4Validator, validators={"multipleOf": _multiple_of, "format": _format}
    )


@functools.cache
def _validator(action: str, direction: Direction) -> Any:
    name = f"{action}Response" if direction == "response" else action
    path = _V16 / "schemas" / f"{name}.json"
    return _validator_class()(json.loads(path.read_text(encoding="utf-8-sig")))


def _field(path: Sequence[object]) -> str:
    out = "payload"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{_short(part, 40, quote=False)}"
    return out


def _short(value: object, limit: int = 40, *, quote: bool = True) -> str:
    """A bounded, printable excerpt of a value for a description."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False) if quote else value
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # A lone surrogate would make the CALLERROR frame unencodable.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _code(error: ValidationError) -> str:
    if error.validator == "type" and not error.absolute_path:
        return "FormationViolation"
    code: str = _CODES.get(error.validator, "FormationViolation")
    return code


def _describe(error: ValidationError) -> str:
    """One line naming the field and the fault, bounded in length."""
    keyword = error.validator
    value = error.validator_value
    instance = error.instance
    path = list(error.absolute_path)
    if keyword == "type":
        if not path:
            kind = _json_type(instance)
            article = "an" if kind[0] in "aeiou" else "a"
            return f"payload is {article} {kind}, not a JSON object"
        return f"{_field(path)}: {_json_type(instance)} where {value} is required"
    if keyword == "required":
        missing = next((p for p in value if p not in instance), "?")
        return f"{_field([*path, missing])}: required field missing"
    if keyword == "additionalProperties":
        allowed = error.schema.get("properties", {})
        extra = next((k for k in instance if k not in allowed), "?")
        return f"{_field([*path, extra])}: field not allowed here"
    if keyword in ("minItems", "maxItems"):
        bound = "at least" if keyword == "minItems" else "at most"
        return f"{_field(path)}: {len(instance)} items, {bound} {value} allowed"
    if keyword in ("maxLength", "minLength"):
        bound = "at most" if keyword == "maxLength" else "at least"
        return f"{_field(path)}: {len(instance)} characters, {bound} {value} allowed"
    if keyword == "enum":
        choices = ", ".join(str(v) for v in value)
        if len(choices) > 300:
            choices = choices[:297] + "..."
        return f"{_field(path)}: {_short(instance)} is not one of {choices}"
    if keyword == "multipleOf":
        return f"{_field(path)}: {_short(instance)} is not a multiple of {value}"
    if keyword == "format":
        return f"{_field(path)}: {_short(instance)} is not an RFC 3339 {value} with a time zone"
    return f"{_field(path)}: {_short(instance)} violates {keyword} {_short(value)}"


def _validate(action: str, direction: Direction, payload: object) -> None:
    if action not in ACTIONS:
        raise CallError("NotImplemented", f"unknown action {_short(action)}")
    errors = list(_validator(action, direction).iter_errors(payload))
    if not errors:
        return
    worst = min(errors, key=lambda e: (len(e.absolute_path), _RANK.get(_code(e), 9)))
    raise CallError(_code(worst), f"{action}: {_describe(worst)}")


def validate_request(action: str, payload: object) -> None:
    """Check a CALL payload for ``action``; raise ``CallError`` with the OCPP-J code.

    Unknown action -> NotImplemented; wrong JSON type -> TypeConstraintViolation;
    missing field or too few items -> OccurenceConstraintViolation; value out of
    range, too long, not in the enum, not a multiple of 0.1, bad date-time ->
    PropertyConstraintViolation; extra field or payload not an object ->
    FormationViolation. The payload is not modified.
    """
    _validate(action, "request", payload)


def validate_response(action: str, payload: object) -> None:
    """Check a CALLRESULT payload answering ``action``; same errors as ``validate_request``."""
    _validate(action, "response", payload)
