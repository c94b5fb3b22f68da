"""Risk's recent decisions by account and intent id: a redelivered intent gets its decision
again."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from quantmesh_common.messages import OrderIntent, RiskDecision, Side

log = logging.getLogger(__name__)

#: Decisions remembered in memory and loaded from the store (the newest; trimmed past twice
#: this). A redelivery reaches back only to the last committed offset (committed every
#: second or so after the output is acknowledged): far fewer decisions than this.
RECENT_DECISIONS = 20_000


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """A decision as the store keeps it: everything but the intent, which its redelivered
    message carries."""

    client_order_id: str
    decision_id: str
    approved: bool
    reason: str | None
    details: dict[str, str] = field(default_factory=dict)
    adjusted_quantity: Decimal | None = None
    side: Side | None = None
    ts_event: int = 0

    def decision(self, intent: OrderIntent) -> RiskDecision:
        """Return the decision on `intent`, as it was published."""
        return RiskDecision(
            decision_id=self.decision_id,
            account_id=intent.account_id,
            intent=intent,
            approved=self.approved,
            reason=self.reason,
            details=self.details,
            adjusted_quantity=self.adjusted_quantity,
            side=self.side,
            ts_event=self.ts_event,
        )


def stored_row(decision: RiskDecision) -> dict[str, Any]:
    """Return a decision's row of `risk_decisions` as JSON values (decimals as exact text)."""
    intent = decision.intent
    adjusted = decision.adjusted_quantity
    side = decision.side
    return {
        "intent_id": intent.intent_id,
        "account_id": decision.account_id,
        "client_order_id": intent.client_order_id,
        "decision_id": decision.decision_id,
        "approved": decision.approved,
        "reason": decision.reason,
        "details": decision.details,
        "adjusted_quantity": None if adjusted is None else format(adjusted, "f"),
        "side": None if side is None else side.value,
        "ts_event": decision.ts_event,
    }


class DecisionLog:
    """The newest decisions by (account id, intent id), and those the store does not hold yet."""

    __slots__ = ("_decisions", "keep", "pending")

    def __init__(self, keep: int = RECENT_DECISIONS) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._decisions: dict[tuple[str, str], RiskDecision | StoredDecision] = {}
        #: Decided since the last `take_pending`: what the batch hook stores.
        self.pending: list[RiskDecision] = []

    def __len__(self) -> int:
        return len(self._decisions)

    def __contains__(self, key: object) -> bool:
        return key in self._decisions

    def get(self, intent: OrderIntent) -> RiskDecision | None:
        """Return the decision made on `intent` (by its account and intent id), or None if
        none is remembered or the id was decided for another client order id (not a
        redelivery)."""
        found = self._decisions.get((intent.account_id, intent.intent_id))
        if found is None:
            return None
        if isinstance(found, StoredDecision):
            known = found.client_order_id
        else:
            known = found.intent.client_order_id
        if known != intent.client_order_id:
            log.warning(
                "intent %s reuses the intent id of client order %s: decided anew",
                intent.intent_id,
                known,
                extra={"client_order_id": intent.client_order_id},
            )
            return None
        return found.decision(intent) if isinstance(found, StoredDecision) else found

    def add(self, decision: RiskDecision, *, store: bool) -> None:
        """Remember a new decision; `store`: the batch hook writes it (see `take_pending`)."""
        self._decisions[(decision.account_id, decision.intent.intent_id)] = decision
        if store:
            self.pending.append(decision)
        self._trim()

    def load(self, rows: list[tuple[tuple[str, str], StoredDecision]]) -> int:
        """Remember stored decisions ((account id, intent id), decision), oldest first,
        without replacing one known already; returns how many were new."""
        known = self._decisions
        added = 0
        for key, stored in rows:
            if key not in known:
                known[key] = stored
                added += 1
        self._trim()
        return added

    def take_pending(self) -> list[RiskDecision]:
        """Return the decisions not stored yet and forget that they are pending."""
        pending, self.pending = self.pending, []
        return pending

    def _trim(self) -> None:
        decisions = self._decisions
        if len(decisions) > 2 * self.keep:
            for key in list(itertools.islice(decisions, len(decisions) - self.keep)):
                del decisions[key]
