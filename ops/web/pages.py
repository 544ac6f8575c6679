"""The installer's page, rendered on the server: plain HTML, every value escaped.

No template engine: small functions that return strings, each value passed
through ``esc`` (``html.escape`` with quotes) and every attribute quoted, so a
charge point id or a fault text cannot inject markup. The page has no inline
script or style (the Content-Security-Policy forbids both); the one script
(/static/app.js) fills the live fields, found by their ``data-f`` names, from
the server-sent events, and draws the plot. The texts of the live fields are
formatted here once (``status_fields``), for the first render and for every
event, so the page and the stream never disagree.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ops.web.monitor import FaultEvent

#: Installer page groups in station-spec section 3 order; a group the registry
#: declares that is not listed here comes after them.
GROUP_ORDER: Final = ("connection", "security", "monitoring", "data sending", "metering")

#: What a page's first load fetches besides itself (cache-busting query added by the app).
STATIC_FILES: Final = ("app.css", "app.js")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


# --- formatting -------------------------------------------------------------------


def _num(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_power(watts: object) -> str:
    if not isinstance(watts, int | float) or isinstance(watts, bool):
        return "-"
    if abs(watts) >= 1000:
        return f"{_num(watts / 1000, 2)} kW"
    return f"{_num(watts, 0)} W"


def fmt_energy(wh: object) -> str:
    if not isinstance(wh, int | float) or isinstance(wh, bool):
        return "-"
    if abs(wh) >= 1000:
        return f"{_num(wh / 1000, 3)} kWh"
    return f"{_num(wh, 1)} Wh"


def fmt_amps(amps: object) -> str:
    if not isinstance(amps, int | float) or isinstance(amps, bool):
        return "-"
    return f"{_num(amps, 1)} A"


def fmt_time(iso: object) -> str:
    """An ISO time as the page shows it: date and time to the second, UTC."""
    if not isinstance(iso, str) or not iso:
        return "-"
    return iso.replace("T", " ")[:19] + " UTC"


def connection_summary(central: Mapping[str, Any] | None) -> str:
    """The central-system connection in words (station-spec section 3), with its reason."""
    if not central:
        return "starting"
    state = str(central.get("state", ""))
    link = central.get("link")
    reason = str(central.get("reason") or "")
    registration = str(central.get("registration") or "")
    if link is None:
        return "not configured (standalone)" if state == "not_configured" else state
    if central.get("enabled") is False:
        return "disabled: the connection is switched off"
    if link == "disabled":
        return f"disabled: {reason}" if reason else "disabled"
    if link == "connecting":
        return f"connecting ({reason})" if reason else "connecting"
    if link == "connected":
        if registration in ("registration pending", "registration rejected"):
            return f"connected, {registration}"
        if registration == "registered":
            return "connected, registered"
        return f"connected, {registration or 'not registered'}"
    if link == "disconnected":
        return f"disconnected: {reason}" if reason else "disconnected"
    return f"{link}: {reason}" if reason else str(link)


def status_fields(
    view: Mapping[str, Any] | None,
    *,
    queue_depth: int | None,
    dead_letters: int | None,
) -> dict[str, str]:
    """The live fields' texts, by ``data-f`` name."""

    def count(n: int | None) -> str:
        return "-" if n is None else str(n)

    if view is None:
        return {
            "status": "starting",
            "error_code": "-",
            "pilot": "-",
            "offered": "-",
            "bound_by": "-",
            "power": "-",
            "energy": "-",
            "tx": "none",
            "tx_tag": "-",
            "tx_started": "-",
            "tx_energy": "-",
            "cs": "starting",
            "cs_address": "-",
            "cs_id": "-",
            "queue": count(queue_depth),
            "dead": count(dead_letters),
            "faults_active": "-",
        }
    limit = view.get("limit") or {}
    tx = view.get("transaction")
    central = view.get("central_system") or {}
    faults = view.get("faults") or {}
    return {
        "status": str(view.get("status", "-")),
        "error_code": str(view.get("error_code", "-")),
        "pilot": str(view.get("pilot", "-")),
        "offered": fmt_amps(view.get("offered_a")),
        "bound_by": f"{fmt_amps(limit.get('amps'))}, bound by {limit.get('bound_by', '-')}",
        "power": fmt_power(view.get("power_w")),
        "energy": fmt_energy(view.get("energy_wh")),
        "tx": f"#{tx['id']}" if isinstance(tx, Mapping) else "none",
        "tx_tag": str(tx.get("id_tag", "-")) if isinstance(tx, Mapping) else "-",
        "tx_started": fmt_time(tx.get("started_at")) if isinstance(tx, Mapping) else "-",
        "tx_energy": fmt_energy(tx.get("energy_wh")) if isinstance(tx, Mapping) else "-",
        "cs": connection_summary(central),
        "cs_address": str(central.get("address") or "-"),
        "cs_id": str(central.get("charge_point_id") or "-"),
        "queue": count(
            queue_depth if queue_depth is not None else _int_or_none(central.get("queued_messages"))
        ),
        "dead": count(dead_letters),
        "faults_active": ", ".join(str(f) for f in faults) or "none",
    }


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def transaction_rows(records: Iterable[Any]) -> list[list[str]]:
    """The transaction list's rows (``evse.store.TransactionRecord``), as texts."""
    rows = []
    for r in records:
        stop = r.meter_stop_wh if r.meter_stop_wh is not None else r.last_meter_wh
        rows.append(
            [
                str(r.id),
                str(r.id_tag),
                fmt_time(r.started_at.isoformat()),
                fmt_time(r.stopped_at.isoformat()) if r.stopped_at else "running",
                fmt_energy(stop - r.meter_start_wh),
                str(r.stop_reason or "-"),
            ]
        )
    return rows


def fault_rows(events: Iterable[FaultEvent]) -> list[list[str]]:
    return [[fmt_time(e.at.isoformat()), e.fault, e.change, e.info or "-"] for e in events]


# --- the page frame ------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """What every page needs: who is looking, the CSRF token, the version."""

    installer: bool
    csrf: str
    version: str
    static: Mapping[str, str]  # file name -> URL (with its cache-busting hash)
    password_set: bool = True


def layout(frame: Frame, title: str, active: str, body: str) -> str:
    nav = []
    for href, name, label in (("/", "status", "Status"), ("/settings", "settings", "Settings")):
        current = ' aria-current="page"' if name == active else ""
        nav.append(f'<a href="{href}"{current}>{label}</a>')
    if frame.installer:
        account = (
            '<form method="post" action="/logout" class="inline">'
            f'<input type="hidden" name="csrf" value="{esc(frame.csrf)}">'
            '<span class="role">installer</span> '
            '<button type="submit" id="logout">Log out</button></form>'
        )
    else:
        current = ' aria-current="page"' if active == "login" else ""
        account = (
            f'<span class="role">viewer</span> <a href="/login" id="login"{current}>Log in</a>'
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - EVSE</title>"
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{esc(frame.static["app.css"])}">'
        f'<script src="{esc(frame.static["app.js"])}" defer></script>'
        "</head><body>"
        f'<header><strong class="brand">EVSE</strong><nav>{"".join(nav)}</nav>'
        f'<div class="account">{account}</div></header>'
        f"<main>{body}</main>"
        f"<footer>evse-firmware {esc(frame.version)}</footer>"
        "</body></html>\n"
    )


def _live(name: str, text: str) -> str:
    return f'<span data-f="{esc(name)}">{esc(text)}</span>'


def _dl(items: Sequence[tuple[str, str, str]]) -> str:
    rows = "".join(
        f"<dt>{esc(label)}</dt><dd>{_live(key, text)}</dd>" for label, key, text in items
    )
    return f"<dl>{rows}</dl>"


def _table(table_id: str, head: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table id="{esc(table_id)}" data-empty="{esc(empty)}">'
        f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
        f'<p class="empty{"" if not rows else " hidden"}">{esc(empty)}</p></div>'
    )


FAULT_HEAD: Final = ("time", "fault", "change", "detail")
TX_HEAD: Final = ("#", "tag", "started", "stopped", "energy", "reason")


def status_page(
    frame: Frame,
    fields: Mapping[str, str],
    faults: Sequence[Sequence[str]],
    transactions: Sequence[Sequence[str]],
) -> str:
    f = fields
    connector = _dl(
        [
            ("Status", "status", f["status"]),
            ("Error code", "error_code", f["error_code"]),
            ("Pilot", "pilot", f["pilot"]),
            ("Offered current", "offered", f["offered"]),
            ("Limit", "bound_by", f["bound_by"]),
            ("Power", "power", f["power"]),
            ("Energy (meter)", "energy", f["energy"]),
            ("Active faults", "faults_active", f["faults_active"]),
        ]
    )
    transaction = _dl(
        [
            ("Transaction", "tx", f["tx"]),
            ("Tag", "tx_tag", f["tx_tag"]),
            ("Started", "tx_started", f["tx_started"]),
            ("Energy", "tx_energy", f["tx_energy"]),
        ]
    )
    central = _dl(
        [
            ("Connection", "cs", f["cs"]),
            ("Address", "cs_address", f["cs_address"]),
            ("Charge point id", "cs_id", f["cs_id"]),
            ("Queued messages", "queue", f["queue"]),
            ("Dead letters", "dead", f["dead"]),
        ]
    )
    body = (
        '<p class="live" id="live" data-state="connecting">live: <span id="live-text">'
        "connecting</span></p>"
        '<div class="cards">'
        f'<section class="card" id="connector"><h2>Connector</h2>{connector}</section>'
        f'<section class="card" id="transaction"><h2>Transaction</h2>{transaction}</section>'
        f'<section class="card" id="central"><h2>Central system</h2>{central}</section>'
        "</div>"
        '<section class="card wide" id="plots"><h2>Power and offered current</h2>'
        '<p class="legend"><span class="key power"></span>power (kW) '
        '<span class="key offered"></span>offered current (A)</p>'
        '<h3>Current session</h3><div class="plot" id="plot-session" data-series="session">'
        '<p class="empty">no data yet</p></div>'
        '<h3>Last hour</h3><div class="plot" id="plot-hour" data-series="hour">'
        '<p class="empty">no data yet</p></div></section>'
        '<section class="card wide"><h2>Recent faults</h2>'
        f"{_table('faults', FAULT_HEAD, faults, 'no faults recorded since the start')}</section>"
        '<section class="card wide"><h2>Transactions</h2>'
        f"{_table('transactions', TX_HEAD, transactions, 'no transactions yet')}</section>"
    )
    return layout(frame, "Status", "status", body)


# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    path: str
    subject: str = ""
    expires: str = ""
    problem: str = ""


@dataclass(frozen=True)
class SettingRow:
    """One installer setting as the page shows it (built from a registry ``Key``)."""

    name: str  # installer name, "group.setting"
    group: str
    label: str
    ocpp: str | None
    kind: str  # ocpp16.config.Kind name: BOOL, INT, FLOAT, STR, CHOICE, MEASURANDS, URL, PATH
    value: str  # the registry's text; a secret's shows set / not set
    unit: str
    range_text: str
    description: str
    readonly: bool
    secret: bool
    reboot_required: bool
    editable: bool  # an edit control for whoever is looking
    choices: tuple[str, ...] = ()
    certificate: CertificateInfo | None = None
    error: str = ""
    note: str = ""
    #: What was submitted, shown back in the control after a refusal.
    submitted: str | None = None


@dataclass
class SettingsView:
    rows: list[SettingRow]
    message: str = ""
    error: str = ""
    live_status: str = ""
    #: Measurand names for a MEASURANDS row's toggles.
    measurands: tuple[str, ...] = ()


def label_of(name: str) -> str:
    """ "monitoring.fallback_limit" -> "Fallback limit"."""
    setting = name.partition(".")[2] or name
    return setting.replace("_", " ").capitalize()


def _control(row: SettingRow, measurands: Sequence[str]) -> str:
    name = esc(row.name)
    control_id = "f-" + row.name.replace(".", "-")
    shown = row.submitted if row.submitted is not None else row.value
    invalid = ' aria-invalid="true"' if row.error else ""
    if row.kind == "BOOL":
        options = "".join(
            f'<option value="{v}"{" selected" if shown == v else ""}>{label}</option>'
            for v, label in (("true", "on"), ("false", "off"))
        )
        return f'<select id="{control_id}" name="{name}"{invalid}>{options}</select>'
    if row.kind == "CHOICE":
        options = "".join(
            f"<option{' selected' if shown == c else ''}>{esc(c)}</option>" for c in row.choices
        )
        return f'<select id="{control_id}" name="{name}"{invalid}>{options}</select>'
    if row.kind == "MEASURANDS":
        chosen = {m.strip() for m in shown.split(",") if m.strip()}
        boxes = "".join(
            f'<label class="toggle"><input type="checkbox" name="{name}" value="{esc(m)}"'
            f"{' checked' if m in chosen else ''}> {esc(m)}</label>"
            for m in measurands
        )
        # The marker tells "every toggle off" from "not on this form".
        return f'<input type="hidden" name="{name}~" value="1"><div class="toggles">{boxes}</div>'
    if row.secret:
        return (
            f'<input id="{control_id}" name="{name}" type="password" autocomplete="new-password"'
            f' placeholder="unchanged"{invalid}>'
        )
    mode = ' inputmode="decimal"' if row.kind in ("INT", "FLOAT") else ""
    kind = ' type="url"' if row.kind == "URL" else ' type="text"'
    # No client-side validation: the registry's reason is the one answer.
    return (
        f'<input id="{control_id}" name="{name}"{kind}{mode} value="{esc(shown)}"'
        f' autocomplete="off" spellcheck="false" formnovalidate{invalid}>'
    )


def _row(row: SettingRow, measurands: Sequence[str], live_status: str) -> str:
    control_id = "f-" + row.name.replace(".", "-")
    if row.secret:
        value = "set" if row.value not in ("", "(not set)", "not set") else "not set"
    else:
        value = row.value if row.value != "" else "(empty)"
    if row.kind == "MEASURANDS" and not row.editable:
        value = row.value or "(none)"
    unit = f" {row.unit}" if row.unit and not row.secret else ""
    shown = f'<span class="value" data-setting="{esc(row.name)}">{esc(value)}{esc(unit)}</span>'
    head = f"<span>{esc(row.label)}</span>"
    if row.editable and row.certificate is None:
        if row.kind != "MEASURANDS":
            head = f'<label for="{control_id}">{esc(row.label)}</label>'
        shown = f'<span class="control">{_control(row, measurands)}{esc(unit)}</span>' + (
            f' <span class="current">now: {esc(value)}</span>' if row.secret else ""
        )
    extra = []
    if row.certificate is not None:
        extra.append(_certificate(row.certificate))
    facts = [row.range_text] if row.range_text and not row.secret else []
    if row.ocpp:
        facts.append(f"OCPP {row.ocpp}")
    if row.readonly:
        facts.append("read-only")
    if row.reboot_required:
        facts.append("applies after a restart")
    meta = f'<p class="meta">{esc(" · ".join(facts))}</p>' if facts else ""
    msg = ""
    if row.error:
        msg = f'<p class="error" role="alert" id="err-{esc(control_id)}">{esc(row.error)}</p>'
    elif row.note:
        msg = f'<p class="note" id="note-{esc(control_id)}">{esc(row.note)}</p>'
    status = ""
    if row.name == "connection.enabled":
        status = (
            '<div class="setting"><div class="head"><span>Status</span>'
            f'<span class="value">{_live("cs", live_status)}</span></div>'
            '<p class="desc">The connection to the central system now, with the reason.</p></div>'
        )
    return (
        f'<div class="setting{" refused" if row.error else ""}" id="s-{esc(control_id)}">'
        f'<div class="head">{head}{shown}</div>{msg}'
        f'<p class="desc">{esc(row.description)}</p>{meta}{"".join(extra)}</div>{status}'
    )


def _certificate(info: CertificateInfo) -> str:
    if not info.path:
        return '<p class="cert" id="cert-info">no certificate installed</p>'
    if info.problem:
        return f'<p class="cert error" id="cert-info">{esc(info.path)}: {esc(info.problem)}</p>'
    return (
        f'<p class="cert" id="cert-info">subject <span id="cert-subject">{esc(info.subject)}</span>'
        f', expires <span id="cert-expires">{esc(info.expires)}</span></p>'
    )


def settings_page(frame: Frame, view: SettingsView) -> str:
    groups: dict[str, list[SettingRow]] = {}
    for row in view.rows:
        groups.setdefault(row.group, []).append(row)
    order = [g for g in GROUP_ORDER if g in groups] + [g for g in groups if g not in GROUP_ORDER]
    parts = []
    if view.message:
        parts.append(f'<p class="flash ok" id="message" role="status">{esc(view.message)}</p>')
    if view.error:
        parts.append(f'<p class="flash error" id="problem" role="alert">{esc(view.error)}</p>')
    if not frame.installer:
        hint = (
            "You are viewing. Log in as the installer to change settings."
            if frame.password_set
            else "You are viewing. No installer password is set: set one on the station "
            "with `evse passwd`."
        )
        parts.append(f'<p class="hint">{esc(hint)}</p>')
    for group in order:
        rows = groups[group]
        inner = "".join(_row(r, view.measurands, view.live_status) for r in rows)
        gid = "g-" + group.replace(" ", "-")
        section = (
            f'<section class="card wide group" id="{esc(gid)}"><h2>{esc(group.capitalize())}</h2>'
        )
        if frame.installer and any(r.editable and r.certificate is None for r in rows):
            section += (
                f'<form method="post" action="/settings" id="form-{esc(gid)}">'
                f'<input type="hidden" name="csrf" value="{esc(frame.csrf)}">'
                f'<input type="hidden" name="group" value="{esc(group)}">{inner}'
                f'<button type="submit" id="save-{esc(gid)}">Save {esc(group)}</button></form>'
            )
        else:
            section += inner
        for r in rows:
            if r.certificate is not None and r.editable:
                section += (
                    '<form method="post" action="/certificate" enctype="multipart/form-data"'
                    ' id="form-certificate" class="upload">'
                    f'<input type="hidden" name="csrf" value="{esc(frame.csrf)}">'
                    '<label for="certificate-file">Upload the central system root certificate'
                    " (PEM)</label>"
                    '<input type="file" id="certificate-file" name="certificate"'
                    ' accept=".pem,.crt,.cer,application/x-pem-file">'
                    '<button type="submit" id="upload-certificate">Upload</button></form>'
                )
        parts.append(section + "</section>")
    return layout(frame, "Settings", "settings", "".join(parts))


# --- login and errors -----------------------------------------------------------------


def login_page(frame: Frame, *, error: str = "", locked: bool = False) -> str:
    if not frame.password_set:
        body = (
            '<section class="card narrow"><h2>Installer login</h2>'
            '<p class="error" id="problem">No installer password is set, so nobody can log in. '
            "Set one on the station: <code>evse passwd</code>.</p></section>"
        )
        return layout(frame, "Log in", "login", body)
    problem = f'<p class="error" id="problem" role="alert">{esc(error)}</p>' if error else ""
    disabled = " disabled" if locked else ""
    body = (
        '<section class="card narrow"><h2>Installer login</h2>'
        f"{problem}"
        '<form method="post" action="/login" id="login-form">'
        f'<input type="hidden" name="csrf" value="{esc(frame.csrf)}">'
        '<label for="password">Password</label>'
        '<input type="password" id="password" name="password" autocomplete="current-password"'
        f" required{disabled}>"
        f'<button type="submit" id="login-submit"{disabled}>Log in</button></form></section>'
    )
    return layout(frame, "Log in", "login", body)


def error_page(frame: Frame, status: int, message: str) -> str:
    body = (
        f'<section class="card narrow"><h2>{status}</h2>'
        f'<p class="error" id="problem">{esc(message)}</p>'
        '<p><a href="/">Back to the status page</a></p></section>'
    )
    return layout(frame, f"{status}", "", body)
