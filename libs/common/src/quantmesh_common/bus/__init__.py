"""The bus: one protocol; Kafka for services, in-memory for one process."""

from quantmesh_common.bus.base import (
    AssignHook,
    BatchHook,
    Bus,
    Emit,
    Handler,
    Headers,
    RawHandler,
    RawMessage,
    RevokeHook,
    Subscription,
    SubscriptionState,
    partition_of,
)

__all__ = [
    "AssignHook",
    "BatchHook",
    "Bus",
    "Emit",
    "Handler",
    "Headers",
    "RawHandler",
    "RawMessage",
    "RevokeHook",
    "Subscription",
    "SubscriptionState",
    "partition_of",
]
