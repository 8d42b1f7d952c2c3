"""
Pricing: turn what an LLM call used into credits.

Build a `PricingEngine` once from a pricing config (`PricingEngine.from_dict`,
`from_config` or `from_yaml`), describe each call's usage with `UsageMetrics` (and
`ToolCall`), and `PricingEngine.calculate` returns a `CostBreakdown` whose ``credits`` is
what to charge. `validate_pricing_config` refuses a config that cannot be priced.
"""

from __future__ import annotations

from ducto.pricing.engine import CostBreakdown, PricingEngine, validate_pricing_config
from ducto.pricing.metrics import ToolCall, UsageMetrics

__all__ = [
    "CostBreakdown",
    "PricingEngine",
    "ToolCall",
    "UsageMetrics",
    "validate_pricing_config",
]
