"""The README's pricing and manager example, runnable as it stands."""

from __future__ import annotations

import anyio

from ducto import CreditManager, MemoryStore, ToolCall, UsageMetrics

PRICING = {
    "models": {
        "gpt-4o": "input_tokens * 0.025 + output_tokens * 0.1",
        "_default": "input_tokens * 0.01 + output_tokens * 0.03",
    },
    "tools": {"_default": "tool_calls * 0", "web_search": "tool_calls * 25"},
    "cache": {"read": "cache_read_tokens * 0.0125"},  # cached prompt tokens, half price
    "plans": {"pro": {"id": "pro", "name": "Pro", "free_allowance": 500}},
    "rounding": "ceil",
}


async def main() -> None:
    async with CreditManager(MemoryStore()) as manager:
        await manager.store.setup()
        await manager.publish_pricing(PRICING, label="launch prices")
        await manager.add_credits("alice", 10_000, "purchase")
        await manager.set_user_plan("alice", "pro")

        # A call that already happened: priced, held and settled in one step.
        usage = UsageMetrics(
            model="gpt-4o",
            input_tokens=1200,
            output_tokens=300,
            tool_calls=[ToolCall(name="web_search")],
        )
        charged = await manager.deduct("alice", usage, idempotency_key="req-1")
        print("charged", charged.charged, "allowance used", charged.allowance_consumed)

        # A streamed call: hold an estimate, record usage as chunks arrive, settle once.
        estimate = UsageMetrics(model="gpt-4o", input_tokens=800, output_tokens=1000)
        async with manager.hold("alice", estimate, idempotency_key="req-2") as hold:
            hold.record(UsageMetrics(model="gpt-4o", input_tokens=800))  # the prompt, billed
            for _ in range(4):  # chunks of a streamed answer
                hold.record(UsageMetrics(model="gpt-4o", output_tokens=120))
            settled = await hold.settle()
        print("streamed call cost", settled.charged + settled.allowance_consumed)


anyio.run(main)
