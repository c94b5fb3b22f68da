"""Engine snapshots taken at known input offsets, so a restart replays only the tail.

A snapshot is the whole SignalsEngine (indicators, targets, order-id counters, positions,
switches, redelivery guards) together with, for each consumer group of the instance, the
offset up to which the engine had consumed each partition. Restoring it and replaying the
input from those offsets to the groups' committed offsets leaves the engine where replaying
everything from the beginning would: start-up reads only what was consumed since the snapshot.

Snapshots are taken where the offsets are known exactly, never from the live engine (the bus
does not tell a handler its offsets): at start-up, right after the replay, and periodically
by a shadow engine that replays the tail since the previous snapshot on a worker thread.

The file is a pickle, written and read only by this stage in its own directory
(QM_SIGNALS_SNAPSHOT_DIR): never point it at files from anywhere else. A snapshot of another
strategy configuration, of another format version, or one that cannot be read is ignored
(logged), and the state is rebuilt by the full replay instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quantmesh_signals.engine import SignalsEngine, StrategySpec

log = logging.getLogger(__name__)

#: Format version of the snapshot files; a file of another version is ignored.
#: 2: strategies carry their configuration state (reconfigured params, last error).
FORMAT = 2

#: Offsets by consumer group: (topic, partition) -> the next offset to read.
Offsets = dict[str, dict[tuple[str, int], int]]


def config_digest(specs: Sequence[StrategySpec], route_joint: bool) -> str:
    """A digest of what the engine is built from: a snapshot only fits the same configuration."""
    text = json.dumps(
        {"specs": [s.model_dump(mode="json") for s in specs], "route_joint": route_joint},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Snapshot:
    """The engine's state and the offsets it is exact at."""

    config: str
    engine: SignalsEngine
    offsets: Offsets = field(default_factory=dict)
    #: Wall-clock time it was taken (UTC ns), for the logs.
    taken_ns: int = 0

    def copy(self) -> Snapshot:
        """A deep copy (the engine included), for a shadow that must not share state."""
        copied: Snapshot = pickle.loads(pickle.dumps(self))
        return copied


class SnapshotStore:
    """One instance's snapshot file, `<directory>/<name>.snapshot`, replaced atomically."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.path = directory / f"{name}.snapshot"

    def load(self, config: str) -> Snapshot | None:
        """The stored snapshot of configuration `config`; None if there is no usable one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("snapshot %s unreadable (%s): replaying everything", self.path, exc)
            return None
        try:
            # Written by this stage only (see the module docstring).
            loaded = pickle.loads(data)
        except Exception as exc:
            log.warning("snapshot %s is corrupt (%s): replaying everything", self.path, exc)
            return None
        if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
            log.warning("snapshot %s has another format: replaying everything", self.path)
            return None
        snapshot = loaded.get("snapshot")
        if not isinstance(snapshot, Snapshot) or not isinstance(snapshot.engine, SignalsEngine):
            log.warning("snapshot %s holds no engine: replaying everything", self.path)
            return None
        if snapshot.config != config:
            log.warning(
                "snapshot %s is of another strategy configuration: replaying everything",
                self.path,
            )
            return None
        return snapshot

    def save(self, snapshot: Snapshot) -> None:
        """Write the snapshot: to a temporary file first, then renamed over the old one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = pickle.dumps({"format": FORMAT, "snapshot": snapshot})
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
