"""
The contract's rules, once, on plain data and without I/O.

Every store calls these functions: `MemoryStore` on its dicts, the SQL stores on rows they
loaded inside their transaction. Argument checks, the lot burn-down order, refund
allocation, hold and cap arithmetic, idempotency fingerprints, billing windows, cursors and
the analytics definitions all live here, so a fix lands once and every store gets it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final, Literal

from pydantic import ValidationError

from ducto._shown import shown
from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.interface.models import (
    AggregateStatsRow,
    CapCheckResult,
    CreditMetadata,
    DailySpendRow,
    PricingConfigData,
    SpendByModelRow,
    SpendByScopeRow,
    SpendByUserRow,
    SpendCap,
    TopUserRow,
)

MAX_AMOUNT: Final = 2**62
"""Largest amount (and largest balance) any store accepts, so every sum fits in 64 bits."""
MAX_ID_LENGTH: Final = 256
MAX_KEY_LENGTH: Final = 256
MAX_TTL_SECONDS: Final = 366 * 86400
MAX_PAGE: Final = 1000
UNKNOWN_MODEL: Final = "unknown"

GRANT_TYPES: Final = frozenset({"purchase", "subscription", "signup_bonus", "adjustment"})
REFUNDABLE_TYPES: Final = frozenset({"usage", "team_usage"})
TRANSACTION_TYPES: Final = frozenset(
    {
        "purchase",
        "subscription",
        "signup_bonus",
        "adjustment",
        "usage",
        "refund",
        "expiry",
        "team_usage",
        "team_topup",
    }
)

OpKind = Literal["reserve", "deduct", "grant", "refund", "team_deduct", "team_topup"]
"""Idempotency keys are scoped per account and per one of these operation kinds."""


# -- Argument checks ---------------------------------------------------------------------------


def check_amount(name: str, value: object, *, minimum: int = 1) -> int:
    """
    Return `value` if it is an `int` (not `bool`) in ``[minimum, MAX_AMOUNT]``.

    Raises:
        InvalidArgumentError: Naming the parameter and the value.
    """
    if type(value) is not int:
        raise InvalidArgumentError(
            f"{name} must be an int number of credits, got {type(value).__name__} {shown(value)}"
        )
    if not minimum <= value <= MAX_AMOUNT:
        raise InvalidArgumentError(
            f"{name} must be between {minimum} and {MAX_AMOUNT}, got {shown(value)}"
        )
    return value


def check_signed_amount(name: str, value: object) -> int:
    """Return `value` if it is a non-zero `int` with ``abs(value) <= MAX_AMOUNT``."""
    if type(value) is not int:
        raise InvalidArgumentError(
            f"{name} must be an int number of credits, got {type(value).__name__} {shown(value)}"
        )
    if value == 0 or abs(value) > MAX_AMOUNT:
        raise InvalidArgumentError(
            f"{name} must be non-zero and within +/-{MAX_AMOUNT}, got {shown(value)}"
        )
    return value


def check_id(name: str, value: object) -> str:
    """Return `value` if it is a non-empty `str` of at most `MAX_ID_LENGTH` characters."""
    if type(value) is not str:
        raise InvalidArgumentError(
            f"{name} must be a str, got {type(value).__name__} {shown(value)}"
        )
    if not value or len(value) > MAX_ID_LENGTH or "\x00" in value:
        raise InvalidArgumentError(
            f"{name} must be a non-empty str of at most {MAX_ID_LENGTH} characters "
            f"without NUL, got {shown(value)}"
        )
    return value


def check_optional_key(name: str, value: object) -> str | None:
    """Return an optional idempotency key after checking it like an id."""
    if value is None:
        return None
    if type(value) is not str or not value or len(value) > MAX_KEY_LENGTH or "\x00" in value:
        raise InvalidArgumentError(
            f"{name} must be None or a non-empty str of at most {MAX_KEY_LENGTH} characters, "
            f"got {shown(value)}"
        )
    return value


def check_optional_text(name: str, value: object, *, max_length: int = 4096) -> str | None:
    """
    Return an optional free-text argument after checking its type and length.

    NUL is refused, as in ids: no SQL text column can hold it, so every store refuses it.
    """
    if value is None:
        return None
    if type(value) is not str or len(value) > max_length or "\x00" in value:
        raise InvalidArgumentError(
            f"{name} must be None or a str of at most {max_length} characters without NUL,"
            f" got {shown(value)}"
        )
    return value


def check_bool(name: str, value: object) -> bool:
    """Return `value` if it is a `bool`."""
    if type(value) is not bool:
        raise InvalidArgumentError(f"{name} must be a bool, got {shown(value)}")
    return value


def to_utc(name: str, value: object) -> datetime:
    """
    Return `value` as an aware UTC datetime.

    An aware datetime in any zone is converted; a naive one is local time, as
    `datetime.astimezone` reads it (so ``datetime.now() + timedelta(hours=1)`` means what it
    says).

    Raises:
        InvalidArgumentError: `value` is not a datetime, or is not a representable instant in
            UTC (``datetime.max`` with a negative offset, say).
    """
    if type(value) is datetime and value.tzinfo is UTC:
        return value
    if not isinstance(value, datetime):
        raise InvalidArgumentError(
            f"{name} must be a datetime, got {type(value).__name__} {shown(value)}"
        )
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError, OSError) as exc:
        kind = "naive (local time)" if value.tzinfo is None else "aware"
        raise InvalidArgumentError(
            f"{name} must be an instant representable in UTC, got the {kind} datetime {value!r}"
        ) from exc


def to_optional_utc(name: str, value: object) -> datetime | None:
    """Like `to_utc`, but None passes through."""
    return None if value is None else to_utc(name, value)


_DEFAULT_TTL: Final = timedelta(seconds=600)


def check_ttl(value: object) -> timedelta:
    """Return a hold TTL (seconds as int/float, or a timedelta) as a positive timedelta."""
    if value == 600.0 and type(value) is float:
        return _DEFAULT_TTL
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif type(value) is int:
        # Compared as an int first: a huge int cannot become a float.
        seconds = float(value) if -MAX_TTL_SECONDS <= value <= MAX_TTL_SECONDS else math.inf
    elif type(value) is float:
        seconds = value
    else:
        raise InvalidArgumentError(
            f"ttl must be seconds (int or float) or a timedelta, got {shown(value)}"
        )
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TTL_SECONDS:
        raise InvalidArgumentError(
            f"ttl must be more than 0 and at most {MAX_TTL_SECONDS} seconds, got {shown(value)}"
        )
    return timedelta(seconds=seconds)


def check_min_balance(value: object) -> int:
    """Return a reservation floor: an `int` in ``[0, MAX_AMOUNT]``."""
    return check_amount("min_balance", value, minimum=0)


def check_metadata(value: object, name: str = "metadata") -> CreditMetadata | None:
    """Accept `CreditMetadata`, a plain dict (validated into one) or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        try:
            value = CreditMetadata.model_validate(dict(value))
        except ValidationError as exc:
            raise InvalidArgumentError(f"{name} is not valid CreditMetadata: {exc}") from exc
    if not isinstance(value, CreditMetadata):
        raise InvalidArgumentError(
            f"{name} must be CreditMetadata, a dict or None, got {type(value).__name__}"
        )
    if value.scope is not None:
        check_id(f"{name}.scope", value.scope)
    dumped = value.model_dump(exclude_none=True)
    try:
        json.dumps(dumped, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"{name} must be JSON-serialisable (no NaN or infinity): {exc}"
        ) from exc
    where = _nul_in(dumped, name)
    if where is not None:
        raise InvalidArgumentError(f"{name} must not contain NUL, found one in {where}")
    return value


def _nul_in(value: object, path: str) -> str | None:
    """The path of the first key or string holding NUL inside `value`, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                return f"{path} (a key)"
            found = _nul_in(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            found = _nul_in(item, f"{path}[{n}]")
            if found is not None:
                return found
    return None


def check_grant_type(value: object) -> str:
    """Return a grant type (``purchase``, ``subscription``, ``signup_bonus``, ``adjustment``)."""
    if type(value) is not str or value not in GRANT_TYPES:
        raise InvalidArgumentError(f"type must be one of {sorted(GRANT_TYPES)}, got {shown(value)}")
    return value


def check_types_filter(value: object) -> frozenset[str] | None:
    """Return a set of transaction types to filter on, or None for all."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"types must be a list of transaction types, got {shown(value)}")
    items = list(value)
    if not items or any(type(item) is not str or item not in TRANSACTION_TYPES for item in items):
        raise InvalidArgumentError(
            f"types must be a non-empty list drawn from {sorted(TRANSACTION_TYPES)},"
            f" got {shown(items)}"
        )
    return frozenset(items)


def check_limit(value: object, *, name: str = "limit", maximum: int = MAX_PAGE) -> int:
    """Return a page size or row limit in ``[1, maximum]``."""
    if type(value) is not int or not 1 <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be an int from 1 to {maximum}, got {shown(value)}")
    return value


def check_window(start: object, end: object) -> tuple[datetime, datetime]:
    """Return a half-open ``[start, end)`` window as aware UTC datetimes, start <= end."""
    s, e = to_utc("start", start), to_utc("end", end)
    if e < s:
        raise InvalidArgumentError(
            f"end ({e.isoformat()}) must not be before start ({s.isoformat()})"
        )
    return s, e


def check_spend_cap(cap: object) -> SpendCap:
    """Return a validated `SpendCap` whose user id is set."""
    if not isinstance(cap, SpendCap):
        raise InvalidArgumentError(f"cap must be a SpendCap, got {type(cap).__name__}")
    check_id("cap.user_id", cap.user_id)
    check_cap_type(cap.cap_type, "cap.cap_type")
    if cap.action not in ("deny", "warn", "notify"):
        raise InvalidArgumentError(
            f"cap.action must be 'deny', 'warn' or 'notify', got {shown(cap.action)}"
        )
    check_amount("cap.limit", cap.limit, minimum=0)
    if cap.model is not None:
        check_id("cap.model", cap.model)
    if cap.scope is not None:
        check_id("cap.scope", cap.scope)
    return cap


def check_cap_type(value: object, name: str = "cap_type") -> Literal["daily", "monthly"]:
    """Return ``daily`` or ``monthly``."""
    if value == "daily":
        return "daily"
    if value == "monthly":
        return "monthly"
    raise InvalidArgumentError(f"{name} must be 'daily' or 'monthly', got {shown(value)}")


def check_version(value: object) -> int:
    """Return a pricing version number (an int >= 1)."""
    if type(value) is not int or not 1 <= value <= MAX_AMOUNT:
        raise InvalidArgumentError(
            f"version must be an int from 1 to {MAX_AMOUNT}, got {shown(value)}"
        )
    return value


def check_balance_bound(name: str, new_value: int) -> None:
    """Refuse an operation whose result would leave `MAX_AMOUNT` range."""
    if abs(new_value) > MAX_AMOUNT:
        raise InvalidArgumentError(
            f"{name} would become {new_value}, beyond the supported range of +/-{MAX_AMOUNT}"
        )


def check_future(name: str, moment: datetime | None, now: datetime) -> None:
    """Refuse an expiry that is not after `now`."""
    if moment is not None and moment <= now:
        raise InvalidArgumentError(f"{name} must be in the future, got {moment.isoformat()}")


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 text of an optional instant."""
    return None if moment is None else moment.isoformat()


# -- Per-operation argument checks (every store calls these) ----------------------------------


def check_grant(
    user_id: object,
    amount: object,
    type_: object,
    metadata: object,
    expires_at: object,
    idempotency_key: object,
) -> tuple[str, CreditMetadata | None, datetime | None, str | None]:
    """Check `add_credits` arguments; return type, metadata, expiry and key."""
    check_id("user_id", user_id)
    kind = check_grant_type(type_)
    if kind == "adjustment":
        check_signed_amount("amount", amount)
    else:
        check_amount("amount", amount)
    meta = check_metadata(metadata)
    expiry = to_optional_utc("expires_at", expires_at)
    key = check_optional_key("idempotency_key", idempotency_key)
    if expiry is not None and isinstance(amount, int) and amount < 0:
        raise InvalidArgumentError("expires_at cannot be set on a negative adjustment")
    return kind, meta, expiry, key


def check_reserve(
    user_id: object,
    amount: object,
    operation_type: object,
    metadata: object,
    min_balance: object,
    ttl: object,
    use_allowance: object,
    idempotency_key: object,
) -> tuple[CreditMetadata | None, timedelta, str | None]:
    """Check `reserve_credits` arguments; return metadata, TTL and key."""
    check_id("user_id", user_id)
    check_amount("amount", amount)
    check_id("operation_type", operation_type)
    meta = check_metadata(metadata)
    check_min_balance(min_balance)
    lifetime = check_ttl(ttl)
    check_bool("use_allowance", use_allowance)
    return meta, lifetime, check_optional_key("idempotency_key", idempotency_key)


def check_charge(
    user_id: object,
    amount: object,
    operation_type: object,
    metadata: object,
    min_balance: object,
    use_allowance: object,
    idempotency_key: object,
) -> tuple[CreditMetadata | None, str | None]:
    """Check `charge_credits` arguments; return metadata and key."""
    check_id("user_id", user_id)
    check_amount("amount", amount, minimum=0)
    check_id("operation_type", operation_type)
    meta = check_metadata(metadata)
    check_min_balance(min_balance)
    check_bool("use_allowance", use_allowance)
    return meta, check_optional_key("idempotency_key", idempotency_key)


def check_team_reserve(
    team_id: object,
    user_id: object,
    amount: object,
    operation_type: object,
    metadata: object,
    ttl: object,
    idempotency_key: object,
) -> tuple[CreditMetadata | None, timedelta, str | None]:
    """Check `reserve_team_credits` arguments; return metadata, TTL and key."""
    check_id("team_id", team_id)
    check_id("user_id", user_id)
    check_amount("amount", amount)
    check_id("operation_type", operation_type)
    meta = check_metadata(metadata)
    lifetime = check_ttl(ttl)
    return meta, lifetime, check_optional_key("idempotency_key", idempotency_key)


def check_deduct(
    user_id: object,
    reservation_id: object,
    amount: object,
    idempotency_key: object,
    metadata: object,
) -> tuple[str | None, CreditMetadata | None]:
    """Check `deduct_credits` arguments; return key and metadata."""
    check_id("user_id", user_id)
    check_id("reservation_id", reservation_id)
    check_amount("amount", amount, minimum=0)
    return check_optional_key("idempotency_key", idempotency_key), check_metadata(metadata)


def check_refund(
    transaction_id: object,
    amount: object,
    reason: object,
    metadata: object,
    idempotency_key: object,
) -> tuple[str | None, CreditMetadata | None, str | None]:
    """Check `refund_credits` arguments; return reason, metadata and key."""
    check_id("transaction_id", transaction_id)
    if amount is not None:
        check_amount("amount", amount)
    text = check_optional_text("reason", reason)
    meta = check_metadata(metadata)
    return text, meta, check_optional_key("idempotency_key", idempotency_key)


def check_team_topup(
    team_id: object, amount: object, metadata: object, expires_at: object, idempotency_key: object
) -> tuple[CreditMetadata | None, datetime | None, str | None]:
    """Check `add_team_credits` arguments; return metadata, expiry and key."""
    check_id("team_id", team_id)
    check_amount("amount", amount)
    meta = check_metadata(metadata)
    expiry = to_optional_utc("expires_at", expires_at)
    return meta, expiry, check_optional_key("idempotency_key", idempotency_key)


def check_team_deduct(
    team_id: object, user_id: object, amount: object, metadata: object, idempotency_key: object
) -> tuple[CreditMetadata | None, str | None]:
    """Check `deduct_team` arguments; return metadata and key."""
    check_id("team_id", team_id)
    check_id("user_id", user_id)
    check_amount("amount", amount)
    return check_metadata(metadata), check_optional_key("idempotency_key", idempotency_key)


def check_team_member(team_id: object, user_id: object, role: object, spend_cap: object) -> None:
    """Check `add_team_member` arguments."""
    check_id("team_id", team_id)
    check_id("user_id", user_id)
    check_id("role", role)
    if spend_cap is not None:
        check_amount("spend_cap", spend_cap, minimum=0)


def check_page(
    limit: object, cursor: object, types: object, start: object, end: object
) -> tuple[int | None, frozenset[str] | None, datetime | None, datetime | None]:
    """Check ledger paging arguments; return the cursor position, types and bounds."""
    check_limit(limit)
    before = decode_cursor(cursor)
    return (
        before,
        check_types_filter(types),
        to_optional_utc("start", start),
        to_optional_utc("end", end),
    )


def check_pricing(config: object) -> PricingConfigData:
    """
    Accept `PricingConfigData` or a dict validated into one, if the engine can price it.

    Every expression is parsed and checked by building the pricing engine, so a version no
    manager could load is never published.

    Raises:
        InvalidArgumentError: The config is invalid (`ExpressionError` names the section,
            key and position of a bad expression).
    """
    if isinstance(config, PricingConfigData):
        data = config
    elif isinstance(config, dict):
        try:
            data = PricingConfigData.model_validate(config)
        except ValueError as exc:
            raise InvalidArgumentError(f"config is not a valid pricing config: {exc}") from exc
    else:
        raise InvalidArgumentError(f"config must be PricingConfigData, got {type(config).__name__}")
    from ducto.pricing.engine import validate_pricing_config  # the engine imports this module

    validate_pricing_config(data)
    return data


# -- Ids, time and windows ---------------------------------------------------------------------


class IdSource:
    """Unique, unguessable-enough ids: a random per-store prefix plus a counter."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._count = 0

    def next(self, kind: str) -> str:
        """Return a new id such as ``tx_3fa4c1d2e9b0_1f``."""
        self._count += 1
        return f"{kind}_{self._prefix}_{self._count:x}"


def utc_now() -> datetime:
    """The default clock: the current aware UTC time."""
    return datetime.now(UTC)


def read_clock(clock: Any) -> datetime:
    """Call a store clock and insist on an aware datetime (converted to UTC)."""
    now = clock()
    if type(now) is datetime and now.tzinfo is UTC:
        return now
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise InvalidArgumentError(f"clock must return an aware datetime, got {shown(now)}")
    return now if now.tzinfo is UTC else now.astimezone(UTC)


def day_key(moment: datetime) -> int:
    """The UTC calendar day of an aware UTC datetime, as a proleptic ordinal."""
    return moment.toordinal()


def month_key(moment: datetime) -> int:
    """The UTC calendar month of an aware UTC datetime, as ``year * 12 + month - 1``."""
    return moment.year * 12 + moment.month - 1


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """The half-open UTC calendar month ``[start, end)`` containing `moment`."""
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    if moment.month == 12:
        return start, datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    return start, datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)


def day_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """The half-open UTC calendar day ``[start, end)`` containing `moment`."""
    start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def cap_window_key(cap_type: str, moment: datetime) -> int:
    """The window a cap of `cap_type` (daily or monthly) counts at `moment`."""
    return day_key(moment) if cap_type == "daily" else month_key(moment)


def cap_window_bounds(cap_type: str, moment: datetime) -> tuple[datetime, datetime]:
    """The half-open window a cap of `cap_type` counts at `moment`."""
    return day_bounds(moment) if cap_type == "daily" else month_bounds(moment)


# -- Lots --------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Lot:
    """A positive grant's remainder. ``seq`` orders lots by creation."""

    id: str
    seq: int
    remaining: int
    expires_at: datetime | None


_NEVER = datetime.max.replace(tzinfo=UTC)


def lot_order(expires_at: datetime | None, seq: int) -> tuple[datetime, int]:
    """
    Sort key of the burn-down order.

    Soonest-expiring first, non-expiring last, oldest first among equals.
    """
    return (_NEVER if expires_at is None else expires_at, seq)


def draw(lots: Iterable[Lot], amount: int) -> tuple[list[tuple[Lot, int]], int]:
    """
    Take up to `amount` from `lots`, in the order given, lowering each lot's remainder.

    Returns:
        The draws as ``(lot, taken)`` pairs and the part of `amount` nothing covered.
    """
    draws: list[tuple[Lot, int]] = []
    rest = amount
    if rest <= 0:
        return draws, 0
    for lot in lots:
        take = lot.remaining if lot.remaining < rest else rest
        if take > 0:
            lot.remaining -= take
            draws.append((lot, take))
            rest -= take
            if rest == 0:
                break
    return draws, rest


def split_credit(balance: int, amount: int) -> tuple[int, int]:
    """
    Split a credit into the part that pays a negative balance and the part that becomes a lot.

    Returns:
        ``(debt_paid, lot_credit)``.
    """
    debt_paid = min(amount, -balance) if balance < 0 else 0
    return debt_paid, amount - debt_paid


def shortfall(balance_before: int, paid: int) -> int:
    """The part of a debit of `paid` that took the balance below zero."""
    before_debt = max(0, -balance_before)
    after_debt = max(0, paid - balance_before)
    return after_debt - before_debt


@dataclass(slots=True)
class RefundPlan:
    """Where a refund's credits go: debt first, then lots newest-drawn first, then a new lot."""

    debt_paid: int
    into_lots: list[tuple[str, int]]
    new_lot: int


def plan_refund(
    draws: Sequence[tuple[str, int]], refunded: list[int], amount: int, balance: int
) -> RefundPlan:
    """
    Allocate a refund of `amount` on an account whose balance is `balance`.

    The credit first pays any negative balance, then returns to the lots the debit drew
    from, newest-drawn first, up to what each gave; whatever is left (the debit ran past
    every lot) becomes a new non-expiring lot.

    Args:
        draws: The debit's ``(lot_id, taken)`` pairs, in the order it drew them.
        refunded: The debit's refund totals: ``refunded[0]`` overall, ``refunded[i + 1]``
            what went back into ``draws[i]``. Updated in place.
        amount: Credits to refund.
        balance: The account balance before the refund.
    """
    debt_paid, rest = split_credit(balance, amount)
    into: list[tuple[str, int]] = []
    for index in range(len(draws) - 1, -1, -1):
        if rest == 0:
            break
        lot_id, taken = draws[index]
        room = taken - refunded[index + 1]
        if room > 0:
            give = min(room, rest)
            refunded[index + 1] += give
            into.append((lot_id, give))
            rest -= give
    refunded[0] += amount
    return RefundPlan(debt_paid, into, rest)


# -- Holds, caps and allowance -----------------------------------------------------------------


def spendable(
    balance: int, expired_unswept: int, reserved: int, allowance_remaining: int = 0
) -> int:
    """What can be held or spent now: balance minus unswept expired credits and holds."""
    return balance - expired_unswept - reserved + allowance_remaining


def cap_trips(spend: int, held: int, amount: int, limit: int) -> bool:
    """A cap trips when window spend plus active holds plus `amount` goes over its limit."""
    return spend + held + amount > limit


def cap_applies(cap: SpendCap, model: str | None, scope: str | None) -> bool:
    """
    Whether `cap` covers usage on `model` in `scope`.

    A cap without a model covers every model, a per-model cap that model only; a cap without
    a scope covers all of the user's usage, a scoped cap only usage in its scope.
    """
    return (cap.model is None or cap.model == model) and (cap.scope is None or cap.scope == scope)


SpendOf = Callable[[SpendCap], int]
"""Window spend a cap sees now (its type's window, its model and its scope)."""
HeldOf = Callable[[str | None, str | None], int]
"""Active holds counting toward a cap on a model and a scope (None: any)."""

CapSortKey = tuple[int, bool, str, bool, str]


def cap_sort_key(cap: SpendCap) -> CapSortKey:
    """The fixed order of a user's caps: daily before monthly, the all-model cap first, then
    by model name, the unscoped cap first, then by scope."""
    return (
        0 if cap.cap_type == "daily" else 1,
        cap.model is not None,
        cap.model or "",
        cap.scope is not None,
        cap.scope or "",
    )


def cap_resets_at(cap_type: str, moment: datetime) -> datetime:
    """When the window a cap of `cap_type` counts at `moment` ends (the next UTC midnight or
    month start)."""
    return cap_window_bounds(cap_type, moment)[1]


def hold_cap_refusal(
    caps: Iterable[SpendCap],
    model: str | None,
    scope: str | None,
    amount: int,
    spend_of: SpendOf,
    held_of: HeldOf,
    now: datetime,
) -> dict[str, Any] | None:
    """
    The deny cap covering a hold on `model` in `scope` that `amount` more would trip, if any.

    When several would, the one with the least headroom (limit minus window spend minus
    active holds) is reported, ties broken by `cap_sort_key`, so every store names the same.
    """
    best: tuple[tuple[int, CapSortKey], SpendCap, int, int] | None = None
    for cap in caps:
        if cap.action != "deny" or not cap_applies(cap, model, scope):
            continue
        spend = spend_of(cap)
        held = held_of(cap.model, cap.scope)
        if cap_trips(spend, held, amount, cap.limit):
            rank = (cap.limit - spend - held, cap_sort_key(cap))
            if best is None or rank < best[0]:
                best = (rank, cap, spend, held)
    if best is None:
        return None
    _, cap, spend, held = best
    return {
        "error": ErrorCode.SPEND_CAP_EXCEEDED,
        "cap_limit": cap.limit,
        "cap_spend": spend,
        "cap_model": cap.model,
        "cap_type": cap.cap_type,
        "cap_reserved": held,
        "cap_scope": cap.scope,
        "cap_resets_at": cap_resets_at(cap.cap_type, now),
    }


def cap_warning(
    caps: Iterable[SpendCap], model: str | None, scope: str | None, spend_of: SpendOf
) -> str | None:
    """
    The action of a warn/notify cap whose window spend is now over its limit, if any.

    When several are, the most exceeded one wins, ties broken by `cap_sort_key`.
    """
    best: tuple[tuple[int, CapSortKey], str] | None = None
    for cap in caps:
        if cap.action == "deny" or not cap_applies(cap, model, scope):
            continue
        spend = spend_of(cap)
        if spend > cap.limit:
            rank = (cap.limit - spend, cap_sort_key(cap))
            if best is None or rank < best[0]:
                best = (rank, cap.action)
    return best[1] if best is not None else None


def check_caps(
    caps: Iterable[SpendCap],
    model: str | None,
    scope: str | None,
    amount: int,
    spend_of: SpendOf,
    held_of: HeldOf,
    now: datetime,
) -> CapCheckResult:
    """
    The advisory cap check of the most pressing matching cap.

    A tripped deny cap comes first, then a tripped warn/notify cap, else the cap with the
    least headroom (window spend plus active holds plus `amount` against the limit); ties
    are broken by `cap_sort_key`. ``capped`` is True only for a tripped deny cap (the call
    would be refused, as in ducto 1.x); ``exceeded`` for any tripped cap.
    """
    best: tuple[tuple[int, int, CapSortKey], CapCheckResult] | None = None
    for cap in caps:
        if not cap_applies(cap, model, scope):
            continue
        spend = spend_of(cap)
        held = held_of(cap.model, cap.scope)
        exceeded = cap_trips(spend, held, amount, cap.limit)
        deny = cap.action == "deny"
        rank = (
            0 if exceeded and deny else 1 if exceeded else 2,
            cap.limit - spend - held,
            cap_sort_key(cap),
        )
        if best is None or rank < best[0]:
            best = (
                rank,
                CapCheckResult(
                    capped=exceeded and deny,
                    exceeded=exceeded,
                    current_spend=spend,
                    cap_limit=cap.limit,
                    action=cap.action,
                    model=cap.model,
                    reserved=held,
                    cap_type=cap.cap_type,
                    scope=cap.scope,
                    resets_at=cap_resets_at(cap.cap_type, now),
                ),
            )
    return best[1] if best is not None else CapCheckResult()


def allowance_split(amount: int, allowance_remaining: int) -> tuple[int, int]:
    """Split a charge into the part the plan allowance covers and the part the balance pays."""
    covered = min(amount, max(0, allowance_remaining))
    return covered, amount - covered


def feature_present(features: Mapping[str, Any], feature: str) -> tuple[bool, Any]:
    """A feature is present when its key exists and the value is not None or False."""
    value = features.get(feature)
    return (feature in features and value is not None and value is not False), value


# -- Refusals, in the contract's order ----------------------------------------------------------

HOLD_OPEN: Final = 0
HOLD_SETTLED: Final = 1
HOLD_RELEASED: Final = 2


def hold_error(state: int | None) -> ErrorCode | None:
    """Why a hold in `state` (None: unknown to this user) cannot be settled."""
    if state is None:
        return ErrorCode.RESERVATION_NOT_FOUND
    if state == HOLD_SETTLED:
        return ErrorCode.RESERVATION_ALREADY_SETTLED
    if state == HOLD_RELEASED:
        return ErrorCode.RESERVATION_RELEASED
    return None


def refund_error(tx_type: str, refundable: int, amount: int | None) -> ErrorCode | None:
    """Why a refund of `amount` (None: the rest) of a `tx_type` row is refused."""
    if tx_type not in REFUNDABLE_TYPES:
        return ErrorCode.NOT_REFUNDABLE
    if refundable == 0:
        return ErrorCode.ALREADY_REFUNDED
    if amount is not None and amount > refundable:
        return ErrorCode.OVER_REFUND
    return None


def team_deduct_error(
    is_member: bool, available: int, amount: int, spent: int, spend_cap: int | None
) -> ErrorCode | None:
    """Why a team charge is refused: membership, then the pool, then the member's cap."""
    if not is_member:
        return ErrorCode.USER_NOT_IN_TEAM
    if available < amount:
        return ErrorCode.INSUFFICIENT_TEAM_BALANCE
    if spend_cap is not None and spent + amount > spend_cap:
        return ErrorCode.SPEND_CAP_EXCEEDED
    return None


def fingerprint(*parts: object) -> str:
    """A canonical text form of a request, compared to detect idempotency-key reuse."""
    return json.dumps([p.isoformat() if isinstance(p, datetime) else p for p in parts])


# -- Idempotency and metadata ------------------------------------------------------------------


def row_metadata(caller: CreditMetadata | None, system: Mapping[str, Any]) -> dict[str, Any]:
    """Merge caller metadata with system keys (see `merge_system`)."""
    caller_data = (
        json.loads(caller.model_dump_json(exclude_none=True)) if caller is not None else {}
    )
    return merge_system(caller_data, system)


def merge_system(caller: Mapping[str, Any], system: Mapping[str, Any]) -> dict[str, Any]:
    """
    Merge caller metadata with system keys.

    System keys always win: one without a value removes the caller's key of that name, so a
    row never shows, say, an idempotency key it was not written with.
    """
    merged = dict(caller)
    for key, value in system.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def metadata_model(metadata: CreditMetadata | None) -> str | None:
    """The model a request names, if any."""
    return None if metadata is None else metadata.model


def metadata_scope(metadata: CreditMetadata | None) -> str | None:
    """The budget scope a request names, if any."""
    return None if metadata is None else metadata.scope


# -- Cursors -----------------------------------------------------------------------------------

_CURSOR_PREFIX: Final = "c1."


def encode_cursor(seq: int) -> str:
    """An opaque cursor pointing just past the ledger row with sequence number `seq`."""
    return f"{_CURSOR_PREFIX}{seq:x}"


_CURSOR_BODY: Final = re.compile(r"[0-9a-f]{1,15}")
"""At most 15 hex digits: every sequence number fits a signed 64-bit column."""


def decode_cursor(cursor: object) -> int | None:
    """Return the sequence number inside a cursor (None for the first page)."""
    if cursor is None:
        return None
    if (
        type(cursor) is str
        and cursor.startswith(_CURSOR_PREFIX)
        and _CURSOR_BODY.fullmatch(cursor, len(_CURSOR_PREFIX))
    ):
        return int(cursor[len(_CURSOR_PREFIX) :], 16)
    raise InvalidArgumentError(f"cursor is not a cursor this store returned: {shown(cursor)}")


# -- Analytics ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SpendEvent:
    """
    Usage as analytics sees it: who spent, on what, when, net of refunds.

    One debit (``count`` 1), or an archived day's rollup (at its UTC midnight, ``count`` the
    debits it stands for).
    """

    user_id: str
    model: str
    created_at: datetime
    net: int
    count: int = 1
    scope: str | None = None


def _in_window(
    events: Iterable[SpendEvent], start: datetime, end: datetime
) -> Iterator[SpendEvent]:
    for event in events:
        if start <= event.created_at < end:
            yield event


def _ranked(totals: Mapping[str, list[int]]) -> list[tuple[str, int, int]]:
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: (-r[1], r[0]))


def _group(events: Iterable[SpendEvent], key: str) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = {}
    for event in events:
        entry = totals.setdefault(getattr(event, key), [0, 0])
        entry[0] += event.net
        entry[1] += event.count
    return totals


def spend_by_user(
    events: Iterable[SpendEvent], start: datetime, end: datetime
) -> list[SpendByUserRow]:
    """Net paid usage per user in ``[start, end)``, by spend descending then user id."""
    rows = _ranked(_group(_in_window(events, start, end), "user_id"))
    return [SpendByUserRow(user_id=k, total_spend=s, transaction_count=c) for k, s, c in rows]


def spend_by_scope(
    events: Iterable[SpendEvent], start: datetime, end: datetime, user_id: str | None
) -> list[SpendByScopeRow]:
    """
    Net paid usage per user and budget scope in ``[start, end)`` (one user's when `user_id`
    is given), by spend descending, then user id, then scope (unscoped first).
    """
    totals: dict[tuple[str, str | None], list[int]] = {}
    for event in _in_window(events, start, end):
        if user_id is not None and event.user_id != user_id:
            continue
        entry = totals.setdefault((event.user_id, event.scope), [0, 0])
        entry[0] += event.net
        entry[1] += event.count
    ranked = sorted(
        totals.items(), key=lambda kv: (-kv[1][0], kv[0][0], kv[0][1] is not None, kv[0][1] or "")
    )
    return [
        SpendByScopeRow(user_id=user, scope=scope, total_spend=net, transaction_count=count)
        for (user, scope), (net, count) in ranked
    ]


def spend_by_model(
    events: Iterable[SpendEvent], start: datetime, end: datetime
) -> list[SpendByModelRow]:
    """Net paid usage per model in ``[start, end)``, by spend descending then model."""
    rows = _ranked(_group(_in_window(events, start, end), "model"))
    return [SpendByModelRow(model=k, total_spend=s, transaction_count=c) for k, s, c in rows]


def top_users(
    events: Iterable[SpendEvent], limit: int, start: datetime, end: datetime
) -> list[TopUserRow]:
    """The `limit` users with the most net paid usage in ``[start, end)``."""
    rows = _ranked(_group(_in_window(events, start, end), "user_id"))[:limit]
    return [TopUserRow(user_id=k, total_spend=s) for k, s, _ in rows]


def daily_spend(
    events: Iterable[SpendEvent], start: datetime, end: datetime
) -> list[DailySpendRow]:
    """Net paid usage per UTC day in ``[start, end)``, oldest day first."""
    totals: dict[date, list[int]] = {}
    for event in _in_window(events, start, end):
        entry = totals.setdefault(event.created_at.date(), [0, 0])
        entry[0] += event.net
        entry[1] += event.count
    return [
        DailySpendRow(date=day.isoformat(), total_spend=s, transaction_count=c)
        for day, (s, c) in sorted(totals.items())
    ]


def window_days(start: datetime, end: datetime) -> int:
    """How many UTC calendar days the half-open window touches (at least 1)."""
    if end <= start:
        return 1
    last = end - timedelta(microseconds=1)
    return (last.date() - start.date()).days + 1


def aggregate_stats(
    events: Iterable[SpendEvent], start: datetime, end: datetime
) -> AggregateStatsRow:
    """Totals over ``[start, end)``: spend, users, average per UTC day, top model and user."""
    window = list(_in_window(events, start, end))
    by_user = _ranked(_group(window, "user_id"))
    by_model = _ranked(_group(window, "model"))
    total = sum(e.net for e in window)
    average = (Decimal(total) / window_days(start, end)).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_EVEN
    )
    return AggregateStatsRow(
        total_credits_consumed=total,
        active_users=len(by_user),
        avg_daily_spend=average,
        top_model=by_model[0][0] if by_model else "",
        top_user=by_user[0][0] if by_user else "",
        transaction_count=sum(e.count for e in window),
    )
