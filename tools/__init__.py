"""The MCP face of the broker: one module per tool, all through `tools.registry`."""

from tools import buy_quota, call_api, check_balance, list_market, request_token
from tools.registry import ToolSpec

ALL_TOOLS: tuple[ToolSpec, ...] = (
    list_market.SPEC, check_balance.SPEC, buy_quota.SPEC, request_token.SPEC, call_api.SPEC
)

__all__ = ["ALL_TOOLS", "ToolSpec"]
