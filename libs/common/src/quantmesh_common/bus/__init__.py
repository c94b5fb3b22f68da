"""The bus: one protocol; Kafka for services, in-memory for one process."""

from quantmesh_common.bus.base import (
    Bus,
    Emit,
    Handler,
    Headers,
    Subscription,
    SubscriptionState,
)

__all__ = ["Bus", "Emit", "Handler", "Headers", "Subscription", "SubscriptionState"]
