"""
Parsing and checking what operators type: credits, instants, durations, store URLs.

Every parser raises `UsageError` with a message that names the value, so the command line can
print it as one line and exit with the usage status.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

from ducto._shown import shown
from ducto.errors import DuctoError

MAX_CREDITS: Final = 2**62
"""The largest amount a store accepts."""

_DURATION: Final = re.compile(r"(\d+)\s*(w|d|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS: Final = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_INTEGER: Final = re.compile(r"[+-]?\d+(_\d+)*")
_MAX_DIGITS: Final = 30
"""More digits than any value here can have; longer numbers are refused before `int()`, which
raises on numbers of more than 4,300 digits."""


class UsageError(DuctoError):
    """A command line the operator can correct: a bad value, a missing file, a bad option."""


class NotFoundError(DuctoError):
    """The store has no such thing (a pricing version, an active pricing, a cap to remove)."""


def parse_credits(text: str, name: str = "amount", *, minimum: int = 1) -> int:
    """
    Read a whole number of credits.

    Args:
        text: What was typed: digits, optionally with ``_`` or ``,`` between groups.
        name: The argument's name, for the message.
        minimum: The smallest value allowed.

    Returns:
        The amount.

    Raises:
        UsageError: The text is not a whole number, or is out of range.
    """
    cleaned = text.strip().replace(",", "_")
    if not _INTEGER.fullmatch(cleaned):
        raise UsageError(f"{name} must be a whole number of credits, got {shown(text)}")
    value = _whole(cleaned)
    if value is None or value < minimum or value > MAX_CREDITS:
        raise UsageError(f"{name} must be between {minimum} and {MAX_CREDITS}, got {shown(text)}")
    return value


def parse_count(text: str, name: str, *, minimum: int = 1, maximum: int = 1_000_000) -> int:
    """
    Read a small positive count (a limit, a number of rows or workers).

    Raises:
        UsageError: The text is not a whole number in ``[minimum, maximum]``.
    """
    cleaned = text.strip().replace(",", "_")
    value = _whole(cleaned) if _INTEGER.fullmatch(cleaned) else None
    if value is None or not minimum <= value <= maximum:
        raise UsageError(
            f"{name} must be a whole number from {minimum} to {maximum}, got {shown(text)}"
        )
    return value


def _whole(digits: str) -> int | None:
    """`int(digits)` for a matched integer, or None when it has too many digits to be valid."""
    if sum(char.isdigit() for char in digits) > _MAX_DIGITS:
        return None
    return int(digits)


def parse_duration(text: str) -> timedelta | None:
    """
    Read a duration such as ``30d``, ``12h``, ``90m``, ``2w`` or ``1d12h``; None if it is not one.

    Raises:
        UsageError: It looks like a duration but is zero.
    """
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned or cleaned[0] not in "0123456789":
        return None
    parts = _DURATION.findall(cleaned)
    if "".join(f"{n}{u}" for n, u in parts) != cleaned:
        return None
    if any(len(number) > _MAX_DIGITS for number, _ in parts):
        raise UsageError(f"duration is too long, got {shown(text)}")
    seconds = sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds == 0:
        raise UsageError(f"duration must be longer than 0, got {shown(text)}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise UsageError(f"duration is too long, got {shown(text)}") from None


def parse_instant(text: str, name: str, *, now: datetime, future: bool) -> datetime:
    """
    Read an instant: ISO 8601, or a duration counted from `now`.

    A naive ISO value (no ``Z`` and no offset) is local time, as the stores read naive
    datetimes and as `datetime.astimezone` does; ``2026-04-01`` is local midnight. A duration
    is counted forwards from `now` when `future` is True (``--expires 30d``), backwards
    otherwise (``--since 7d``).

    Args:
        text: What was typed.
        name: The option's name, for the message.
        now: The current instant (aware).
        future: Which way a duration counts.

    Returns:
        An aware UTC datetime.

    Raises:
        UsageError: The text is neither an ISO 8601 instant nor a duration.
    """
    duration = parse_duration(text)
    if duration is not None:
        try:
            moment = now + duration if future else now - duration
        except OverflowError:
            raise UsageError(f"{name} is too far away: {shown(text)}") from None
        return moment.astimezone(UTC)
    cleaned = text.strip()
    if cleaned.endswith(("z", "Z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(
            f"{name} must be an ISO 8601 instant (2026-04-01T12:00:00Z) or a duration "
            f"(30d, 12h, 90m), got {shown(text)}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive: local time
    return moment.astimezone(UTC)


def parse_aware_instant(text: str, name: str) -> datetime:
    """
    Read an ISO 8601 instant that says its time zone (``Z`` or an offset such as ``+02:00``).

    Unlike `parse_instant`, a naive value is refused rather than read as local time: it is
    for instants that change what every process does (when a pricing version takes effect),
    where the operator's time zone must not decide.

    Args:
        text: What was typed.
        name: The option's name, for the message.

    Returns:
        An aware UTC datetime.

    Raises:
        UsageError: The text is not an ISO 8601 instant, or names no time zone.
    """
    cleaned = text.strip()
    if cleaned.endswith(("z", "Z")):
        cleaned = cleaned[:-1] + "+00:00"
    example = "2027-01-01T00:00:00Z"
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(
            f"{name} must be an ISO 8601 instant with Z or an offset ({example}), got {shown(text)}"
        ) from None
    if moment.tzinfo is None:
        raise UsageError(
            f"{name} must say its time zone: add Z for UTC or an offset such as +02:00 "
            f"({example}), got {shown(text)}"
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise UsageError(f"{name} is out of range, got {shown(text)}") from None


def url_password(url: str) -> str | None:
    """The password a URL carries in its user info, if any."""
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def redact(text: str, url: str | None) -> str:
    """`text` with the password of `url` (if any) replaced by ``***``."""
    if url is None:
        return text
    password = url_password(url)
    if not password:
        return text
    return text.replace(password, "***")


def sqlite_path(url: str) -> str | None:
    """The database file a ``sqlite:///`` URL names (as `open_store` reads it), else None."""
    scheme, sep, rest = url.partition("://")
    if scheme != "sqlite" or not sep or rest == ":memory:" or not rest.startswith("/"):
        return None
    return rest[1:] or None
