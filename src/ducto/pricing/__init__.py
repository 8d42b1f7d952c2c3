"""
Pricing: turn what an LLM call used into credits.

Build a `PricingEngine` once from a pricing config (`PricingEngine.from_dict`,
`from_config` or `from_yaml`), describe each call's usage with `UsageMetrics` (and
`ToolCall`), and `PricingEngine.calculate` returns a `CostBreakdown` whose ``credits`` is
what to charge. `validate_pricing_config` refuses a config that cannot be priced;
`evaluate_expression` and `validate_expression` try single expressions.

`PricingConfig` is ducto 1.x's name of the config model, `PricingConfigData`.
"""

from __future__ import annotations

from ducto.interface.models import PricingConfigData
from ducto.pricing.engine import (
    CostBreakdown,
    PricingEngine,
    evaluate_expression,
    validate_expression,
    validate_pricing_config,
)
from ducto.pricing.metrics import ToolCall, UsageMetrics

PricingConfig = PricingConfigData
"""ducto 1.x's name of `PricingConfigData`, the pricing config model."""

__all__ = [
    "CostBreakdown",
    "PricingConfig",
    "PricingConfigData",
    "PricingEngine",
    "ToolCall",
    "UsageMetrics",
    "evaluate_expression",
    "validate_expression",
    "validate_pricing_config",
]
