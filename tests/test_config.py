"""The configuration file: defaults, range edges, refusals, the example file.

Expected values are written out here from the specification of the file,
not read back from ``ops.config.SECTIONS``, so a wrong entry in the table
fails a test instead of agreeing with itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evse.budget import off_budget, off_requests
from fieldbus.boards import BOARD_MODELS
from fieldbus.errors import PortConfigError
from fieldbus.ports import STANDARD_BAUDS, RtuPort, TcpPort, check_unit, parse_port
from ops.config import (
    SECTION_CLASSES,
    SECTIONS,
    SETTINGS,
    Config,
    ConfigError,
    config_from_dict,
    example_toml,
    load_config,
    registry_maxima,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.example.toml"
SRC = Path("/etc/evse/evse.toml")


def minimal() -> dict[str, Any]:
    """Only the required settings; board and meter on separate buses."""
    return {
        "station": {"serial": "SN-42", "data_dir": "/var/lib/evse"},
        "board": {"kind": "evse-din", "port": "rtu:///dev/ttyUSB0"},
        "meter": {"kind": "sdm630", "port": "tcp://192.0.2.10:502"},
    }


def with_(base: dict[str, Any], **dotted: Any) -> dict[str, Any]:
    """``base`` with settings given as ``section__name=value``."""
    data = {k: dict(v) for k, v in base.items()}
    for key, value in dotted.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return data


def refusal(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source=SRC)
    return info.value


def assert_refused(data: dict[str, Any], key: str, *reason_parts: str) -> ConfigError:
    err = refusal(data)
    assert err.path == str(SRC)
    assert err.key == key, str(err)
    assert str(err) == f"{SRC}: {key}: {err.reason}"
    for part in reason_parts:
        assert part in err.reason, str(err)
    return err


# --- defaults ---------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "station.serial": "SN-42",
    "station.id": "SN-42",
    "station.data_dir": Path("/var/lib/evse"),
    "station.connector": "socket",
    "station.phases": 3,
    "connection.central_system_address": "",
    "limits.installer_max": 32.0,
    "limits.fallback": 6.0,
    "board.kind": "evse-din",
    "board.port": RtuPort("/dev/ttyUSB0", 9600, "N", 1, 8),
    "board.unit": 1,
    "board.poll_interval": 0.1,
    "board.timeout": 0.5,
    "board.failsafe_watchdog": 10.0,
    "meter.kind": "sdm630",
    "meter.port": TcpPort("192.0.2.10", 502),
    "meter.unit": 1,
    "meter.poll_interval": 1.0,
    "meter.timeout": 0.5,
    "authorization.mode": "local",
    "authorization.free_id_tag": "FREECHARGING",
    "authorization.tags": (),
    "authorization.blocked": (),
    "authorization.connection_timeout": 120,
    "safety.board_timeout": 1.0,
    "safety.meter_timeout": 5.0,
    "safety.overcurrent_margin": 2.0,
    "safety.overcurrent_time": 5.0,
    "safety.welded_time": 1.0,
    "safety.off_deadline": 5.0,
    "safety.persist_interval": 5.0,
    "safety.start_timeout": 10.0,
    "safety.power_status_file": Path("/run/powerstatus"),
    "safety.mains_lost_voltage": 0.0,
    "control.socket": Path("/var/lib/evse/control.sock"),
    "logging.level": "info",
    "web.enabled": True,
    "web.host": "127.0.0.1",
    "web.port": 8080,
    "web.certificate": None,
    "web.key": None,
    "web.session_lifetime": 28800.0,
    "firmware.releases": Path("/opt/evse"),
    "firmware.trial": 600.0,
    "logging.format": "auto",
}

RFID_DEFAULTS: dict[str, Any] = {
    "rfid.device": Path("/dev/ttyACM0"),
    "rfid.baud": 9600,
    "rfid.pattern": r"^\W*([0-9A-Fa-f]{4,20})\W*$",
    "rfid.reverse_bytes": False,
    "rfid.debounce": 2.0,
}


def value_of(config: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_default(key: str) -> None:
    config = config_from_dict(minimal())
    value = value_of(config, key)
    assert value == DEFAULTS[key]
    assert type(value) is type(DEFAULTS[key])


@pytest.mark.parametrize("key", sorted(RFID_DEFAULTS))
def test_rfid_default(key: str) -> None:
    config = config_from_dict(with_(minimal(), rfid__device="/dev/ttyACM0"))
    assert value_of(config, key) == RFID_DEFAULTS[key]


def test_every_setting_has_a_default_test() -> None:
    assert set(DEFAULTS) | set(RFID_DEFAULTS) == set(SETTINGS)


def test_optional_rfid_section_absent_is_none() -> None:
    config = config_from_dict(minimal())
    assert config.rfid is None
    assert config.source is None


def test_derived_defaults_follow_their_source() -> None:
    data = with_(
        minimal(),
        station__serial="WB-7",
        station__data_dir="/srv/station",
        board__kind="ev-cc",
        meter__kind="em24",
    )
    data["limits"] = {"installer_max": 32}
    config = config_from_dict(data)
    assert config.station.id == "WB-7"
    assert config.board.unit == 180  # the EV-CC table's default unit
    assert config.board.model.kind == "ev-cc"
    assert config.meter.model.kind == "em24"
    assert config.control.socket == Path("/srv/station/control.sock")


def test_given_values_override_derived_defaults() -> None:
    data = with_(minimal(), station__id="cp-1", board__unit=7, control__socket="/run/evse/c.sock")
    config = config_from_dict(data)
    assert (config.station.id, config.board.unit) == ("cp-1", 7)
    assert config.control.socket == Path("/run/evse/c.sock")


def test_dataclasses_match_the_table() -> None:
    assert [s.name for s in SECTIONS] == [
        f.name for f in dataclasses.fields(Config) if f.name not in ("source", "given")
    ]
    for section in SECTIONS:
        cls = SECTION_CLASSES[section.name]
        assert [f.name for f in dataclasses.fields(cls)] == [s.name for s in section.settings]


def test_config_is_frozen() -> None:
    config = config_from_dict(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.installer_max = 80  # type: ignore[misc]


# --- numeric range edges --------------------------------------------------------

# (key, low, high, unit, extra settings that keep cross-checks out of the way)
RANGES: list[tuple[str, float, float, str, dict[str, Any]]] = [
    ("limits.installer_max", 6, 80, "A", {}),
    ("limits.fallback", 0, 80, "A", {"limits__installer_max": 80}),
    ("board.unit", 1, 247, "", {}),
    ("board.poll_interval", 0.02, 2, "s", {"safety__board_timeout": 10}),
    # 5 s on an EVSE DIN: the switch-off may take 35.5 s (see test_off_deadline_*).
    ("board.timeout", 0.05, 5, "s", {"safety__board_timeout": 10, "safety__off_deadline": 60}),
    ("board.failsafe_watchdog", 1, 600, "s", {}),
    ("meter.unit", 1, 247, "", {}),
    ("meter.timeout", 0.05, 5, "s", {"safety__meter_timeout": 10}),
    ("authorization.connection_timeout", 1, 3600, "s", {}),
    ("rfid.debounce", 0, 60, "s", {"rfid__device": "/dev/ttyACM0"}),
    (
        "safety.board_timeout",
        0.1,
        10,
        "s",
        {"board__poll_interval": 0.02, "board__timeout": 0.05},
    ),
    ("safety.meter_timeout", 1, 60, "s", {"meter__poll_interval": 0.2}),
    ("safety.overcurrent_margin", 0.5, 10, "A", {}),
    ("safety.overcurrent_time", 0.1, 60, "s", {}),
    ("safety.welded_time", 0.1, 10, "s", {}),
    # 0.5 s is enough for a Heidelberg on TCP answering within 0.1 s (0.45 s).
    (
        "safety.off_deadline",
        0.5,
        60,
        "s",
        {
            "board__kind": "heidelberg",
            "board__port": "tcp://192.0.2.20:502",
            "board__timeout": 0.1,
            "limits__installer_max": 16,
        },
    ),
    ("safety.persist_interval", 1, 300, "s", {}),
    ("safety.start_timeout", 1, 600, "s", {}),
    ("safety.mains_lost_voltage", 0, 250, "V", {}),
]


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    return with_(data, **{dotted.replace(".", "__"): value})


def _base(extra: dict[str, Any]) -> dict[str, Any]:
    return with_(minimal(), **extra)


@pytest.mark.parametrize(("key", "lo", "hi", "unit", "extra"), RANGES)
def test_range_edges_accepted(
    key: str, lo: float, hi: float, unit: str, extra: dict[str, Any]
) -> None:
    integer = SETTINGS[key].kind.name == "INT"
    for edge in (lo, hi):
        value = int(edge) if integer else edge
        config = config_from_dict(_set(_base(extra), key, value))
        assert value_of(config, key) == value


@pytest.mark.parametrize(("key", "lo", "hi", "unit", "extra"), RANGES)
def test_range_edges_refused(
    key: str, lo: float, hi: float, unit: str, extra: dict[str, Any]
) -> None:
    integer = SETTINGS[key].kind.name == "INT"
    step = 1 if integer else 0.001
    suffix = f" {unit}" if unit else ""
    for outside in (lo - step, hi + step):
        value = round(outside, 6)
        err = assert_refused(_set(_base(extra), key, value), key)
        assert err.reason == f"{value:g}{suffix} is outside {lo:g}..{hi:g}{suffix}"


def test_meter_poll_interval_range() -> None:
    data = with_(minimal(), meter__poll_interval=0.2)
    assert config_from_dict(data).meter.poll_interval == 0.2
    assert_refused(with_(minimal(), meter__poll_interval=0.199), "meter.poll_interval")
    assert_refused(
        with_(minimal(), meter__poll_interval=60.1), "meter.poll_interval", "outside 0.2..60 s"
    )
    # 60 s is inside the range but no meter timeout can then be long enough
    # for one lost reply (safety.meter_timeout is at most 60 s).
    assert_refused(
        with_(minimal(), meter__poll_interval=60, safety__meter_timeout=60),
        "safety.meter_timeout",
        "meter.poll_interval + meter.timeout (60.5 s)",
    )


def test_unit_range_agrees_with_check_unit() -> None:
    for key in ("board.unit", "meter.unit"):
        setting = SETTINGS[key]
        assert setting.lo is not None and setting.hi is not None
        check_unit(int(setting.lo))
        check_unit(int(setting.hi))
        with pytest.raises(PortConfigError):
            check_unit(int(setting.lo) - 1)
        with pytest.raises(PortConfigError):
            check_unit(int(setting.hi) + 1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_refused(value: float) -> None:
    assert_refused(with_(minimal(), safety__welded_time=value), "safety.welded_time", "outside")


# --- choices --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("station.connector", ["socket", "cable"], ["Socket", "tethered"]),
        ("station.phases", [1, 3], [2, 0]),
        ("authorization.mode", ["free", "local"], ["open", "LOCAL"]),
        ("logging.level", ["debug", "info", "warning", "error"], ["critical", "warn"]),
        ("logging.format", ["auto", "journal", "text", "json"], ["syslog", "JSON lines"]),
        ("board.kind", ["evse-din", "heidelberg", "ev-cc"], ["evse_din", "simpleevse"]),
        (
            "meter.kind",
            ["sdm630", "sdm72", "abb-b23", "em24", "em24-e1"],
            ["sdm-630", "eastron"],
        ),
    ],
)
def test_choices(key: str, good: list[Any], bad: list[Any]) -> None:
    base = minimal()
    base["limits"] = {"installer_max": 16}  # within every board's maximum
    for value in good:
        assert value_of(config_from_dict(_set(base, key, value)), key) == value
    for value in bad:
        assert_refused(_set(base, key, value), key, "is not one of")


def test_single_phase_meter_on_single_phase_station() -> None:
    data = with_(minimal(), station__phases=1, meter__kind="sdm120")
    assert config_from_dict(data).meter.kind == "sdm120"


def test_choice_suggests_the_closest() -> None:
    err = assert_refused(with_(minimal(), board__kind="evse_din"), "board.kind")
    assert err.reason == (
        "'evse_din' is not one of 'evse-din', 'heidelberg', 'ev-cc', 'ev-cc-basic'; "
        "did you mean 'evse-din'?"
    )


@pytest.mark.parametrize("baud", [1200, 9600, 19200, 115200])
def test_rfid_baud_accepted(baud: int) -> None:
    config = config_from_dict(with_(minimal(), rfid__device="/dev/ttyACM0", rfid__baud=baud))
    assert config.rfid is not None and config.rfid.baud == baud


@pytest.mark.parametrize("baud", [0, 9601, 250000])
def test_rfid_baud_refused(baud: int) -> None:
    assert_refused(
        with_(minimal(), rfid__device="/dev/ttyACM0", rfid__baud=baud), "rfid.baud", "not one of"
    )


# --- strict types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("limits.installer_max", "16", "expected a number, got the text '16'"),
        ("limits.installer_max", True, "expected a number, got true (a boolean)"),
        ("station.phases", True, "expected a whole number, got true (a boolean)"),
        ("station.phases", 3.0, "expected a whole number, got the number 3"),
        ("board.unit", "1", "expected a whole number, got the text '1'"),
        ("station.serial", 42, "expected text, got the whole number 42"),
        ("board.port", ["tcp://x"], "expected text, got a list"),
        ("station.data_dir", {"a": 1}, "expected absolute path, got a table"),
        ("logging.level", dt.date(2024, 1, 1), "expected text, got a date/time"),
        ("authorization.tags", "ABC", "expected a list of id tags, got the text 'ABC'"),
    ],
)
def test_strict_types(key: str, value: Any, reason: str) -> None:
    err = assert_refused(_set(minimal(), key, value), key)
    assert err.reason == reason


def test_bool_setting_is_strict() -> None:
    base = with_(minimal(), rfid__device="/dev/ttyACM0")
    config = config_from_dict(_set(base, "rfid.reverse_bytes", True))
    assert config.rfid is not None and config.rfid.reverse_bytes is True
    err = assert_refused(_set(base, "rfid.reverse_bytes", 1), "rfid.reverse_bytes")
    assert err.reason == "expected true or false, got the whole number 1"


def test_integer_accepted_for_a_number() -> None:
    config = config_from_dict(with_(minimal(), limits__installer_max=16))
    assert config.limits.installer_max == 16.0
    assert isinstance(config.limits.installer_max, float)


# --- text rules ------------------------------------------------------------------


def test_serial_length() -> None:
    assert config_from_dict(with_(minimal(), station__serial="S" * 25)).station.serial == "S" * 25
    err = assert_refused(with_(minimal(), station__serial="S" * 26), "station.serial")
    assert err.reason == f"'{'S' * 26}' is 26 characters; allowed 1..25"
    assert_refused(with_(minimal(), station__serial=""), "station.serial", "0 characters")
    assert_refused(with_(minimal(), station__serial="a\tb"), "station.serial", "control")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is 0 characters; allowed 1..48"),
        ("x" * 49, "is 49 characters; allowed 1..48"),
        ("cp/1", "contains '/'"),
        ("cp 1", "contains whitespace"),
        ("cp\u00a01", "contains"),
        ("cp\x7f", "unprintable"),
    ],
)
def test_station_id_refused(value: str, reason: str) -> None:
    assert_refused(with_(minimal(), station__id=value), "station.id", reason)


def test_station_id_edges_accepted() -> None:
    for value in ("c", "x" * 48, "CP-01_x.b"):
        assert config_from_dict(with_(minimal(), station__id=value)).station.id == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        # station.id is the charge point id (it seeds ChargePointId): the
        # registry's rule, so the file cannot hold what the station refuses.
        ("CP-01_ä.b", "not printable ASCII"),
        ("cp:1", "contains ':' (the HTTP Basic user-id cannot"),
    ],
)
def test_station_id_follows_the_charge_point_id_rule(value: str, reason: str) -> None:
    assert_refused(with_(minimal(), station__id=value), "station.id", reason)


def test_derived_station_id_refusal_says_it_is_the_default() -> None:
    err = assert_refused(with_(minimal(), station__serial="SN 1"), "station.id")
    assert err.reason == (
        "'SN 1' contains whitespace (it is the last segment of the URL) "
        "(the default, same as station.serial); set station.id"
    )


def test_id_tags_normalized_upper_case() -> None:
    data = with_(
        minimal(),
        authorization__tags=["04a2b3c4", "DeadBeef"],
        authorization__blocked=["bad1"],
        authorization__free_id_tag="free-1",
    )
    auth = config_from_dict(data).authorization
    assert auth.tags == ("04A2B3C4", "DEADBEEF")
    assert auth.blocked == ("BAD1",)
    assert auth.free_id_tag == "FREE-1"


def test_id_tag_edges() -> None:
    auth = config_from_dict(with_(minimal(), authorization__tags=["A", "B" * 20])).authorization
    assert auth.tags == ("A", "B" * 20)


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("C" * 21, "is 21 characters; an id tag has 1..20"),
        ("", "is 0 characters; an id tag has 1..20"),
        ("AB CD", "not printable ASCII"),
        ("ÄBC", "not printable ASCII"),
    ],
)
def test_bad_id_tag_named_by_index(tag: str, reason: str) -> None:
    data = with_(minimal(), authorization__tags=["AA", "BB", tag])
    assert_refused(data, "authorization.tags[2]", reason)


def test_non_text_id_tag_named_by_index() -> None:
    data = with_(minimal(), authorization__blocked=["AA", 1234])
    err = assert_refused(data, "authorization.blocked[1]")
    assert err.reason == "expected an id tag (text), got the whole number 1234"


def test_bad_free_id_tag() -> None:
    assert_refused(
        with_(minimal(), authorization__free_id_tag="X" * 21),
        "authorization.free_id_tag",
        "21 characters",
    )


def test_tag_in_both_lists_is_refused() -> None:
    data = with_(minimal(), authorization__tags=["aa", "bb"], authorization__blocked=["cc", "BB"])
    err = assert_refused(data, "authorization.blocked[1]")
    assert err.reason == "'BB' is also accepted by authorization.tags[1]"


def test_duplicate_tag_is_refused() -> None:
    data = with_(minimal(), authorization__tags=["aa", "bb", "AA"])
    err = assert_refused(data, "authorization.tags[2]")
    assert err.reason == "'AA' repeats authorization.tags[0]"


def test_blocked_free_id_tag_is_refused() -> None:
    data = with_(minimal(), authorization__blocked=["freecharging"])
    assert_refused(data, "authorization.blocked[0]", "authorization.free_id_tag")


# --- ports, paths ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://x", "rtu://dev/ttyUSB0", "rtu:///dev/ttyUSB0?baud=1234", "tcp://", "tcp://h:99999"],
)
def test_bad_port_reason_is_the_port_parser_message(url: str) -> None:
    with pytest.raises(PortConfigError) as info:
        parse_port(url)
    err = assert_refused(with_(minimal(), board__port=url), "board.port")
    assert err.reason == str(info.value)


def test_ports_parsed() -> None:
    data = with_(minimal(), meter__port="rtu:///dev/ttyUSB1?baud=19200&parity=E")
    config = config_from_dict(data)
    assert config.meter.port == RtuPort("/dev/ttyUSB1", 19200, "E", 1, 8)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("station.data_dir", "data"),
        ("station.data_dir", "~/evse"),
        ("control.socket", "control.sock"),
        ("rfid.device", "ttyACM0"),
    ],
)
def test_relative_paths_refused(key: str, value: str) -> None:
    data = _set(with_(minimal(), rfid__device="/dev/ttyACM0"), key, value)
    assert_refused(data, key, "is relative; write an absolute path")


def test_empty_path_refused() -> None:
    assert_refused(with_(minimal(), station__data_dir=""), "station.data_dir", "not a path")


def test_socket_path_length() -> None:
    longest = "/" + "s" * 106
    assert config_from_dict(with_(minimal(), control__socket=longest)).control.socket == Path(
        longest
    )
    assert_refused(
        with_(minimal(), control__socket=longest + "s"), "control.socket", "108 bytes", "107"
    )


def test_derived_socket_path_too_long_names_the_socket() -> None:
    data = with_(minimal(), station__data_dir="/" + "d" * 100)
    err = assert_refused(data, "control.socket", "(the default, <station.data_dir>/control.sock)")
    assert err.reason.endswith("; set control.socket")


def test_rfid_section_needs_a_device() -> None:
    data = minimal()
    data["rfid"] = {"baud": 9600}
    err = assert_refused(data, "rfid.device")
    assert err.reason == "required setting is missing"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"^[0-9A-F]+$", "has 0 groups; it needs exactly one"),
        (r"^(\w)(\w+)$", "has 2 groups; it needs exactly one"),
        (r"^([0-9A-F+$", "is not a regular expression"),
        ("a{99999999999999999}", "is not a regular expression"),
    ],
)
def test_rfid_pattern_refused(pattern: str, reason: str) -> None:
    data = with_(minimal(), rfid__device="/dev/ttyACM0", rfid__pattern=pattern)
    assert_refused(data, "rfid.pattern", reason)


def test_rfid_pattern_accepted() -> None:
    data = with_(minimal(), rfid__device="/dev/ttyACM0", rfid__pattern=r"^(?:ID:)?(\w+)$")
    rfid = config_from_dict(data).rfid
    assert rfid is not None
    assert rfid.pattern == r"^(?:ID:)?(\w+)$"


# --- required, unknown -------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["station.serial", "station.data_dir", "board.kind", "board.port", "meter.kind", "meter.port"],
)
def test_required(key: str) -> None:
    data = minimal()
    section, name = key.split(".")
    del data[section][name]
    err = assert_refused(data, key)
    assert err.reason == "required setting is missing"


def test_empty_document_names_the_first_required_setting() -> None:
    assert str(refusal({})) == f"{SRC}: station.serial: required setting is missing"


@pytest.mark.parametrize(
    ("data_key", "value", "key", "reason"),
    [
        ("board__unti", 2, "board.unti", "unknown setting; did you mean board.unit?"),
        ("station__seral", "x", "station.seral", "unknown setting; did you mean station.serial?"),
        (
            "board__data_dir",
            "/x",
            "board.data_dir",
            "unknown setting; did you mean station.data_dir?",
        ),
        (
            "logging__zzz",
            1,
            "logging.zzz",
            "unknown setting; [logging] has level, format",
        ),
    ],
)
def test_unknown_setting(data_key: str, value: Any, key: str, reason: str) -> None:
    err = assert_refused(with_(minimal(), **{data_key: value}), key)
    assert err.reason == reason


def test_unknown_checked_before_missing() -> None:
    data = minimal()
    data["station"] = {"seral": "SN-1", "data_dir": "/var/lib/evse"}
    assert refusal(data).key == "station.seral"


def test_unknown_section() -> None:
    data = minimal()
    data["statoin"] = {}
    err = assert_refused(data, "statoin")
    assert err.reason == "unknown section; did you mean [station]?"


def test_setting_outside_its_section() -> None:
    data = minimal()
    data["serial"] = "SN-1"
    err = assert_refused(data, "serial")
    assert err.reason == "unknown section; did you mean station.serial (under [station])?"


def test_unrelated_unknown_section_lists_the_sections() -> None:
    data = minimal()
    data["zzzzzz"] = {}
    err = assert_refused(data, "zzzzzz")
    assert "station, limits, board, meter" in err.reason


def test_section_that_is_not_a_table() -> None:
    data = minimal()
    data["limits"] = 32
    err = assert_refused(data, "limits")
    assert err.reason == "expected a table [limits], got the whole number 32"


# --- relations between settings ------------------------------------------------------


def test_installer_max_above_the_board_maximum() -> None:
    data = with_(minimal(), board__kind="heidelberg")
    err = assert_refused(data, "limits.installer_max")
    assert err.reason == "32 A is above the Heidelberg Energy Control's maximum of 16 A"
    data["limits"] = {"installer_max": 16}
    assert config_from_dict(data).limits.installer_max == 16


def test_fallback_above_installer_max() -> None:
    data = with_(minimal(), limits__installer_max=16, limits__fallback=20)
    err = assert_refused(data, "limits.fallback")
    assert err.reason == "20 A is above limits.installer_max (16 A)"


@pytest.mark.parametrize(
    ("written", "applied"), [(0, 0.0), (3, 0.0), (5.9, 0.0), (6, 6.0), (10.5, 10.5)]
)
def test_fallback_below_6_a_means_off(written: float, applied: float) -> None:
    limits = config_from_dict(with_(minimal(), limits__fallback=written)).limits
    assert limits.fallback == written  # kept as written
    assert limits.fallback_current == applied


@pytest.mark.parametrize(
    ("kind", "installer_max", "fallback_max"),
    [("evse-din", 32, 32), ("evse-din", 80, 80), ("heidelberg", 16, 16), ("ev-cc", 20, 20)],
)
def test_the_registry_learns_the_fallback_maximum(
    kind: str, installer_max: float, fallback_max: float
) -> None:
    data = with_(minimal(), board__kind=kind, limits__installer_max=installer_max)
    config = config_from_dict(data)
    assert config.fallback_max == fallback_max
    assert registry_maxima(config) == {"FallbackLimit": fallback_max}


def test_fallback_in_force_follows_the_one_rule() -> None:
    # evse.limits.effective_fallback: the file's value, 0 below 6 A, at most installer_max.
    limits = config_from_dict(with_(minimal(), limits__installer_max=16, limits__fallback=16))
    assert limits.limits.fallback_current == 16.0


def test_three_phase_station_with_single_phase_meter() -> None:
    data = with_(minimal(), meter__kind="sdm120")
    assert_refused(data, "meter.kind", "measures 1 phase(s) but station.phases is 3")


def test_same_unit_on_one_bus() -> None:
    data = with_(minimal(), meter__port="rtu:///dev/ttyUSB0")
    err = assert_refused(data, "meter.unit")
    assert err.reason == (
        "unit 1 on rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1&bytesize=8 is already "
        "the board's; two devices on one bus need different unit ids"
    )
    assert config_from_dict(with_(data, meter__unit=2)).meter.unit == 2


def test_same_unit_on_one_tcp_gateway() -> None:
    data = with_(minimal(), board__port="tcp://192.0.2.10:502")
    assert_refused(data, "meter.unit", "already the board's")
    # Another TCP port on the same host is another device.
    assert config_from_dict(with_(data, board__port="tcp://192.0.2.10:503")).board.unit == 1


def test_one_serial_device_with_two_line_settings() -> None:
    data = with_(minimal(), meter__port="rtu:///dev/ttyUSB0?baud=19200", meter__unit=2)
    assert_refused(data, "meter.port", "/dev/ttyUSB0 is also the board's bus", "baud")


def test_rfid_on_the_modbus_bus() -> None:
    data = with_(minimal(), rfid__device="/dev/ttyUSB0")
    err = assert_refused(data, "rfid.device")
    assert err.reason == "/dev/ttyUSB0 is the board's Modbus bus (board.port)"


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        (
            {"safety__board_timeout": 0.6},
            "safety.board_timeout",
            "0.6 s must be longer than board.poll_interval + board.timeout (0.6 s), "
            "or one lost reply is a fault",
        ),
        (
            {"meter__poll_interval": 4.5},
            "safety.meter_timeout",
            "5 s must be longer than meter.poll_interval + meter.timeout (5 s), "
            "or one lost reply is a fault",
        ),
    ],
)
def test_fault_timeouts_longer_than_a_poll(extra: dict[str, Any], key: str, reason: str) -> None:
    err = assert_refused(with_(minimal(), **extra), key)
    assert err.reason == reason


# --- the switch-off budget (evse.budget) and safety.off_deadline ------------------------

RTU_9600 = parse_port("rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1")
RTU_1200 = parse_port("rtu:///dev/ttyUSB0?baud=1200&parity=N&stopbits=1")
TCP = parse_port("tcp://192.0.2.20:502")
# t3.5 at 9600 8N1: 3.5 characters of 10 bits; the settle after an aborted
# exchange waits max(20 ms, 4 t3.5) of quiet; both before every attempt.
T35_9600 = 3.5 * 10 / 9600
LINE_9600 = T35_9600 + 0.02
T35_1200 = 3.5 * 10 / 1200
LINE_1200 = T35_1200 + 4 * T35_1200
LINE_TCP = 0.05  # the pause after a refused connection


# (model, port, board timeout, seconds): written out from the sequence
# "exchange on the wire + each request: gap + 2 attempts x (timeout + line)".
BUDGETS: list[tuple[str, Any, float, float]] = [
    # EVSE DIN: current 0 (FC16), then the enable bit of register 1004 is a
    # read-modify-write: 3 requests, each after the model's 0.1 s gap.
    ("evse-din", RTU_9600, 0.5, (0.5 + LINE_9600) + 3 * (0.1 + 2 * (0.5 + LINE_9600))),
    ("evse-din", RTU_1200, 0.5, (0.5 + LINE_1200) + 3 * (0.1 + 2 * (0.5 + LINE_1200))),
    ("evse-din", TCP, 0.5, 0.55 + 3 * (0.1 + 2 * 0.55)),
    ("evse-din", RTU_9600, 0.2, (0.2 + LINE_9600) + 3 * (0.1 + 2 * (0.2 + LINE_9600))),
    # Heidelberg: no enable switch, no gap: current 0 only.
    ("heidelberg", RTU_9600, 0.5, 3 * (0.5 + LINE_9600)),
    ("heidelberg", TCP, 0.5, 3 * 0.55),
    ("heidelberg", TCP, 0.1, 3 * (0.1 + LINE_TCP)),
    # EV-CC: current 0, then coil 400 (one write), no gap.
    ("ev-cc", TCP, 0.5, 0.55 + 2 * 2 * 0.55),
    ("ev-cc", RTU_9600, 0.5, 5 * (0.5 + LINE_9600)),
]


@pytest.mark.parametrize(("kind", "port", "timeout", "seconds"), BUDGETS)
def test_switch_off_budget_per_board_model(
    kind: str, port: Any, timeout: float, seconds: float
) -> None:
    budget = off_budget(BOARD_MODELS[kind], port, timeout=timeout, retries=1)
    assert budget.seconds == pytest.approx(seconds, abs=1e-9)
    assert budget.describe()


def test_switch_off_requests_per_board_model() -> None:
    assert off_requests(BOARD_MODELS["evse-din"]) == (
        "write current 0",
        "read enable register",
        "write enable register",
    )
    assert off_requests(BOARD_MODELS["heidelberg"]) == ("write current 0",)
    assert off_requests(BOARD_MODELS["ev-cc"]) == ("write current 0", "write enable coil")
    # The lock's writes are no part of the off sequence (ordinary, after the off).
    assert off_requests(BOARD_MODELS["ev-cc-basic"]) == ("write current 0", "write enable coil")
    # A new model: add it.
    assert set(BOARD_MODELS) == {"evse-din", "heidelberg", "ev-cc", "ev-cc-basic"}


def test_switch_off_budget_counts_retries_and_a_slower_device_on_the_bus() -> None:
    din = BOARD_MODELS["evse-din"]
    none = off_budget(din, TCP, timeout=0.5, retries=0).seconds
    assert none == pytest.approx(0.55 + 3 * (0.1 + 0.55))
    # A meter on the same bus with a 2 s timeout may be on the wire first.
    shared = off_budget(din, TCP, timeout=0.5, retries=1, bus_timeout=2.0).seconds
    assert shared == pytest.approx(2.05 + 3 * (0.1 + 2 * 0.55))
    with pytest.raises(ValueError, match="positive"):
        off_budget(din, TCP, timeout=0, retries=1)
    with pytest.raises(ValueError, match="retries"):
        off_budget(din, TCP, timeout=0.5, retries=-1)


def test_off_deadline_too_short_for_an_evse_din_is_refused(tmp_path: Path) -> None:
    # Today's default (1.0 s) is one write's worst case alone (0.5 s x 2 attempts).
    path = tmp_path / "evse.toml"
    path.write_text(MINIMAL_TOML + "\n[safety]\noff_deadline = 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.key) == (str(path), "safety.off_deadline")
    assert err.reason.startswith(
        "1 s is shorter than the 3.97 s the EVSE DIN / SimpleEVSE-WB may need to switch off "
        "on rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1&bytesize=8 with board.timeout "
        "0.5 s and 1 retry ("
    ), err.reason
    assert err.reason.endswith(
        "raise safety.off_deadline to at least 3.97 s or lower board.timeout"
    )
    assert str(err).startswith(f"{path}: safety.off_deadline: 1 s is shorter than the 3.97 s")
    # The number shown is enough.
    path.write_text(MINIMAL_TOML + "\n[safety]\noff_deadline = 3.97\n")
    assert load_config(path).safety.off_deadline == 3.97


def test_off_deadline_counts_the_meter_on_the_same_bus() -> None:
    data = with_(
        minimal(),
        meter__port="rtu:///dev/ttyUSB0",
        meter__unit=2,
        meter__timeout=2.0,
        safety__off_deadline=4.0,
    )
    # 2 s meter exchange on the wire, then the EVSE DIN's 3 requests: 5.47 s.
    err = assert_refused(data, "safety.off_deadline", "5.47 s", "(shared with the meter)")
    assert err.reason.startswith("4 s is shorter than the 5.47 s")
    assert config_from_dict(with_(data, safety__off_deadline=5.47)).safety.off_deadline == 5.47


def test_off_deadline_follows_the_board_timeout() -> None:
    data = with_(minimal(), board__timeout=1.0, safety__board_timeout=2.0)
    assert_refused(data, "safety.off_deadline", "7.47 s", "board.timeout 1 s")
    assert config_from_dict(with_(data, safety__off_deadline=7.5)).safety.off_deadline == 7.5


# Every standard line setting: 8N1 (common on these boards) and the three
# 11-bit framings of Modbus over Serial Line 2.5.1, at every baud rate.
DEFAULT_PORTS = ["tcp://192.0.2.20:502"] + [
    f"rtu:///dev/ttyUSB0?baud={baud}&parity={parity}&stopbits={stop}"
    for baud in STANDARD_BAUDS
    for parity, stop in (("N", 1), ("E", 1), ("O", 1), ("N", 2))
]


@pytest.mark.parametrize("kind", ["evse-din", "heidelberg", "ev-cc"])
def test_the_default_off_deadline_suits_every_board_with_default_timeouts(kind: str) -> None:
    for port in DEFAULT_PORTS:
        data = with_(minimal(), board__kind=kind, board__port=port, limits__installer_max=16)
        assert config_from_dict(data).safety.off_deadline == 5.0, port
        shared = with_(data, meter__port=port, meter__unit=2)
        assert config_from_dict(shared).safety.off_deadline == 5.0, port


# --- files ------------------------------------------------------------------------


MINIMAL_TOML = """\
[station]
serial = "SN-42"
data_dir = "/var/lib/evse"

[board]
kind = "evse-din"
port = "rtu:///dev/ttyUSB0"

[meter]
kind = "sdm630"
port = "tcp://192.0.2.10:502"
"""


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "evse.toml"
    path.write_text(MINIMAL_TOML)
    config = load_config(path)
    assert config.source == path
    assert config == dataclasses.replace(config_from_dict(minimal()), source=path)


def test_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evse.toml"
    path.write_text(MINIMAL_TOML.replace('kind = "evse-din"', 'kind = "evse-din"\nunit = 248'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: board.unit: 248 is outside 1..247"


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "evse.toml"
    path.write_text('[station]\nserial = "SN-1"\ndata_dir = /var/lib/evse\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line 3: invalid value (column 12)"


def test_syntax_error_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "evse.toml"
    path.write_text('[station]\nserial = "SN-1')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key in ("end of file", "line 2")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a configuration file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "evse.toml"
    path.write_bytes(b'[station]\nserial = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line 2: not UTF-8 text"


def test_builtin_source_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({})
    assert str(info.value) == "<builtin>: station.serial: required setting is missing"


def test_config_error_without_key() -> None:
    assert str(ConfigError("/x.toml", "", "no such file")) == "/x.toml: no such file"


# --- the example file ----------------------------------------------------------------


def test_example_file_is_generated() -> None:
    assert EXAMPLE.read_text() == example_toml(), (
        "docs/config.example.toml is stale: regenerate it with "
        "python -c 'from ops.config import example_toml; print(example_toml(), end=\"\")' "
        "> docs/config.example.toml"
    )


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.station.serial == "EVSE-0001"
    assert config.station.data_dir == Path("/var/lib/evse")
    assert config.board.port == config.meter.port
    assert (config.board.unit, config.meter.unit) == (1, 2)
    assert config.rfid is None


_COMMENTED = re.compile(r"^# (\[\w+\]|\w+ = .*)$")


def test_example_commented_lines_show_the_values_taken() -> None:
    """Uncommenting every commented setting (and [rfid]) changes nothing else."""
    text = example_toml()
    plain = tomllib.loads(text)
    uncommented = "\n".join(
        m.group(1) if (m := _COMMENTED.match(line)) else line for line in text.splitlines()
    )
    full = tomllib.loads(uncommented)
    for section in SECTIONS:
        # An optional setting that is unset by default has no line to uncomment.
        names = {s.name for s in section.settings if s.default is not None or s.required}
        assert set(full[section.name]) == names, section.name
    base = config_from_dict(plain)
    everything = config_from_dict(full)
    assert everything.rfid is not None
    assert everything.rfid.device == Path("/dev/ttyACM0")
    assert dataclasses.replace(everything, rfid=None) == base


def test_example_documents_every_setting_with_its_range() -> None:
    text = example_toml()
    assert "# Number (A), 6..80. Default: 32.0." in text
    assert "# Whole number, 1..247. Default: the board model's default unit." in text
    assert "Below 6 A means 0 A: no charging" in text
    assert "# Text, 1..25 characters, printable. Required." in text
    for line in text.splitlines():
        assert len(line) <= 80 or "=" in line, line


# --- robustness -------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "socket",
            "free",
            "evse-din",
            "heidelberg",
            "sdm120",
            "tcp://h:1",
            "rtu:///dev/ttyUSB0",
            "/var/lib/evse",
            "/dev/ttyUSB0",
            "(x)",
            "((",
            "a{99999999999999999}",
        ]
    ),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_section_names = st.one_of(st.sampled_from([s.name for s in SECTIONS]), st.text(max_size=8))


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in draw(st.lists(_section_names, max_size=6)):
        section = next((s for s in SECTIONS if s.name == name), None)
        keys = st.text(max_size=8)
        if section is not None:
            keys = st.one_of(st.sampled_from([s.name for s in section.settings]), keys)
        data[name] = draw(
            st.one_of(st.dictionaries(keys, _values, max_size=6), _scalars, st.lists(_scalars))
        )
    return data


def _outcome(fn: Callable[[], object]) -> ConfigError | None:
    """The ConfigError ``fn`` raises, or None; any other exception propagates."""
    try:
        fn()
    except ConfigError as exc:
        return exc
    return None


@settings(max_examples=300, deadline=None)
@given(_documents())
def test_random_documents_raise_only_config_error(data: dict[str, Any]) -> None:
    err = _outcome(lambda: config_from_dict(data, source=SRC))
    assert err is None or str(err).startswith(f"{SRC}: ")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SETTINGS)), _values)
def test_one_random_value_in_a_good_document(key: str, value: Any) -> None:
    data = _set(with_(minimal(), rfid__device="/dev/ttyACM0"), key, value)
    err = _outcome(lambda: config_from_dict(data, source=SRC))
    if err is not None:
        assert str(err).startswith(f"{SRC}: ")
        # The refusal names a setting (or an item of one): this one or one it relates to.
        assert err.key.split("[")[0] in SETTINGS


_toml_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "[station]",
                "[board]",
                "[rfid]",
                'serial = "SN"',
                'data_dir = "/d"',
                'kind = "evse-din"',
                "unit = 300",
                "x = ",
                "[[station]]",
                "a.b = 1",
                'port = """',
            ]
        ),
        st.text(max_size=20),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(_toml_lines)
def test_random_files_raise_only_config_error(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evse.toml"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
        err = _outcome(lambda: load_config(path))
        assert err is None or str(err).startswith(f"{path}: ")
