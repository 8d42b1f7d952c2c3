"""
Auto top-up with Stripe: when a user's credits run low, charge their saved card off-session.

The manager claims the top-up in the store (one per user at a time, however many processes
see the balance cross the threshold, and never more than the monthly limit), then calls
`charge_card`, which creates and confirms an off-session PaymentIntent with the claim id as
Stripe's idempotency key, so a retried attempt never pays twice. The credits are granted
under the PaymentIntent's id. The request that spent the credits never waits for Stripe.

Run it against Stripe's test mode (no real money moves):

    pip install stripe
    STRIPE_API_KEY=sk_test_... \\
    STRIPE_CUSTOMER=cus_... STRIPE_PAYMENT_METHOD=pm_... \\
    python examples/stripe_top_up.py

The customer needs a card saved for off-session use (a SetupIntent with ``usage=off_session``
does that in a real application, when the user turns auto top-up on). STRIPE_API_BASE
points the client at another endpoint (the test suite runs this script against a local fake
of Stripe's API).
"""

from __future__ import annotations

import os
import sys

import anyio
import stripe

from ducto import (
    AutoTopUp,
    CreditEvent,
    CreditEventType,
    CreditManager,
    InsufficientCreditsError,
    MemoryStore,
    UsageMetrics,
)

CREDITS_PER_CENT = 10
"""What a credit costs the user: 10 credits a cent, so 5,000 credits are $5.00."""

PRICING = {
    "models": {"_default": "input_tokens * 0.002 + output_tokens * 0.008"},
    "min_balance": 0,
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=100_000, output_tokens=100_000)
"""One agent run: 1,000 credits."""


def saved_card(user_id: str) -> tuple[str, str]:
    """The user's Stripe customer and saved card (from the application's own database)."""
    return os.environ.get("STRIPE_CUSTOMER", "cus_test"), os.environ.get(
        "STRIPE_PAYMENT_METHOD", "pm_card_visa"
    )


async def charge_card(user_id: str, amount: int, claim_id: str) -> str:
    """
    Take the payment for `amount` credits; return the PaymentIntent id.

    ducto calls this with the same claim id on every retry of one top-up: as the
    idempotency key it makes Stripe answer a retry with the first attempt's PaymentIntent.
    Whatever this raises (a `stripe.CardError` for a declined card, say) is retried, then
    reported as a ``top_up_failed`` event.
    """
    if amount % CREDITS_PER_CENT:
        raise ValueError(f"{amount} credits is not a whole number of cents")
    customer, card = saved_card(user_id)
    intent = await stripe.PaymentIntent.create_async(
        amount=amount // CREDITS_PER_CENT,
        currency="usd",
        customer=customer,
        payment_method=card,
        off_session=True,
        confirm=True,
        description=f"{amount} credits (auto top-up)",
        metadata={"user_id": user_id, "credits": str(amount), "claim_id": claim_id},
        idempotency_key=claim_id,
    )
    if intent.status != "succeeded":
        raise RuntimeError(f"payment {intent.id} is {intent.status}")
    return intent.id


def report(event: CreditEvent) -> None:
    """Print what the top-ups did (an application would notify the user)."""
    if event.type == CreditEventType.TOP_UP:
        print(
            f"top-up: +{event.amount} credits for {event.user_id} (payment"
            f" {event.metadata['payment_reference']}, {event.metadata['month_total']} this month)"
        )
    elif event.type == CreditEventType.TOP_UP_FAILED:
        print(f"top-up failed for {event.user_id}: {event.error} {event.metadata['message']}")


async def main() -> None:
    api_key = os.environ.get("STRIPE_API_KEY")
    if not api_key:
        sys.exit("set STRIPE_API_KEY to a test-mode key (sk_test_...); see the docstring")
    stripe.api_key = api_key
    stripe.api_base = os.environ.get("STRIPE_API_BASE", stripe.DEFAULT_API_BASE)

    top_up = AutoTopUp(
        threshold=1_000,  # top up when fewer than 1,000 credits are left
        amount=5_000,  # $5.00
        monthly_limit=20_000,  # at most $20.00 of top-ups per user per month
        charge=charge_card,
        retries=1,
        backoff=0.5,
    )
    async with CreditManager(MemoryStore(), auto_top_up=top_up) as manager:
        await manager.setup()
        await manager.publish_pricing(PRICING)
        manager.events.on(CreditEventType.TOP_UP, report)
        manager.events.on(CreditEventType.TOP_UP_FAILED, report)
        await manager.add_credits("alice", 6_000, "signup_bonus")

        for run in range(1, 41):
            try:
                await manager.deduct("alice", CALL)
            except InsufficientCreditsError:
                print(f"run {run} refused: alice is out of credits")
                break
            # Only so that the printout reads in order: requests never wait for a top-up.
            while manager.pending_top_ups:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        balance = await manager.get_balance("alice")
        print(f"alice: {balance.available} credits left after {run - 1} runs")


if __name__ == "__main__":
    anyio.run(main)
