"""Which partitions a new assignment brings whose state this instance does not hold exactly.

When partitions move between running instances of a consumer group, the instance given them
must hold their instruments' state exactly as of the group's committed offsets, where it
resumes. Per partition, one of three things is true at an assignment (`Holding.classify`):

- the engine holds it exactly up to a known offset and never handled it live since (the
  start-up replay or snapshot left it there): the messages from there to the committed
  offset are replayed into the live engine (a catch-up, usually short);
- this instance handled it live before and nobody else committed anything of it since: the
  committed offset is where this instance's own tenure began, or the last message before
  it is the last one this instance handled of that message's instrument (or account): kept;
- otherwise it moved here from another instance: the strategies it carries are rebuilt by
  replaying the input (see SignalsService).

The live handlers note the event id of the last message of each instrument (bars, ticks) and
account (fills) they handled, which is what the second test compares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, ExecutionReport, Tick

#: (topic, partition).
TopicPartitionId = tuple[str, int]

#: What the last-handled ids are keyed by: the message type and its instrument or account.
SeenKey = tuple[type, str]


def seen_key(payload: object) -> SeenKey | None:
    """The key under which the last handled message like `payload` is remembered."""
    if isinstance(payload, Bar | Tick):
        return (type(payload), payload.instrument_id)
    if isinstance(payload, ExecutionReport):
        return (ExecutionReport, payload.account_id)
    return None


@dataclass
class Plan:
    """What an assignment needs: catch-ups (partition -> (from, to)) and moved partitions."""

    catch_up: dict[TopicPartitionId, tuple[int, int]] = field(default_factory=dict)
    moved: set[TopicPartitionId] = field(default_factory=set)
    kept: set[TopicPartitionId] = field(default_factory=set)


@dataclass
class Holding:
    """What one consumer group's partitions are in this instance's engine.

    `exact`: partitions the engine holds exactly up to an offset and has not handled live
    since (`default` for partitions not listed; None: unknown). `tenure`: partitions handled
    live, with the committed offset at which this instance's last tenure of them began.
    `last_seen`: the event id of the last message handled live per `seen_key`.
    """

    group: str
    topics: list[str]
    exact: dict[TopicPartitionId, int] = field(default_factory=dict)
    default: int | None = 0
    tenure: dict[TopicPartitionId, int] = field(default_factory=dict)
    last_seen: dict[SeenKey, str] = field(default_factory=dict)
    #: Set once the first assignment was handed over (the start-up replay covered up to it).
    assigned_once: bool = False

    def needs_last_messages(
        self, added: Collection[TopicPartitionId], committed: Mapping[TopicPartitionId, int]
    ) -> dict[TopicPartitionId, int]:
        """The partitions whose last message before the committed offset decides (kept or
        moved), with that offset."""
        out: dict[TopicPartitionId, int] = {}
        for tp in added:
            end = committed.get(tp, 0)
            if tp in self.tenure and end != self.tenure[tp] and end > 0:
                out[tp] = end
        return out

    def classify(
        self,
        added: Collection[TopicPartitionId],
        committed: Mapping[TopicPartitionId, int],
        last: Mapping[TopicPartitionId, Envelope[Any]],
    ) -> Plan:
        """Sort newly assigned partitions into catch-ups, kept and moved (module docstring);
        `committed`: the group's offsets (absent: none), `last`: the last message before it."""
        plan = Plan()
        for tp in added:
            end = committed.get(tp, 0)
            if tp in self.tenure:
                if end == self.tenure[tp] or self._was_last_handled(last.get(tp)):
                    plan.kept.add(tp)
                else:
                    plan.moved.add(tp)
                continue
            start = self.exact.get(tp, self.default)
            if start is None or end < start:
                plan.moved.add(tp)
            elif end > start:
                plan.catch_up[tp] = (start, end)
            else:
                plan.kept.add(tp)
        return plan

    def _was_last_handled(self, envelope: Envelope[Any] | None) -> bool:
        if envelope is None:
            return False
        key = seen_key(envelope.payload)
        return key is not None and self.last_seen.get(key) == envelope.event_id

    def assigned(
        self,
        added: Collection[TopicPartitionId],
        committed: Mapping[TopicPartitionId, int],
        *,
        rebuilt: bool,
        owned: Collection[TopicPartitionId],
    ) -> None:
        """Note that `added` is handled live from its committed offsets on. After a rebuild
        (`rebuilt`) the engine's state of partitions outside `owned` is no longer known."""
        self.assigned_once = True
        for tp in added:
            self.tenure[tp] = committed.get(tp, 0)
            self.exact.pop(tp, None)
        if rebuilt:
            self.exact.clear()
            self.default = None
            self.tenure = {tp: off for tp, off in self.tenure.items() if tp in owned}
