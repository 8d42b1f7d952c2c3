"""
Auto top-up claims: one in flight per account, a monthly limit, expiry, and finishing.

The store decides who may charge for a crossing (`claim_top_up`) and grants what was paid
(`finish_top_up`); every rule holds across processes, so the races run on several instances of
the store on the same data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants
from tests.contract._peers import peers

from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    CreditMetadata,
    PlanDefinition,
    PricingConfigData,
    TopUpClaimResult,
)

pytestmark = pytest.mark.anyio

LIMIT = 3_000


async def _claim(
    store: CreditStore, user_id: str, amount: int = 1_000, **options: object
) -> TopUpClaimResult:
    args: dict[str, object] = {"threshold": 500, "amount": amount, "monthly_limit": LIMIT}
    args.update(options)
    return await store.claim_top_up(user_id, **args)  # type: ignore[arg-type]


# -- claiming -----------------------------------------------------------------------------------


async def test_a_claim_is_made_only_below_the_threshold(store: CreditStore, user_id: str) -> None:
    """At or above the threshold nothing is claimed; below it, the claim counts the amount."""
    await store.add_credits(user_id, 500, "purchase")

    at = await _claim(store, user_id)
    await store.reserve_credits(user_id, 1, "chat", min_balance=0)  # a hold counts too
    below = await _claim(store, user_id)

    assert (False, "not_needed", 500, 0) == (at.claimed, at.reason, at.available, at.month_total)
    assert (True, None, 499, 1_000) == (
        below.claimed,
        below.reason,
        below.available,
        below.month_total,
    )
    assert below.claim_id.startswith("topup_")
    assert below.amount == 1_000
    assert 500 == (await store.get_balance(user_id)).balance  # a claim grants nothing


async def test_a_user_never_seen_is_below_a_positive_threshold(
    store: CreditStore, user_id: str
) -> None:
    """An account with nothing has 0 available: below any positive threshold."""
    claim = await _claim(store, user_id)

    assert claim.claimed
    assert 0 == claim.available


async def test_the_plan_allowance_counts_as_available(store: CreditStore, user_id: str) -> None:
    """Available counts the allowance left, as low-balance crossings do."""
    await store.set_active_pricing(
        PricingConfigData(
            models={"_default": "1"},
            plans={"pro": PlanDefinition(id="pro", name="Pro", free_allowance=800)},
        )
    )
    await store.set_user_plan(user_id, "pro")

    claim = await _claim(store, user_id)

    assert ("not_needed", 800) == (claim.reason, claim.available)


async def test_one_claim_at_a_time_until_it_finishes_or_expires(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A second claim is refused as in flight (naming the first) until the first ends."""
    first = await _claim(store, user_id, ttl=60)
    second = await _claim(store, user_id, ttl=60)
    clock.advance(60)
    after_expiry = await _claim(store, user_id, ttl=60)

    assert first.claimed
    assert ("in_flight", first.claim_id, first.expires_at) == (
        second.reason,
        second.claim_id,
        second.expires_at,
    )
    assert first.expires_at == clock.now
    assert after_expiry.claimed
    assert 2_000 == after_expiry.month_total  # the expired claim's amount still counts


async def test_the_monthly_limit_refuses_a_claim_that_would_pass_it(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Claims count toward the UTC month; one that would pass the limit is refused, and the
    next month starts again from 0."""
    totals = []
    for _ in range(3):
        claim = await _claim(store, user_id)
        totals.append(claim.month_total)
        await store.finish_top_up(user_id, claim.claim_id, 1_000, payment_reference=None)
        # A failed payment gives its amount back: claim and pay for real.
        claim = await _claim(store, user_id)
        await store.finish_top_up(
            user_id, claim.claim_id, 1_000, payment_reference=f"pay-{len(totals)}"
        )
        await store.add_credits(user_id, -1_000, "adjustment")  # spent again
    refused = await _claim(store, user_id)
    small = await _claim(store, user_id, amount=1)
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    next_month = await _claim(store, user_id)

    assert [1_000, 2_000, 3_000] == totals
    assert ("monthly_limit", 3_000) == (refused.reason, refused.month_total)
    assert "monthly_limit" == small.reason
    assert (True, 1_000) == (next_month.claimed, next_month.month_total)
    await assert_invariants(store, user_id)


# -- finishing ----------------------------------------------------------------------------------


async def test_a_paid_top_up_grants_once_under_its_payment_reference(
    store: CreditStore, user_id: str
) -> None:
    """The grant is a purchase keyed by the payment reference: finishing twice grants once."""
    claim = await _claim(store, user_id)
    meta = CreditMetadata(reference_type="payment", reference_id="pi_1")

    done = await store.finish_top_up(
        user_id, claim.claim_id, 1_000, payment_reference="pi_1", metadata=meta
    )
    again = await store.finish_top_up(user_id, claim.claim_id, 1_000, payment_reference="pi_1")
    next_claim = await _claim(store, user_id, threshold=5_000)

    assert done.released
    assert done.grant is not None
    assert (1_000, "pi_1", False) == (
        done.grant.amount,
        done.grant.idempotency_key,
        done.grant.idempotent,
    )
    assert not again.released
    assert again.grant is not None
    assert again.grant.idempotent
    assert again.grant.transaction_id == done.grant.transaction_id
    assert 1_000 == (await store.get_balance(user_id)).lifetime_purchased
    rows = await all_rows(store, user_id)
    assert [("purchase", 1_000, "payment", "pi_1")] == [
        (r.type, r.amount, r.metadata.get("reference_type"), r.metadata.get("reference_id"))
        for r in rows
    ]
    assert next_claim.claimed  # the claim ended
    assert 2_000 == next_claim.month_total
    await assert_invariants(store, user_id)


async def test_a_failed_top_up_frees_its_amount_and_its_claim(
    store: CreditStore, user_id: str
) -> None:
    """Without a payment nothing is granted and the month no longer counts the amount."""
    claim = await _claim(store, user_id)

    failed = await store.finish_top_up(user_id, claim.claim_id, 1_000)
    again = await store.finish_top_up(user_id, claim.claim_id, 1_000)
    retry = await _claim(store, user_id)

    assert (True, None, 0) == (failed.released, failed.grant, failed.month_total)
    assert (False, 0) == (again.released, again.month_total)  # nothing given back twice
    assert (True, 1_000) == (retry.claimed, retry.month_total)
    assert 0 == (await store.get_balance(user_id)).balance


async def test_an_expired_claim_that_was_paid_is_still_granted(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A slow payment finishes after its claim expired and another was made: it is granted,
    and the newer claim stays in flight."""
    slow = await _claim(store, user_id, ttl=60)
    clock.advance(61)
    newer = await _claim(store, user_id, ttl=60)

    late = await store.finish_top_up(user_id, slow.claim_id, 1_000, payment_reference="pi_slow")
    blocked = await _claim(store, user_id, ttl=60, threshold=5_000)

    assert newer.claimed
    assert not late.released
    assert late.grant is not None
    assert late.grant.ok
    assert 1_000 == (await store.get_balance(user_id)).balance
    assert ("in_flight", newer.claim_id) == (blocked.reason, blocked.claim_id)


async def test_finishing_with_another_amount_than_claimed_is_refused(
    store: CreditStore, user_id: str
) -> None:
    """The amount must be the claim's; a refusal changes nothing."""
    claim = await _claim(store, user_id)

    with pytest.raises(InvalidArgumentError, match="amount"):
        await store.finish_top_up(user_id, claim.claim_id, 999, payment_reference="pi_x")

    assert 0 == (await store.get_balance(user_id)).balance
    assert "in_flight" == (await _claim(store, user_id)).reason


async def test_a_payment_reference_used_by_another_grant_is_a_conflict(
    store: CreditStore, user_id: str
) -> None:
    """The reference is the grant's key: one used for another request is refused, and the
    claim stays."""
    await store.add_credits(user_id, 5, "purchase", idempotency_key="pi_reused")
    claim = await _claim(store, user_id)

    done = await store.finish_top_up(user_id, claim.claim_id, 1_000, payment_reference="pi_reused")

    assert done.grant is not None
    assert ErrorCode.IDEMPOTENCY_CONFLICT is done.grant.error
    assert not done.released
    assert 5 == (await store.get_balance(user_id)).balance


@pytest.mark.parametrize(
    ("call", "name"),
    [
        ({"threshold": -1}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"amount": 0}, "amount"),
        ({"amount": True}, "amount"),
        ({"monthly_limit": -1}, "monthly_limit"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
    ],
)
async def test_bad_claim_arguments_are_refused_by_name(
    store: CreditStore, user_id: str, call: dict[str, object], name: str
) -> None:
    """A bad argument names itself and claims nothing."""
    with pytest.raises(InvalidArgumentError, match=name):
        await _claim(store, user_id, **call)

    assert (await _claim(store, user_id)).claimed


@pytest.mark.parametrize(
    ("args", "options", "name"),
    [
        (("", "c", 1), {}, "user_id"),
        (("u", "", 1), {}, "claim_id"),
        (("u", "c", 0), {}, "amount"),
        (("u", "c", 1), {"payment_reference": ""}, "payment_reference"),
        (("u", "c", 1), {"metadata": "x"}, "metadata"),
    ],
)
async def test_bad_finish_arguments_are_refused_by_name(
    store: CreditStore, args: tuple[str, str, int], options: dict[str, object], name: str
) -> None:
    """A bad argument names itself."""
    with pytest.raises(InvalidArgumentError, match=name):
        await store.finish_top_up(*args, **options)  # type: ignore[arg-type]


async def test_prune_removes_the_totals_of_closed_months(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A month's top-up total is a window counter: kept while the month is open."""
    claim = await _claim(store, user_id)
    await store.finish_top_up(user_id, claim.claim_id, 1_000, payment_reference="pi_1")
    kept = await store.prune(dry_run=True)
    clock.set(datetime(2026, 4, 2, tzinfo=UTC))
    closed = await store.prune(dry_run=True)

    assert closed.windows == kept.windows + 1
    assert (await store.prune()).windows == closed.windows
    assert 1_000 == (await _claim(store, user_id, threshold=10_000)).month_total


# -- across processes ---------------------------------------------------------------------------


async def test_eight_processes_crossing_at_once_make_one_claim(
    store: CreditStore, user_id: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Eight instances of the store claim the same crossing at once: exactly one wins, the
    others see it in flight."""
    async with peers(store, tmp_path, clock, 8) as fleet:
        results: list[TopUpClaimResult] = []

        async def claim(peer: CreditStore) -> None:
            results.append(await _claim(peer, user_id))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for peer in fleet:
                    tg.start_soon(claim, peer)

    winners = [r for r in results if r.claimed]
    assert 1 == len(winners)
    assert {"in_flight"} == {r.reason for r in results if not r.claimed}
    assert {winners[0].claim_id} == {r.claim_id for r in results}


async def test_the_monthly_limit_holds_under_a_storm(
    store: CreditStore, user_id: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Eight processes keep spending and topping up until each meets the limit: top-ups never
    pass the month's limit, and each claim is granted once."""
    await store.add_credits(user_id, 600, "purchase")
    granted: list[int] = []
    refused: list[str] = []

    async def worker(peer: CreditStore, n: int) -> None:
        for step in range(100):  # until this worker meets the limit
            hold = await peer.reserve_credits(user_id, 150, "chat", min_balance=0)
            if hold.ok:
                await peer.deduct_credits(user_id, hold.reservation_id, 150)
            claim = await _claim(peer, user_id, amount=400)
            if not claim.claimed:
                assert claim.reason is not None
                refused.append(claim.reason)
                if claim.reason == "monthly_limit":
                    return
                continue
            if step % 3 == 0:  # a payment that failed
                await peer.finish_top_up(user_id, claim.claim_id, 400)
                continue
            done = await peer.finish_top_up(
                user_id, claim.claim_id, 400, payment_reference=f"pay-{n}-{step}"
            )
            assert done.grant is not None
            assert done.grant.ok
            granted.append(done.grant.amount)

    async with peers(store, tmp_path, clock, 8) as fleet:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for n, peer in enumerate(fleet):
                    tg.start_soon(worker, peer, n)

    assert sum(granted) <= LIMIT
    assert 8 == refused.count("monthly_limit")
    purchases = [r for r in await all_rows(store, user_id) if r.type == "purchase"]
    assert sum(r.amount for r in purchases) == 600 + sum(granted)
    last = await _claim(store, user_id, amount=1, threshold=10**9)
    assert sum(granted) <= last.month_total <= LIMIT
    await assert_invariants(store, user_id)
