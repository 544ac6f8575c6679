"""The authorization chain, its local steps and idTag normalization."""

from __future__ import annotations

import logging
import string
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from evse.auth import (
    AuthChain,
    AuthResult,
    AuthStatus,
    AuthStep,
    FreeCharging,
    LocalTagList,
    StepFailure,
    normalize_id_tag,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))


class Recorder:
    """A step that answers from a table and records what it was asked."""

    def __init__(self, name: str, answers: dict[str, AuthStatus] | None = None) -> None:
        self.name = name
        self.answers = answers or {}
        self.asked: list[str] = []

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        self.asked.append(id_tag)
        status = self.answers.get(id_tag)
        return None if status is None else AuthResult(id_tag, status, "whatever")


class Boom:
    name = "boom"

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("database is locked")


class Slow:
    """Answers Accepted after ``delay`` seconds of trio time (never, if None)."""

    def __init__(self, name: str = "online", delay: float | None = None) -> None:
        self.name = name
        self.delay = delay
        self.cancelled = False

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        try:
            if self.delay is None:
                await trio.sleep_forever()
            else:
                await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled = True
            raise
        return AuthResult(id_tag, AuthStatus.ACCEPTED, self.name)


class Fixed:
    """Always the same answer."""

    def __init__(self, name: str, result: AuthResult) -> None:
        self.name = name
        self.result = result

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        return self.result


# --- AuthResult ------------------------------------------------------------


@pytest.mark.parametrize("status", list(AuthStatus))
def test_only_accepted_is_accepted(status: AuthStatus) -> None:
    assert AuthResult("A", status, "x").accepted is (status is AuthStatus.ACCEPTED)


def test_status_values_are_ocpp_strings() -> None:
    assert [s.value for s in AuthStatus] == [
        "Accepted",
        "Blocked",
        "Expired",
        "Invalid",
        "ConcurrentTx",
    ]


# --- chain order -----------------------------------------------------------


async def test_first_answer_wins_and_later_steps_are_not_asked() -> None:
    first = Recorder("list", {"AA": AuthStatus.BLOCKED})
    second = Recorder("cache", {"AA": AuthStatus.ACCEPTED, "BB": AuthStatus.ACCEPTED})
    chain = AuthChain([first, second])

    blocked = await chain.authorize("AA", NOW)
    assert (blocked.status, blocked.source, blocked.id_tag) == (AuthStatus.BLOCKED, "list", "AA")
    assert not blocked.accepted
    assert second.asked == []

    accepted = await chain.authorize("BB", NOW)
    assert (accepted.status, accepted.source) == (AuthStatus.ACCEPTED, "cache")
    assert first.asked == ["AA", "BB"] and second.asked == ["BB"]


async def test_order_decides() -> None:
    a = Recorder("a", {"T": AuthStatus.BLOCKED})
    b = Recorder("b", {"T": AuthStatus.ACCEPTED})
    assert (await AuthChain([a, b]).authorize("T", NOW)).status is AuthStatus.BLOCKED
    assert (await AuthChain([b, a]).authorize("T", NOW)).status is AuthStatus.ACCEPTED


async def test_nobody_decides_is_invalid_from_none() -> None:
    step = Recorder("list")
    result = await AuthChain([step]).authorize("CC", NOW)
    assert result == AuthResult("CC", AuthStatus.INVALID, "none")
    assert step.asked == ["CC"]
    assert await AuthChain([]).authorize("CC", NOW) == AuthResult("CC", AuthStatus.INVALID, "none")


async def test_source_is_the_step_name_whatever_the_step_wrote() -> None:
    result = await AuthChain([Recorder("list", {"A": AuthStatus.ACCEPTED})]).authorize("A", NOW)
    assert result.source == "list"


async def test_every_status_from_a_step_is_final() -> None:
    for status in AuthStatus:
        chain = AuthChain([Recorder("first", {"T": status}), FreeCharging()])
        result = await chain.authorize("T", NOW)
        assert (result.status, result.source) == (status, "first")


# --- expiry ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expiry", "status"),
    [
        (None, AuthStatus.ACCEPTED),
        (NOW + timedelta(seconds=1), AuthStatus.ACCEPTED),
        (NOW, AuthStatus.EXPIRED),
        (NOW - timedelta(days=1), AuthStatus.EXPIRED),
        # The same instant written in another zone.
        (datetime(2025, 6, 1, 14, 0, 1, tzinfo=PLUS_2), AuthStatus.ACCEPTED),
        (datetime(2025, 6, 1, 13, 59, 59, tzinfo=PLUS_2), AuthStatus.EXPIRED),
    ],
)
async def test_expiry_turns_accepted_into_expired(
    expiry: datetime | None, status: AuthStatus
) -> None:
    step = Fixed("list", AuthResult("T", AuthStatus.ACCEPTED, "list", "PARENT", expiry))
    result = await AuthChain([step]).authorize("T", NOW)
    assert result.status is status
    assert result.expiry == expiry and result.parent_id_tag == "PARENT"


@pytest.mark.parametrize("status", [AuthStatus.BLOCKED, AuthStatus.INVALID])
async def test_expiry_keeps_other_statuses(status: AuthStatus) -> None:
    step = Fixed("list", AuthResult("T", status, "list", expiry=NOW - timedelta(days=1)))
    assert (await AuthChain([step]).authorize("T", NOW)).status is status


async def test_expired_answer_is_final() -> None:
    # An expired card is refused even if a later step would accept it.
    step = Fixed("list", AuthResult("T", AuthStatus.ACCEPTED, "list", expiry=NOW))
    result = await AuthChain([step, FreeCharging()]).authorize("T", NOW)
    assert (result.status, result.source) == (AuthStatus.EXPIRED, "list")


async def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        await AuthChain([FreeCharging()]).authorize("T", datetime(2025, 6, 1, 12, 0))


async def test_step_with_naive_expiry_is_skipped() -> None:
    naive = datetime(2030, 1, 1)
    bad = Fixed("bad", AuthResult("T", AuthStatus.ACCEPTED, "bad", expiry=naive))
    result = await AuthChain([bad, Recorder("next", {"T": AuthStatus.BLOCKED})]).authorize("T", NOW)
    assert (result.status, result.source) == (AuthStatus.BLOCKED, "next")
    assert result.failures == (StepFailure("bad", "answered an expiry without time zone"),)


# --- failures: exceptions and timeouts --------------------------------------


async def test_step_exception_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    after = Recorder("local", {"T": AuthStatus.ACCEPTED})
    with caplog.at_level(logging.ERROR, logger="evse.auth"):
        result = await AuthChain([Boom(), after]).authorize("T", NOW)
    assert (result.status, result.source) == (AuthStatus.ACCEPTED, "local")
    assert result.failures == (StepFailure("boom", "RuntimeError: database is locked"),)
    assert result.failed_steps == ("boom",)
    assert after.asked == ["T"]
    [record] = caplog.records
    assert "boom" in record.getMessage() and record.exc_info is not None


async def test_only_failing_steps_give_invalid_listing_them() -> None:
    result = await AuthChain([Boom(), Slow(delay=None)], step_timeout=2).authorize("T", NOW)
    assert (result.status, result.source) == (AuthStatus.INVALID, "none")
    assert result.failed_steps == ("boom", "online")


async def test_timed_out_step_has_no_opinion(autojump_clock: trio.testing.MockClock) -> None:
    slow = Slow(delay=None)
    chain = AuthChain([slow, Recorder("offline", {"T": AuthStatus.ACCEPTED})], step_timeout=3)
    result = await chain.authorize("T", NOW)
    assert trio.current_time() == 3
    assert slow.cancelled
    assert (result.status, result.source) == (AuthStatus.ACCEPTED, "offline")
    assert result.failures == (StepFailure("online", "timed out after 3 s"),)


async def test_step_answering_in_time_decides(autojump_clock: trio.testing.MockClock) -> None:
    chain = AuthChain([Slow(delay=2.9), FreeCharging()], step_timeout=3)
    result = await chain.authorize("T", NOW)
    assert trio.current_time() == pytest.approx(2.9)
    assert (result.source, result.failures) == ("online", ())


async def test_per_step_timeout(autojump_clock: trio.testing.MockClock) -> None:
    chain = AuthChain([Slow("a", None), Slow("b", None)], step_timeout=10, step_timeouts={"a": 1.5})
    result = await chain.authorize("T", NOW)
    # a waited 1.5 s (its own timeout), b 10 s (the chain's).
    assert trio.current_time() == 11.5
    assert result.failures == (
        StepFailure("a", "timed out after 1.5 s"),
        StepFailure("b", "timed out after 10 s"),
    )


async def test_caller_cancellation_is_not_a_step_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The caller gives up after 1 s: the chain must not swallow that and go
    # on to the next step as if the slow step had timed out.
    after = Recorder("after", {"T": AuthStatus.ACCEPTED})
    chain = AuthChain([Slow(delay=None), after], step_timeout=5)
    with trio.move_on_after(1) as scope:
        await chain.authorize("T", NOW)
    assert scope.cancelled_caught
    assert trio.current_time() == 1
    assert after.asked == []


# --- rebuilding ------------------------------------------------------------


async def test_set_steps_rebuilds_the_chain() -> None:
    local = LocalTagList({"AA": AuthStatus.ACCEPTED})
    chain = AuthChain([local])
    assert (await chain.authorize("BB", NOW)).status is AuthStatus.INVALID
    free = FreeCharging()
    chain.set_steps([local, free])
    assert chain.steps == (local, free)
    assert (await chain.authorize("BB", NOW)).source == "free"
    chain.set_steps([free, local])
    assert (await chain.authorize("AA", NOW)).source == "free"


async def test_set_steps_timeouts(autojump_clock: trio.testing.MockClock) -> None:
    slow = Slow("online", None)
    chain = AuthChain([slow], step_timeout=4, step_timeouts={"online": 1})
    assert chain.timeout_for(slow) == 1
    # Kept when not given...
    chain.set_steps([slow, FreeCharging()])
    assert chain.timeout_for(slow) == 1
    # ...forgotten for a step that left, so re-adding it gets the default.
    chain.set_steps([FreeCharging()])
    chain.set_steps([slow])
    assert chain.timeout_for(slow) == 4
    chain.set_steps([slow], step_timeout=2)
    await chain.authorize("T", NOW)
    assert trio.current_time() == 2


@pytest.mark.parametrize(
    ("steps", "kwargs", "message"),
    [
        (["a", "a"], {}, "repeated: a"),
        (["none"], {}, "reserved"),
        ([""], {}, "reserved or empty"),
        (["a"], {"step_timeout": 0}, "positive"),
        (["a"], {"step_timeout": float("nan")}, "positive"),
        (["a"], {"step_timeouts": {"a": -1}}, "positive"),
        (["a"], {"step_timeouts": {"b": 1}}, "not in the chain: b"),
    ],
)
def test_bad_chain_is_refused_and_old_one_kept(
    steps: list[str], kwargs: dict[str, object], message: str
) -> None:
    keep = Recorder("keep")
    chain = AuthChain([keep], step_timeout=7)
    new: list[AuthStep] = [Recorder(name) for name in steps]
    with pytest.raises(ValueError, match=message):
        chain.set_steps(new, **kwargs)  # type: ignore[arg-type]
    assert chain.steps == (keep,)
    assert chain.timeout_for(keep) == 7
    with pytest.raises(ValueError, match=message):
        AuthChain(new, **kwargs)  # type: ignore[arg-type]


# --- FreeCharging ------------------------------------------------------------


async def test_free_charging_accepts_everything() -> None:
    free = FreeCharging("free-for-all")
    assert free.free_id_tag == "FREE-FOR-ALL"
    for tag in ("AA", "04A2B3C4", free.free_id_tag):
        result = await AuthChain([free]).authorize(tag, NOW)
        assert result == AuthResult(tag, AuthStatus.ACCEPTED, "free")
    with pytest.raises(ValueError, match="has 21 characters"):
        FreeCharging("x" * 21)


# --- LocalTagList ------------------------------------------------------------


async def test_local_list_lookup() -> None:
    expiry = NOW + timedelta(days=30)
    local = LocalTagList(
        {"04a2b3c4": AuthStatus.ACCEPTED, "DEADBEEF": AuthStatus.BLOCKED, "OLD": "Accepted"},  # type: ignore[dict-item]
        expiries={"04A2B3C4": expiry, "old": NOW - timedelta(days=1)},
        parents={"04A2B3C4": "fleet-1"},
    )
    assert len(local) == 3
    hit = await local.authorize(" 04A2b3c4", NOW)
    assert hit == AuthResult(" 04A2b3c4", AuthStatus.ACCEPTED, "local", "FLEET-1", expiry)
    assert (await local.authorize("deadbeef", NOW)) == AuthResult(
        "deadbeef", AuthStatus.BLOCKED, "local"
    )
    assert await local.authorize("CAFE", NOW) is None
    assert await local.authorize("", NOW) is None
    assert await local.authorize("X" * 30, NOW) is None
    chain = AuthChain([local, FreeCharging()])
    assert (await chain.authorize("old", NOW)).status is AuthStatus.EXPIRED
    assert (await chain.authorize("CAFE", NOW)).source == "free"


def test_local_list_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        LocalTagList({"abc": AuthStatus.ACCEPTED, "ABC": AuthStatus.BLOCKED})
    with pytest.raises(ValueError, match="'nope', which has no status"):
        LocalTagList({"A": AuthStatus.ACCEPTED}, expiries={"nope": NOW})
    with pytest.raises(ValueError, match="'nope', which has no status"):
        LocalTagList({"A": AuthStatus.ACCEPTED}, parents={"nope": "P"})
    with pytest.raises(ValueError, match="no time zone"):
        LocalTagList({"A": AuthStatus.ACCEPTED}, expiries={"A": datetime(2030, 1, 1)})
    with pytest.raises(ValueError, match="'bad\\\\x00'"):
        LocalTagList({"bad\x00": AuthStatus.ACCEPTED})
    with pytest.raises(ValueError, match="'Maybe' is not a valid AuthStatus"):
        LocalTagList({"A": "Maybe"})  # type: ignore[dict-item]


async def test_local_list_named_for_a_second_list() -> None:
    installer = LocalTagList({"A": AuthStatus.BLOCKED}, name="installer")
    ocpp = LocalTagList({"A": AuthStatus.ACCEPTED}, name="local-list")
    result = await AuthChain([installer, ocpp]).authorize("A", NOW)
    assert (result.source, result.status) == ("installer", AuthStatus.BLOCKED)


# --- normalize_id_tag ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "tag"),
    [
        ("04a2b3c4", "04A2B3C4"),
        ("  04A2B3C4\r\n", "04A2B3C4"),
        ("\t\x0bab-cd\x0c", "AB-CD"),
        ("a b", "A B"),
        ("x" * 20, "X" * 20),
        ("  " + "y" * 20 + "  ", "Y" * 20),
        ("~!@#", "~!@#"),
    ],
)
def test_normalize_id_tag(raw: str, tag: str) -> None:
    assert normalize_id_tag(raw) == tag


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "empty"),
        ("   \r\n", "empty"),
        ("x" * 21, "21 characters"),
        ("ab\x00cd", "not printable ASCII"),
        ("ab\x7fcd", "not printable ASCII"),
        ("straße", "not printable ASCII"),
        ("caf\u00e9", "not printable ASCII"),
    ],
)
def test_normalize_id_tag_refuses(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        normalize_id_tag(raw)
    assert repr(raw) in str(info.value)


@given(st.text())
def test_normalize_any_text_is_canonical_or_refused(raw: str) -> None:
    try:
        tag = normalize_id_tag(raw)
    except ValueError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert repr(raw) in refusal
        return
    assert 1 <= len(tag) <= 20
    assert tag == tag.strip() == tag.upper()
    assert all(ch in string.printable and ch not in "\t\n\r\x0b\x0c" for ch in tag)
    assert normalize_id_tag(tag) == tag
    assert normalize_id_tag(f" {raw.lower()}\r\n") == tag


_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@given(st.text(_PRINTABLE, min_size=1, max_size=20).filter(lambda s: s.strip() == s))
def test_normalize_valid_tags_only_change_case(raw: str) -> None:
    assert normalize_id_tag(raw) == raw.upper()
    assert normalize_id_tag(raw.lower()) == normalize_id_tag(raw.swapcase()) == raw.upper()
