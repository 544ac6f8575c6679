"""Every setting as people see it: ``evse config list|get|set`` and ``GET /config``.

One row per setting, from the one declaration (``ocpp16.settings.Key``) of
both tables: the registry's keys (``ocpp16.config.KEYS``, values from the
station's store) and the file's hardware and installation settings
(``ops.config.SECTIONS``, values from the TOML file). Each row says its value,
unit, range, where the value comes from (``source``: file, registry, default,
command line) and who may change it (``access``: read-only, installer,
installer + central system, write-only). A secret reads "set" or "not set",
here as on the installer page; OCPP GetConfiguration lists it without a value.

The same functions answer with a station running (the control socket, which
applies a change at once) and without one (``offline``: straight into the
store, after the file's values were applied by the registry's seeding rule,
so that the start that follows keeps the change).

A row's fields: ``name`` (the installer or dotted file name, else the OCPP
name), ``key`` (the registry's OCPP name, or the dotted file name), ``ocpp``
(the OCPP name when the central system sees it), ``value``, ``unit``,
``range``, ``source``, ``access``, ``default``, ``description``, ``owner``
("registry" or "file"), ``group`` (the installer page group), ``section``
(the file's section), ``readonly``, ``secret``, ``reboot_required``, ``file``
(the file setting that seeds a registry key), ``file_value`` (its value in
the file given, if any) and ``note`` (what the file and the registry say
differently, in words).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evse.store import Store
from ocpp16.config import GROUPS, SECRET_SET, SECRET_UNSET, ChangeResult, Configuration
from ocpp16.settings import Derived, Key
from ops.config import (
    SEATS,
    SECTIONS,
    SETTINGS,
    Config,
    file_seeds,
    registry_maxima,
    seed_registry,
)

__all__ = [
    "SECRET_SET",
    "SECRET_UNSET",
    "FileNeeded",
    "UnknownSetting",
    "change",
    "change_async",
    "file_rows",
    "format_table",
    "lookup",
    "offline",
    "registry_rows",
    "render",
    "rows",
]

#: Column headings of ``format_table``, with the row field each shows.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("NAME", "name"),
    ("VALUE", "value"),
    ("UNIT", "unit"),
    ("SOURCE", "source"),
    ("ACCESS", "access"),
    ("RANGE", "range"),
)

#: The widest a column grows before a longer cell just overflows it.
MAX_WIDTH = {"name": 40, "value": 32, "unit": 4, "source": 24, "access": 30}


class UnknownSetting(ValueError):
    """No setting of either table has this name (a ValueError: a usage error, exit 2)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown setting {name!r} (evse config list shows them all)")


class FileNeeded(ValueError):
    """A setting of the TOML file, asked about without the file."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name} is a setting of the TOML file: give --config FILE to read it")


# --- rows ---------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A file value as it would be written (numbers short, ports as URLs)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    url = getattr(value, "url", None)
    if isinstance(url, str):
        return url
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _default_text(key: Key) -> str:
    if key.required:
        return "(required)"
    if isinstance(key.default, Derived):
        return key.default.text
    return _text(key.default)


def file_rows(config: Config | None) -> list[dict[str, Any]]:
    """The file's own settings (not the seats: their registry row shows them).

    Without a file (``evse config --data-dir``) there is nothing to show: the
    file is the truth for these and the store does not keep them.
    """
    if config is None:
        return []
    where = str(config.source) if config.source is not None else "the built-in configuration"
    out: list[dict[str, Any]] = []
    for section in SECTIONS:
        part = getattr(config, section.name)
        for key in section.settings:
            dotted = f"{section.name}.{key.name}"
            if key.seeds is not None:
                continue
            absent = part is None
            out.append(
                {
                    "name": dotted,
                    "key": dotted,
                    "ocpp": None,
                    "value": "" if absent else _text(getattr(part, key.name)),
                    "unit": key.unit,
                    "range": key.range_text,
                    "source": "file" if dotted in config.given else "default",
                    "access": key.access_text,
                    "default": _default_text(key),
                    "description": key.description,
                    "owner": "file",
                    "group": None,
                    "section": section.name,
                    "readonly": True,
                    "secret": False,
                    "reboot_required": True,
                    "file": dotted,
                    "file_value": None,
                    "note": f"[{section.name}] absent: not used"
                    if absent
                    else f"read from {where} at start; edit the file and restart to change it",
                }
            )
    return out


def _note(row: Mapping[str, Any], file_value: str | None) -> str:
    """What the file and the registry say differently about a seeded key."""
    file_key, seed, value = row["file"], row["file_seed"], row["value"]
    if file_key is None or file_value is None:
        return ""
    if seed is None:
        if row["source"] == "default" and value != file_value:
            return f"the file's {file_key} ({file_value}) seeds it at the next start"
        if value != file_value:
            return (
                f"stored before the file was read; the file's {file_key} ({file_value}) "
                "wins only once changed after the next start"
            )
        return ""
    if file_value != seed:
        return f"the file's {file_key} changed ({seed} -> {file_value}): it wins at the next start"
    if value != file_value and row["source"] != "command line":
        return (
            f"changed at run time; the file's {file_key} ({file_value}) is unchanged, "
            "so this stays until the file changes"
        )
    return ""


def registry_rows(registry: Configuration, config: Config | None = None) -> list[dict[str, Any]]:
    """Every registry key: the installer page's settings (grouped as in station-spec
    §3), then the other OCPP keys, in the registry's order."""
    seeds = file_seeds(config) if config is not None else {}
    installer = [k for k in registry.keys if k.group is not None]
    installer.sort(key=lambda k: GROUPS.index(k.group or ""))  # stable: table order within
    others = [k for k in registry.keys if k.group is None]
    out: list[dict[str, Any]] = []
    for key in (*installer, *others):
        row = registry.row(key)
        row["owner"] = "registry"
        row["section"] = None
        file_value = seeds.get(key.name)
        row["file_value"] = file_value
        row["note"] = _note(row, file_value)
        out.append(row)
    return out


def rows(registry: Configuration, config: Config | None = None) -> list[dict[str, Any]]:
    """Every setting of the station: the registry's, then the file's."""
    return [*registry_rows(registry, config), *file_rows(config)]


def lookup(registry: Configuration, config: Config | None, name: str) -> dict[str, Any]:
    """The row of one setting, by any of its names (installer, OCPP, dotted file
    name, the file name of a seeded key); ``UnknownSetting`` if none has it."""
    key = _registry_key(registry, name)
    if key is not None:
        return next(r for r in registry_rows(registry, config) if r["key"] == key.name)
    for row in file_rows(config):
        if row["name"] == name:
            return row
    if name in SETTINGS:
        raise FileNeeded(name)
    raise UnknownSetting(name)


def _registry_key(registry: Configuration, name: str) -> Key | None:
    seeded = SEATS.get(name)
    return registry.resolve(seeded if seeded is not None else name)


def _file_refusal(name: str, config: Config | None) -> dict[str, Any] | None:
    """The answer to a change of a file setting: refused, with where to change it."""
    if name not in SETTINGS or name in SEATS:
        return None
    where = (
        str(config.source)
        if config is not None and config.source is not None
        else "the configuration file"
    )
    return {
        "status": "Rejected",
        "key": name,
        "reason": f"{name} is read from {where} at start (read-only at run time): "
        "edit the file and restart the station",
        "note": "",
    }


def _answer(registry: Configuration, name: str, result: ChangeResult) -> dict[str, Any]:
    note = ""
    key = _registry_key(registry, name)
    if result.ok and key is not None and key.file is not None:
        note = (
            f"stored; the file's {key.file} wins again only when the file is changed "
            "(it is applied at each start)"
        )
    return {"status": result.status, "key": result.key, "reason": result.reason, "note": note}


def change(
    registry: Configuration,
    config: Config | None,
    name: str,
    value: str,
    *,
    source: str = "installer",
) -> dict[str, Any]:
    """Change one setting, as ``evse config set`` and ``POST /config`` do.

    A file setting is Rejected (the file is read-only at run time); the file
    name of a seeded key changes that registry key. ``UnknownSetting`` for a
    name neither table has.
    """
    refused = _file_refusal(name, config)
    if refused is not None:
        return refused
    key = _registry_key(registry, name)
    if key is None:
        raise UnknownSetting(name)
    return _answer(registry, name, registry.change(key.name, value, source=source))


async def change_async(
    registry: Configuration,
    config: Config | None,
    name: str,
    value: str,
    *,
    source: str = "installer",
) -> dict[str, Any]:
    """``change`` for trio code (the control socket): the write and the reading of
    the files a path names run in a worker thread."""
    refused = _file_refusal(name, config)
    if refused is not None:
        return refused
    key = _registry_key(registry, name)
    if key is None:
        raise UnknownSetting(name)
    result = await registry.change_async(key.name, value, source=source)
    return _answer(registry, name, result)


def listing(registry: Configuration, config: Config | None = None) -> dict[str, Any]:
    """The whole answer of ``GET /config`` and ``evse config list``."""
    return {
        "rows": rows(registry, config),
        "settings": registry.installer_view(),
        "ocpp": registry.get_configuration(None)[0],
    }


def offline(
    action: str,
    key: str | None,
    value: str | None,
    data_dir: str | Path,
    config: Config | None = None,
) -> dict[str, Any]:
    """``evse config ACTION`` with no station running: the store in ``data_dir``.

    ``action`` is "list", "get" or "set"; the answers are those of the control
    socket. With the file (``config``), a ``set`` first applies the file's
    values as the station's start would (``seed_registry``), so that the next
    start sees the file unchanged and keeps this change; ``list`` and ``get``
    only read (their notes say what the next start will do). Raises
    ``UnknownSetting``, ``ConfigError`` (the file's value refused by the
    registry) and ``evse.errors.StoreError``.
    """
    if action not in ("list", "get", "set"):
        raise ValueError(f"config {action}: the actions are list, get and set")
    if action != "list" and not key:
        raise ValueError(f"config {action} needs a KEY")
    if action == "set" and value is None:
        raise ValueError("config set needs a VALUE")
    maxima = registry_maxima(config) if config is not None else None
    with Store.open(Path(data_dir) / "station.sqlite") as store:
        registry = Configuration(store, maxima=maxima)
        if action == "list":
            return listing(registry, config)
        assert key is not None
        if action == "get":
            return lookup(registry, config, key)
        assert value is not None
        if config is not None and _file_refusal(key, config) is None:
            seed_registry(registry, config)
        return change(registry, config, key, value, source="installer")


# --- text -------------------------------------------------------------------------------


def _rows_of(answer: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a list answer; from an older station's answer (installer rows and
    GetConfiguration entries only), the same rows with what it says."""
    given = answer.get("rows")
    if isinstance(given, list):
        return [dict(r) for r in given]
    out: list[dict[str, Any]] = [dict(r) for r in answer.get("settings", [])]
    seen = {r.get("ocpp") for r in out}
    for entry in answer.get("ocpp", []):
        if entry.get("key") in seen:
            continue
        out.append(
            {
                "name": entry.get("key"),
                "value": entry.get("value", SECRET_SET),
                "access": "read-only" if entry.get("readonly") else "installer + central system",
            }
        )
    return out


def _cell(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    text = "" if value is None else str(value)
    seat = row.get("file")
    if field == "source" and text == "file" and seat and seat != row.get("name"):
        return f"file ({seat})"  # the name the file gives it: limits.fallback
    return text


def format_table(table_rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned table for a terminal, registry first, then the file,
    each block under a heading; notes follow the row they belong to."""
    blocks: list[tuple[str, list[Mapping[str, Any]]]] = [
        ("registry: installer settings (station-spec 3)", []),
        ("registry: OCPP configuration keys", []),
        ("file: hardware and installation (read at start)", []),
    ]
    for row in table_rows:
        if row.get("owner") == "file":
            blocks[2][1].append(row)
        elif row.get("group") is not None:
            blocks[0][1].append(row)
        else:
            blocks[1][1].append(row)
    everything = [r for _, block in blocks for r in block]
    widths = {
        field: min(
            MAX_WIDTH.get(field, 1 << 16),
            max([len(head)] + [len(_cell(r, field)) for r in everything]),
        )
        for head, field in COLUMNS
    }

    def line(cells: Sequence[str]) -> str:
        parts = [cell.ljust(widths[field]) for cell, (_, field) in zip(cells, COLUMNS, strict=True)]
        return "  ".join(parts).rstrip()

    out: list[str] = []
    for title, block in blocks:
        if not block:
            continue
        if out:
            out.append("")
        out.append(f"# {title}")
        out.append(line([head for head, _ in COLUMNS]))
        for row in block:
            out.append(line([_cell(row, field) for _, field in COLUMNS]))
            note = _cell(row, "note")
            if note and row.get("owner") != "file":
                out.append(f"    note: {note}")
    return "\n".join(out) + "\n"


def render(action: str, key: str | None, answer: Mapping[str, Any]) -> tuple[int, str, str]:
    """What ``evse config ACTION`` prints for an answer (from the station or
    ``offline``): (exit code, standard output, standard error).

    ``get`` prints the value alone and ``set`` its status alone (scripts read
    them); a note (the file will win at the next start, ...) goes to standard
    error. A refused change is exit 2 with one error line."""
    if "error" in answer:  # the control socket's refusal (an unknown name: 404)
        return 2, "", f"evse config: error: {key}: {answer['error']}\n"
    if action == "list":
        return 0, format_table(_rows_of(answer)), ""
    note = answer.get("note") or ""
    if action == "get":
        text = (
            f"evse config: note: {key}: {note}\n" if note and answer.get("owner") != "file" else ""
        )
        return 0, f"{answer['value']}\n", text
    status = answer.get("status")
    if status in ("Accepted", "RebootRequired"):
        return 0, f"{status}\n", f"evse config: note: {key}: {note}\n" if note else ""
    return 2, "", f"evse config: error: {key}: {status}: {answer.get('reason', '')}\n"
