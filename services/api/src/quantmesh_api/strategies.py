"""The strategies the signals stage runs (its statuses on `strategies`) and their parameters;
the limits the risk stage applies (its statuses on `risk.limits`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from quantmesh_common.messages import RiskLimitsStatus, StrategyStatus

#: Strategies kept (the signals stage runs a handful; this only bounds a misbehaving topic).
MAX_STRATEGIES = 10_000

#: JSON Schema types and the Python values a JSON body parses to for each.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "string": (str,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


class StrategyBook:
    """The newest status of each strategy by event time, and requests waiting for an answer.

    A configuration request waits for the status that answers its command (the signals stage
    names the command in `last_command_id`): `expect` before publishing, then `wait`.
    """

    def __init__(self, limit: int = MAX_STRATEGIES) -> None:
        self.limit = limit
        self._statuses: dict[str, StrategyStatus] = {}
        self._waiting: dict[str, asyncio.Future[StrategyStatus]] = {}

    def apply(self, status: StrategyStatus) -> bool:
        """Fold `status` in (False if the strategy has a newer one); answer its command."""
        command_id = status.last_command_id
        if command_id is not None:
            waiter = self._waiting.pop(command_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
        current = self._statuses.get(status.strategy_id)
        if current is not None and status.ts_event < current.ts_event:
            return False
        self._statuses[status.strategy_id] = status
        if len(self._statuses) > self.limit:
            oldest = min(self._statuses.values(), key=lambda s: s.ts_event)
            del self._statuses[oldest.strategy_id]
        return True

    def get(self, strategy_id: str) -> StrategyStatus | None:
        """The strategy's latest status, None if it was never announced."""
        return self._statuses.get(strategy_id)

    def all(self) -> list[StrategyStatus]:
        """Every strategy's latest status, by strategy id."""
        return [s for _, s in sorted(self._statuses.items())]

    def expect(self, command_id: str) -> asyncio.Future[StrategyStatus]:
        """A future the status answering `command_id` resolves."""
        future: asyncio.Future[StrategyStatus] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        return future

    async def wait(
        self, command_id: str, future: asyncio.Future[StrategyStatus], timeout_s: float
    ) -> StrategyStatus | None:
        """The status answering `command_id`, None if none came within `timeout_s`."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(command_id, None)


def check_params(params: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """Why `params` cannot fit the strategy's parameter schema, None if their shape does.

    Only the shape: unknown names (when the model refuses extra ones) and plain JSON types.
    The strategy's own model, in the signals stage, has the last word (ranges, relations).
    """
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return None
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(params) - set(properties))
        if unknown:
            known = ", ".join(sorted(properties))
            return f"UNKNOWN_PARAMETER: {', '.join(unknown)} (known: {known})"
    for name, value in params.items():
        spec = properties.get(name)
        if not isinstance(spec, dict):
            continue
        expected = spec.get("type")
        allowed = _JSON_TYPES.get(expected) if isinstance(expected, str) else None
        if allowed is None:
            continue  # a union or a format: left to the stage
        if isinstance(value, bool) and expected != "boolean":
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            return f"INVALID_PARAMETER_TYPE: {name} must be {expected}, got {value!r}"
    return None


class RiskLimitsBook:
    """The newest limits status of each account (and of `*`, the default) by event time."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._statuses: dict[str, RiskLimitsStatus] = {}

    def apply(self, status: RiskLimitsStatus) -> bool:
        """Fold `status` in; False if the account has a newer one."""
        current = self._statuses.get(status.account_id)
        if current is not None and status.ts_event < current.ts_event:
            return False
        self._statuses[status.account_id] = status
        if len(self._statuses) > self.limit:
            oldest = min(self._statuses.values(), key=lambda s: s.ts_event)
            del self._statuses[oldest.account_id]
        return True

    def get(self, account_id: str) -> RiskLimitsStatus | None:
        """The status published for `account_id` itself (`*`: the default's)."""
        return self._statuses.get(account_id)

    def all(self) -> list[RiskLimitsStatus]:
        """Every status, the default's first, then by account id."""
        return [s for _, s in sorted(self._statuses.items(), key=lambda i: (i[0] != "*", i[0]))]
