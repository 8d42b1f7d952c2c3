"""
Every exception ducto raises, as one tree, and the stable business error codes.

```
DuctoError
├── InvalidArgumentError(ValueError)   bad amount, empty id, bad config
│   ├── ExpressionError                a pricing expression that cannot be parsed or evaluated
│   ├── ConfigError                    a pricing config the engine refuses (ducto 1.x's name)
│   │   └── ConfigExpressionError      ... because of an expression (also an ExpressionError)
│   ├── PricingNotLoadedError          the manager has no pricing yet
│   └── PricingVersionInEffectError    only a scheduled version can be cancelled
├── CreditError                        a business rule refused the operation (one per ErrorCode)
└── StoreError                         the backend failed; ``__cause__`` is the driver's exception
    ├── StoreUnavailableError
    ├── UnsupportedAsyncLibraryError
    └── PricingVersionNotFoundError
```

Store methods report expected business outcomes on their result (``result.error``) rather
than raising; ``result.raise_for_error()`` turns such a result into the matching
`CreditError` subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

__all__ = [
    "AlreadyRefundedError",
    "ConfigError",
    "ConfigExpressionError",
    "CreditError",
    "DuctoError",
    "ErrorCode",
    "ExpressionError",
    "IdempotencyConflictError",
    "InsufficientCreditsError",
    "InsufficientTeamBalanceError",
    "InvalidArgumentError",
    "NotRefundableError",
    "OverRefundError",
    "PricingNotLoadedError",
    "PricingVersionInEffectError",
    "PricingVersionNotFoundError",
    "ReservationAlreadySettledError",
    "ReservationNotFoundError",
    "ReservationReleasedError",
    "SpendCapExceededError",
    "StoreError",
    "StoreUnavailableError",
    "TeamNotFoundError",
    "TransactionArchivedError",
    "TransactionNotFoundError",
    "UnsupportedAsyncLibraryError",
    "UserNotInTeamError",
    "error_from_fields",
]


class ErrorCode(StrEnum):
    """Stable codes for refused operations; each equals the ducto 1.x string."""

    INSUFFICIENT_CREDITS = "insufficient_credits"
    SPEND_CAP_EXCEEDED = "spend_cap_exceeded"
    RESERVATION_NOT_FOUND = "reservation_not_found"
    RESERVATION_ALREADY_SETTLED = "reservation_already_settled"
    RESERVATION_RELEASED = "reservation_released"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    TRANSACTION_NOT_FOUND = "transaction_not_found"
    TRANSACTION_ARCHIVED = "transaction_archived"
    NOT_REFUNDABLE = "not_refundable"
    ALREADY_REFUNDED = "already_refunded"
    OVER_REFUND = "over_refund"
    TEAM_NOT_FOUND = "team_not_found"
    USER_NOT_IN_TEAM = "user_not_in_team"
    INSUFFICIENT_TEAM_BALANCE = "insufficient_team_balance"


class DuctoError(Exception):
    """Base class of every exception ducto raises."""


class InvalidArgumentError(DuctoError, ValueError):
    """An argument has the wrong type or value; nothing was changed."""


class ExpressionError(InvalidArgumentError):
    """
    A pricing expression could not be parsed, checked or evaluated.

    Attributes:
        expression: The expression text.
        position: Zero-based character offset of the problem, when known.
    """

    def __init__(self, message: str, expression: str = "", position: int | None = None) -> None:
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"{message}{where}" + (f" in {expression!r}" if expression else ""))
        self.reason = message
        self.expression = expression
        self.position = position


class StoreError(DuctoError):
    """The storage backend failed; the driver's exception is chained as ``__cause__``."""


class StoreUnavailableError(StoreError):
    """The backend cannot be reached (connection lost, database file unusable)."""


class UnsupportedAsyncLibraryError(StoreError):
    """The store's driver cannot run on the current event loop (e.g. asyncpg under trio)."""


class PricingVersionNotFoundError(StoreError):
    """`activate_pricing` named a pricing version that does not exist."""

    def __init__(self, version: int) -> None:
        super().__init__(f"pricing version {version} does not exist")
        self.version = version


class PricingVersionInEffectError(InvalidArgumentError):
    """
    `cancel_pricing` named a version that is in force or was (only a scheduled version can
    be cancelled); `activate_pricing` named a cancelled one. Nothing was changed.
    """

    def __init__(self, version: int, message: str) -> None:
        super().__init__(f"version {version} {message}")
        self.version = version


class CreditError(DuctoError):
    """A business rule refused the operation; nothing was changed."""

    code: ClassVar[ErrorCode]

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields (see `error_from_fields`)."""
        raise NotImplementedError  # pragma: no cover - every concrete subclass overrides it


def _s(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    return "" if value is None else str(value)


def _i(fields: Mapping[str, object], name: str) -> int:
    value = fields.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _requested(fields: Mapping[str, object]) -> int:
    """The amount a refused call asked for (``requested``; ``amount`` on older results)."""
    requested = _i(fields, "requested")
    return requested if requested else abs(_i(fields, "amount"))


class InsufficientCreditsError(CreditError):
    """
    The user's available balance cannot cover the requested amount.

    Attributes:
        user_id: The account.
        needed: The credits asked for.
        available: What the account could spend.
        min_balance: The floor the request had to leave untouched (0 when none).
    """

    code = ErrorCode.INSUFFICIENT_CREDITS

    def __init__(self, user_id: str, needed: int, available: int, min_balance: int = 0) -> None:
        if min_balance and available >= needed:
            message = (
                f"user {user_id!r} has {available} credits available, but holding {needed} "
                f"would leave {available - needed}, below the minimum balance of {min_balance}"
            )
        else:
            message = f"user {user_id!r} needs {needed} credits but has {available} available"
        super().__init__(message)
        self.user_id, self.needed, self.available = user_id, needed, available
        self.min_balance = min_balance

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(
            _s(fields, "user_id"),
            _requested(fields),
            _i(fields, "available"),
            _i(fields, "min_balance"),
        )


class SpendCapExceededError(InsufficientCreditsError):
    """
    A deny spend cap would be exceeded by the requested amount.

    A member's monthly cap on a team pool raises it too. It is an `InsufficientCreditsError`,
    as ducto 1.x raised one for a spend cap, so an ``except InsufficientCreditsError`` written
    for 1.x still catches it; catch `SpendCapExceededError` first to tell the two apart.

    Attributes:
        user_id: The account.
        amount: The credits asked for.
        limit: The cap's limit.
        current_spend: The window's spend so far.
        model: The model the cap is for (None: every model).
        reserved: Active holds already counted against the cap.
        cap_type: ``daily`` or ``monthly``.
        scope: The budget scope the cap is for (an API key, a project; None: all usage).
        resets_at: When the cap's window (UTC day or month) ends, if known.
        needed: As on `InsufficientCreditsError`: the credits asked for.
        available: As on `InsufficientCreditsError`: what the cap still allows (0 when the
            limit is not known).
    """

    code = ErrorCode.SPEND_CAP_EXCEEDED

    def __init__(
        self,
        user_id: str,
        amount: int,
        limit: int | None = None,
        current_spend: int | None = None,
        model: str | None = None,
        reserved: int = 0,
        cap_type: str | None = None,
        *,
        scope: str | None = None,
        resets_at: datetime | None = None,
    ) -> None:
        covers = f" for model {model!r}" if model else ""
        if scope is not None:
            covers += f" in scope {scope!r}"
        kind = f"{cap_type} " if cap_type else ""
        if limit is None:
            message = f"user {user_id!r} would exceed a {kind}spend cap{covers} with {amount} more"
        else:
            spent = current_spend or 0
            over = spent + reserved + amount - limit
            held = f", {reserved} held" if reserved else ""
            message = (
                f"user {user_id!r} would exceed the {kind}spend cap{covers} of {limit} by {over}"
                f" ({spent} spent{held}, {amount} more requested)"
            )
        CreditError.__init__(self, f"Spend cap exceeded: {message}")  # 1.x's words first
        self.needed, self.min_balance = amount, 0
        headroom = limit - (current_spend or 0) - reserved if limit is not None else 0
        self.available = max(0, headroom)
        self.user_id, self.amount, self.limit = user_id, amount, limit
        self.current_spend, self.model = current_spend, model
        self.reserved, self.cap_type = reserved, cap_type
        self.scope, self.resets_at = scope, resets_at

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        limit = fields.get("cap_limit")
        spend = fields.get("cap_spend")
        model = fields.get("cap_model")
        cap_type = fields.get("cap_type")
        scope = fields.get("cap_scope")
        resets_at = fields.get("cap_resets_at")
        return cls(
            _s(fields, "user_id"),
            _requested(fields),
            limit if isinstance(limit, int) else None,
            spend if isinstance(spend, int) else None,
            model if isinstance(model, str) else None,
            _i(fields, "cap_reserved"),
            cap_type if isinstance(cap_type, str) else None,
            scope=scope if isinstance(scope, str) else None,
            resets_at=resets_at if isinstance(resets_at, datetime) else None,
        )


class ReservationNotFoundError(CreditError):
    """No hold with this id belongs to the user."""

    code = ErrorCode.RESERVATION_NOT_FOUND

    def __init__(self, user_id: str, reservation_id: str) -> None:
        super().__init__(f"user {user_id!r} has no reservation {reservation_id!r}")
        self.user_id, self.reservation_id = user_id, reservation_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "user_id"), _s(fields, "reservation_id"))


class ReservationAlreadySettledError(CreditError):
    """The hold was already settled by a deduction."""

    code = ErrorCode.RESERVATION_ALREADY_SETTLED

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"reservation {reservation_id!r} is already settled")
        self.reservation_id = reservation_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "reservation_id"))


class ReservationReleasedError(CreditError):
    """The hold was released and can no longer be settled."""

    code = ErrorCode.RESERVATION_RELEASED

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"reservation {reservation_id!r} was released")
        self.reservation_id = reservation_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "reservation_id"))


class IdempotencyConflictError(CreditError):
    """The idempotency key was already used for a different request."""

    code = ErrorCode.IDEMPOTENCY_CONFLICT

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(f"idempotency key {idempotency_key!r} was used for a different request")
        self.idempotency_key = idempotency_key

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "idempotency_key"))


class TransactionNotFoundError(CreditError):
    """No ledger transaction has this id."""

    code = ErrorCode.TRANSACTION_NOT_FOUND

    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"transaction {transaction_id!r} does not exist")
        self.transaction_id = transaction_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "original_transaction_id"))


class TransactionArchivedError(CreditError):
    """The transaction was moved out of the ledger by `archive_ledger`, so it cannot be refunded."""

    code = ErrorCode.TRANSACTION_ARCHIVED

    def __init__(self, transaction_id: str) -> None:
        super().__init__(
            f"transaction {transaction_id!r} was archived: its row left the ledger for an"
            " archive file, so it can no longer be refunded"
        )
        self.transaction_id = transaction_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "original_transaction_id"))


class NotRefundableError(CreditError):
    """Only usage and team usage debits can be refunded."""

    code = ErrorCode.NOT_REFUNDABLE

    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"transaction {transaction_id!r} is not a usage debit")
        self.transaction_id = transaction_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "original_transaction_id"))


class AlreadyRefundedError(CreditError):
    """The debit has been refunded in full already."""

    code = ErrorCode.ALREADY_REFUNDED

    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"transaction {transaction_id!r} is already fully refunded")
        self.transaction_id = transaction_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "original_transaction_id"))


class OverRefundError(CreditError):
    """The requested refund exceeds what is left to refund."""

    code = ErrorCode.OVER_REFUND

    def __init__(self, transaction_id: str, requested: int, refundable: int) -> None:
        super().__init__(
            f"cannot refund {requested} of transaction {transaction_id!r}: {refundable} left"
        )
        self.transaction_id, self.requested, self.refundable = transaction_id, requested, refundable

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(
            _s(fields, "original_transaction_id"), _requested(fields), _i(fields, "refundable")
        )


class TeamNotFoundError(CreditError):
    """No team has this id."""

    code = ErrorCode.TEAM_NOT_FOUND

    def __init__(self, team_id: str) -> None:
        super().__init__(f"team {team_id!r} does not exist")
        self.team_id = team_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "team_id"))


class UserNotInTeamError(CreditError):
    """The user is not a member of the team."""

    code = ErrorCode.USER_NOT_IN_TEAM

    def __init__(self, team_id: str, user_id: str) -> None:
        super().__init__(f"user {user_id!r} is not a member of team {team_id!r}")
        self.team_id, self.user_id = team_id, user_id

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "team_id"), _s(fields, "user_id"))


class InsufficientTeamBalanceError(CreditError):
    """The team pool cannot cover the requested amount."""

    code = ErrorCode.INSUFFICIENT_TEAM_BALANCE

    def __init__(self, team_id: str, needed: int, available: int) -> None:
        super().__init__(f"team {team_id!r} needs {needed} credits but has {available}")
        self.team_id, self.needed, self.available = team_id, needed, available

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CreditError:
        """Build the error from a result's fields."""
        return cls(_s(fields, "team_id"), _requested(fields), _i(fields, "available"))


_BY_CODE: dict[ErrorCode, type[CreditError]] = {
    cls.code: cls
    for cls in (
        InsufficientCreditsError,
        SpendCapExceededError,
        ReservationNotFoundError,
        ReservationAlreadySettledError,
        ReservationReleasedError,
        IdempotencyConflictError,
        TransactionNotFoundError,
        TransactionArchivedError,
        NotRefundableError,
        AlreadyRefundedError,
        OverRefundError,
        TeamNotFoundError,
        UserNotInTeamError,
        InsufficientTeamBalanceError,
    )
}


def error_from_fields(code: ErrorCode | str, fields: Mapping[str, object]) -> CreditError:
    """
    Build the `CreditError` subclass for `code`, taking its details from `fields`.

    Args:
        code: An `ErrorCode` (or its string value).
        fields: A result's fields, such as ``dict(result)``.

    Returns:
        The matching exception, ready to raise.
    """
    return _BY_CODE[ErrorCode(code)].from_fields(fields)


class ConfigError(InvalidArgumentError):
    """
    A pricing config is invalid: a missing or unknown key, a wrong type, a bad expression.

    ducto 1.x's name. Every config the pricing engine refuses raises a `ConfigError`;
    an expression it cannot compile raises `ConfigExpressionError`, which is both.
    """


class ConfigExpressionError(ExpressionError, ConfigError):
    """A config expression cannot be compiled; both an `ExpressionError` and a `ConfigError`."""


class PricingNotLoadedError(InvalidArgumentError):
    """
    No pricing is loaded: `CreditManager` cannot price usage yet.

    Raised by ``CreditManager.engine`` and every call that prices usage before
    ``publish_pricing`` or ``load_pricing_from_store`` succeeded, and by
    ``load_pricing_from_store`` when the store has no pricing version (as in ducto 1.x).
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "PricingEngine not loaded: no pricing loaded; call publish_pricing() or"
            " load_pricing_from_store() first"
        )
