"""
Pricing versions: publish (at once or at a time), activate, cancel and read them.

The version in force at an instant is decided here, from the storage's `PricingState`: the
latest of the pointer (the last immediate publication or activation, at the instant it was
made) and the scheduled versions whose ``effective_at`` has passed; a scheduled version and
the pointer at the same instant resolve to the pointer. So a rollback (`activate_pricing` of
an older version) holds until the next scheduled version takes effect, and a scheduled
version never takes effect before its time, whatever else is published meanwhile.
"""

from __future__ import annotations

from datetime import datetime

from ducto.errors import PricingVersionInEffectError, PricingVersionNotFoundError
from ducto.interface.models import PricingConfigData, PricingConfigHistoryItem, PricingConfigResult

from .storage import PricingState, PricingVersion, Storage


def in_force(state: PricingState, now: datetime) -> int | None:
    """The version in force at `now` (None before any version took effect)."""
    best: tuple[datetime, int] | None = None
    for effective_at, version in state.scheduled:
        if effective_at <= now and (best is None or (effective_at, version) > best):
            best = (effective_at, version)
    if state.pointer is not None:
        assert state.pointer_at is not None
        if best is None or best[0] <= state.pointer_at:
            return state.pointer
    return None if best is None else best[1]


def current_version(st: Storage, now: datetime) -> int | None:
    """The version in force at `now` in `st`."""
    return in_force(st.pricing_state(), now)


def _pricing_result(item: PricingVersion, current: int | None) -> PricingConfigResult:
    return PricingConfigResult(
        id=item.id,
        config=item.config,
        version=item.version,
        label=item.label,
        active=item.version == current,
        created_at=item.created_at,
        effective_at=item.effective_at,
        cancelled_at=item.cancelled_at,
    )


def get_active_pricing(st: Storage) -> PricingConfigResult | None:
    """The version in force now, or None."""
    version = current_version(st, st.now())
    item = None if version is None else st.pricing(version)
    return None if item is None else _pricing_result(item, version)


def set_active_pricing(
    st: Storage, config: PricingConfigData, label: str | None, effective_at: datetime | None
) -> str:
    """
    Publish `config` as version highest + 1; return its id.

    Without `effective_at` (or with one not after now) it is in force at once; otherwise it
    is scheduled and takes effect at `effective_at`.
    """
    now = st.now()
    scheduled = effective_at is not None and effective_at > now
    at = effective_at if scheduled and effective_at is not None else now
    item = PricingVersion(st.last_pricing_version() + 1, st.new_id("price"), config, label, now, at)
    st.add_pricing(item)
    if not scheduled:
        st.set_pricing_pointer(item.version, now)
    return item.id


def activate_pricing(st: Storage, version: int) -> str:
    """
    Put an existing version in force now (a rollback, or a scheduled version early).

    Raises:
        PricingVersionNotFoundError: No such version.
        PricingVersionInEffectError: The version was cancelled.
    """
    item = st.pricing(version)
    if item is None:
        raise PricingVersionNotFoundError(version)
    if item.cancelled_at is not None:
        raise PricingVersionInEffectError(version, "was cancelled and cannot be activated")
    st.set_pricing_pointer(version, st.now())
    return item.id


def cancel_pricing(st: Storage, version: int) -> PricingConfigResult:
    """
    Cancel a scheduled version before it takes effect (again: nothing changes).

    Raises:
        PricingVersionNotFoundError: No such version.
        PricingVersionInEffectError: The version is in force, or took effect before.
    """
    item = st.pricing(version)
    if item is None:
        raise PricingVersionNotFoundError(version)
    now = st.now()
    state = st.pricing_state()
    current = in_force(state, now)
    if item.cancelled_at is None:
        if item.effective_at <= now or version == current or version == state.pointer:
            raise PricingVersionInEffectError(
                version, "has taken effect; only a scheduled version can be cancelled"
            )
        st.cancel_pricing(version, now)
        item = item._replace(cancelled_at=now)
    return _pricing_result(item, current)


def get_pricing_config(st: Storage, version: int) -> PricingConfigResult | None:
    """One version, or None."""
    item = st.pricing(version)
    return None if item is None else _pricing_result(item, current_version(st, st.now()))


def get_pricing_history(st: Storage) -> list[PricingConfigHistoryItem]:
    """Every version, newest first."""
    now = st.now()
    current = current_version(st, now)
    return [
        PricingConfigHistoryItem(
            id=item.id,
            version=item.version,
            label=item.label,
            active=item.version == current,
            created_at=item.created_at,
            effective_at=item.effective_at,
            cancelled_at=item.cancelled_at,
            scheduled=item.cancelled_at is None and item.effective_at > now,
        )
        for item in st.pricing_history()
    ]
