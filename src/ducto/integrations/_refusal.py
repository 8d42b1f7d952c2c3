"""What a gateway tells the client about a refusal: the HTTP status, and a budget's reset."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Final

from ducto.errors import CreditError, ErrorCode, InvalidArgumentError, SpendCapExceededError

HEADER_BUDGET_RESETS_AT: Final = "x-ducto-budget-resets-at"
"""Response header of a spend-cap refusal (429): when the cap's window (its UTC day or month)
ends, in ISO 8601 UTC."""


def _status(exc: BaseException) -> tuple[int, str, str] | None:
    """HTTP status, error type and error code for a refusal of a hold; None for other errors."""
    if isinstance(exc, InvalidArgumentError):
        return 400, "invalid_request_error", "invalid_argument"
    if isinstance(exc, CreditError):
        code = exc.code
        if code in (ErrorCode.INSUFFICIENT_CREDITS, ErrorCode.INSUFFICIENT_TEAM_BALANCE):
            return 402, "insufficient_quota", str(code)
        if code is ErrorCode.SPEND_CAP_EXCEEDED:
            return 429, "spend_cap_exceeded", str(code)
        if code in (ErrorCode.TEAM_NOT_FOUND, ErrorCode.USER_NOT_IN_TEAM):
            return 403, "permission_error", str(code)
        return 409, "invalid_request_error", str(code)
    return None


def _instant(moment: datetime) -> str:
    """An instant in ISO 8601 UTC with a ``Z``, as pydantic writes one in JSON."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _budget_fields(exc: BaseException) -> dict[str, object]:
    """
    The keys a spend-cap refusal adds to the error object: ``resets_at`` (ISO 8601 UTC, None
    when the store did not say), ``cap_type`` and ``scope`` (None: the cap covers all of the
    user's usage). Nothing for any other error.
    """
    if not isinstance(exc, SpendCapExceededError):
        return {}
    resets_at = _instant(exc.resets_at) if exc.resets_at is not None else None
    return {"resets_at": resets_at, "cap_type": exc.cap_type, "scope": exc.scope}


def _budget_headers(exc: BaseException, now: datetime | None = None) -> dict[str, str]:
    """
    The headers of a spend-cap refusal whose window end is known: `HEADER_BUDGET_RESETS_AT`,
    and ``retry-after``, the whole seconds until then (at least 1).
    """
    if not isinstance(exc, SpendCapExceededError) or exc.resets_at is None:
        return {}
    resets_at = exc.resets_at
    if resets_at.tzinfo is None:
        resets_at = resets_at.replace(tzinfo=UTC)
    seconds = (resets_at - (now or datetime.now(UTC))).total_seconds()
    return {
        HEADER_BUDGET_RESETS_AT: _instant(resets_at),
        "retry-after": str(max(1, math.ceil(seconds))),
    }
