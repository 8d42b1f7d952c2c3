"""Pricing versions: publish, activate and read them."""

from __future__ import annotations

from ducto.errors import PricingVersionNotFoundError
from ducto.interface.models import PricingConfigData, PricingConfigHistoryItem, PricingConfigResult

from .storage import PricingVersion, Storage


def _pricing_result(item: PricingVersion, active: int | None) -> PricingConfigResult:
    return PricingConfigResult(
        id=item.id,
        config=item.config,
        version=item.version,
        label=item.label,
        active=item.version == active,
        created_at=item.created_at,
    )


def get_active_pricing(st: Storage) -> PricingConfigResult | None:
    """The active version, or None."""
    item = st.active_pricing()
    return None if item is None else _pricing_result(item, item.version)


def set_active_pricing(st: Storage, config: PricingConfigData, label: str | None) -> str:
    """Publish `config` as version highest + 1 and activate it; return its id."""
    now = st.now()
    item = PricingVersion(st.last_pricing_version() + 1, st.new_id("price"), config, label, now)
    st.add_pricing(item)
    st.activate(item.version)
    return item.id


def activate_pricing(st: Storage, version: int) -> str:
    """Make an existing version active; `PricingVersionNotFoundError` otherwise."""
    item = st.pricing(version)
    if item is None:
        raise PricingVersionNotFoundError(version)
    st.activate(version)
    return item.id


def get_pricing_config(st: Storage, version: int) -> PricingConfigResult | None:
    """One version, or None."""
    item = st.pricing(version)
    return None if item is None else _pricing_result(item, st.active_version())


def get_pricing_history(st: Storage) -> list[PricingConfigHistoryItem]:
    """Every version, newest first."""
    active = st.active_version()
    return [
        PricingConfigHistoryItem(
            id=item.id,
            version=item.version,
            label=item.label,
            active=item.version == active,
            created_at=item.created_at,
        )
        for item in st.pricing_history()
    ]
