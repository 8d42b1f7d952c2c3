"""The command line's value parsers and output helpers, on their own."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ducto._cli.output import Progress, render_pairs, render_table
from ducto._cli.pricing_files import diff_configs, place
from ducto._cli.values import (
    UsageError,
    parse_credits,
    parse_duration,
    parse_instant,
    redact,
    sqlite_path,
)
from ducto.interface.models import PricingConfigData

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", 1), ("1000", 1000), ("1,000", 1000), ("1_000", 1000), (" 42 ", 42)],
)
def test_credits(text: str, expected: int) -> None:
    """Whole numbers, with optional group separators."""
    assert expected == parse_credits(text)


@pytest.mark.parametrize(
    "text", ["1.5", "1e3", "abc", "", "0x10", "0", str(2**62 + 1), "--5", "9" * 5000]
)
def test_not_credits(text: str) -> None:
    """Fractions, words, zero and numbers past the store's range are refused by name."""
    with pytest.raises(UsageError, match=r"^amount must be"):
        parse_credits(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1D 6H", timedelta(days=1, hours=6)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    """Numbers with units, combined."""
    assert expected == parse_duration(text)


@pytest.mark.parametrize("text", ["2026-04-01", "d30", "30", "30x", "30d5", ""])
def test_not_durations(text: str) -> None:
    """Anything else is not a duration (and may be an instant)."""
    assert parse_duration(text) is None


@pytest.mark.parametrize("text", ["99999999999d", "9" * 5000 + "d", "1d" + "9" * 40 + "s"])
def test_durations_too_long_are_refused(text: str) -> None:
    """Durations past what a datetime can hold (or Python can read) are a usage error."""
    with pytest.raises(UsageError, match=r"^duration is too long"):
        parse_duration(text)


def test_an_instant_too_far_away_is_refused() -> None:
    """A duration a datetime holds but that lands past year 9999 is refused by option name."""
    with pytest.raises(UsageError, match=r"^--expires is too far away"):
        parse_instant("999999999d", "--expires", now=NOW, future=True)


def test_durations_count_forwards_or_backwards() -> None:
    """A duration is from now for an expiry, ago for a window bound."""
    assert NOW + timedelta(days=30) == parse_instant("30d", "--expires", now=NOW, future=True)
    assert NOW - timedelta(days=7) == parse_instant("7d", "--since", now=NOW, future=False)


def test_instants() -> None:
    """Z and offsets are honoured; a naive instant is local time; the result is UTC."""
    naive = datetime(2026, 4, 1, 9, 30)
    east = timezone(timedelta(hours=2))

    assert datetime(2026, 4, 1, 12, tzinfo=UTC) == parse_instant(
        "2026-04-01T12:00:00Z", "--x", now=NOW, future=True
    )
    assert datetime(2026, 4, 1, 10, tzinfo=UTC) == parse_instant(
        "2026-04-01T12:00:00+02:00", "--x", now=NOW, future=True
    )
    assert naive.astimezone(UTC) == parse_instant(naive.isoformat(), "--x", now=NOW, future=True)
    assert datetime(2026, 4, 1).astimezone(UTC) == parse_instant(
        "2026-04-01", "--x", now=NOW, future=True
    )
    assert UTC == parse_instant("2026-04-01T00:00:00+02:00", "--x", now=NOW, future=True).tzinfo
    assert datetime(2026, 4, 1, tzinfo=east) == parse_instant(
        "2026-04-01T00:00:00+02:00", "--x", now=NOW, future=True
    )


def test_not_an_instant() -> None:
    """The message names the option and shows both accepted forms."""
    with pytest.raises(UsageError, match=r"--until must be an ISO 8601 instant .* or a duration"):
        parse_instant("next week", "--until", now=NOW, future=False)


def test_redact_and_sqlite_path() -> None:
    """Passwords are masked; sqlite URLs give the path open_store would use."""
    url = "postgresql://ops:s3cret@db/billing"

    assert "connect to postgresql://ops:***@db/billing" == redact(f"connect to {url}", url)
    assert "no password here" == redact("no password here", "sqlite:///x.db")
    assert "x.db" == sqlite_path("sqlite:///x.db")
    assert "/abs/x.db" == sqlite_path("sqlite:////abs/x.db")
    assert sqlite_path("sqlite://:memory:") is None
    assert sqlite_path("memory://") is None


def test_table_alignment() -> None:
    """Numbers right-aligned with separators, text left-aligned, None as a dash."""
    table = render_table(["user", "spend", "note"], [("alice", 1500, None), ("bob", 7, "x")])

    assert [
        "user   spend  note",
        "-----  -----  ----",
        "alice  1,500  -",
        "bob        7  x",
    ] == table.splitlines()


def test_pairs_alignment() -> None:
    """Values start in one column."""
    assert "a     1\nlong  yes" == render_pairs([("a", 1), ("long", True)])


def test_progress_off_a_terminal_writes_tenths() -> None:
    """Off a terminal, one line per tenth of the work, however the work advances."""
    stream = io.StringIO()
    progress = Progress(20, "granting", enabled=True, stream=stream)
    for step in (1, 1, 5, 13):
        progress.advance(step)
    progress.close()

    assert [
        "granting 2/20 (10%)",
        "granting 7/20 (35%)",
        "granting 20/20 (100%)",
    ] == stream.getvalue().splitlines()


def test_progress_disabled_writes_nothing() -> None:
    """Disabled progress stays silent."""
    stream = io.StringIO()
    progress = Progress(5, "granting", enabled=False, stream=stream)
    progress.advance(5)
    progress.close()

    assert "" == stream.getvalue()


def test_config_places() -> None:
    """Error locations read like the config's own paths."""
    assert "models['gpt-4o']" == place(("models", "gpt-4o"))
    assert "plans['fixed'].name" == place(("plans", "fixed", "name"))
    assert "plans['pro'].rate_overrides['x']" == place(("plans", "pro", "rate_overrides", "x"))
    assert "min_balance" == place(("min_balance",))


def test_diff_treats_absent_and_empty_alike() -> None:
    """An empty section and a missing one are the same config."""
    old = PricingConfigData.model_validate({"models": {"_default": "1"}, "search": {}})
    new = PricingConfigData.model_validate({"models": {"_default": "1"}, "plans": {}})

    assert [] == diff_configs(old, new)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    """On a terminal each step rewrites the line, and closing ends it."""
    stream = _Terminal()
    progress = Progress(4, "granting", enabled=True, stream=stream)
    progress.advance(1)
    progress.advance(3)
    progress.close()

    assert "\rgranting 1/4 (25%)\rgranting 4/4 (100%)\n" == stream.getvalue()
