"""Versioned SQL migrations (`V0001__name.sql` ...), applied in order by `quantmesh-migrate`."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from quantmesh_common.settings import redact_url

log = logging.getLogger(__name__)

MIGRATION_FILE = re.compile(r"^V(?P<version>\d{4,})__(?P<name>[a-z0-9_]+)\.sql$")
HISTORY_TABLE = "schema_migrations"
#: Namespace of the advisory-lock key; the key is per database schema (see `_lock_key`).
LOCK_NAMESPACE = "quantmesh-migrate"

_CREATE_HISTORY = f"""
CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    char(64)    NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL
)
"""


class MigrationError(RuntimeError):
    """The migrations cannot be applied safely (changed, missing or malformed files)."""


class MigrationLockTimeoutError(MigrationError):
    """Another migrator held the lock for longer than we were willing to wait."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """`V0001__core_tables` as in the file name."""
        return f"V{self.version:04d}__{self.name}"


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What a run did."""

    applied: list[str]
    already_applied: list[str]


def default_directory() -> Path:
    """Where the migrations live: $QM_MIGRATIONS_DIR, else shipped in the package, else the repo.

    In the workspace they are `libs/common/migrations/`; a wheel can carry them inside the
    package as `quantmesh_common/migrations/`.
    """
    env = os.environ.get("QM_MIGRATIONS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "migrations"
    if packaged.is_dir():
        return packaged
    return here.parents[3] / "migrations"


def load_migrations(directory: Path) -> list[Migration]:
    """Read and validate every migration file of `directory`, ordered by version."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = MIGRATION_FILE.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path.name}: migration files are named V<4+ digits>__<lower_snake_name>.sql"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"{path.name}: version {version} also used by {found[version].path.name}"
            )
        # Line endings are normalised so a checkout with CRLF conversion keeps the checksum.
        sql = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
        checksum = hashlib.sha256(sql.encode("utf-8")).hexdigest()
        found[version] = Migration(version, match["name"], path, sql, checksum)
    return [found[v] for v in sorted(found)]


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"{LOCK_NAMESPACE}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _acquire_lock(conn: psycopg.Connection[tuple[object, ...]], key: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row is not None and row[0] is True:
            return
        if time.monotonic() >= deadline:
            raise MigrationLockTimeoutError(
                f"another quantmesh-migrate holds the migration lock; gave up after {timeout_s}s"
            )
        if not announced:
            log.info("waiting for another quantmesh-migrate to finish")
            announced = True
        time.sleep(0.2)


def migrate(
    dsn: str,
    directory: Path | None = None,
    *,
    lock_timeout_s: float = 60.0,
    dry_run: bool = False,
) -> MigrationReport:
    """Apply the pending migrations of `directory` to the database at `dsn`, in version order.

    Each file runs in its own transaction together with its row in `schema_migrations`
    (version, name, sha256 checksum, applied_at). A session advisory lock, keyed by the target
    schema, serialises concurrent migrators: the second waits, then finds nothing to do.
    Refuses to run (MigrationError, nothing applied) if an applied file's checksum changed, an
    applied version has no file any more, or a pending file is older than the newest applied
    one. Rerunning is a no-op. `dry_run` reports what would be applied without applying it.
    """
    migrations = load_migrations(directory or default_directory())
    applied: list[str] = []
    already: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        schema_row = conn.execute("SELECT current_schema()").fetchone()
        if schema_row is None or schema_row[0] is None:
            raise MigrationError("the connection has no current schema (check search_path)")
        schema = str(schema_row[0])
        key = _lock_key(schema)
        _acquire_lock(conn, key, lock_timeout_s)
        try:
            conn.execute(_CREATE_HISTORY)
            rows = conn.execute(
                f"SELECT version, name, checksum FROM {HISTORY_TABLE} ORDER BY version"
            ).fetchall()
            history = {int(v): (str(n), str(c)) for v, n, c in rows}
            pending = _plan(migrations, history)
            already = [m.label for m in migrations if m.version in history]
            for migration in pending:
                if dry_run:
                    applied.append(migration.label)
                    continue
                started = time.monotonic()
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode("utf-8"))
                        duration_ms = int((time.monotonic() - started) * 1000)
                        conn.execute(
                            f"INSERT INTO {HISTORY_TABLE} (version, name, checksum, duration_ms)"
                            " VALUES (%s, %s, %s, %s)",
                            (migration.version, migration.name, migration.checksum, duration_ms),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"{migration.path.name} failed and was rolled back: {exc}"
                    ) from exc
                log.info("applied %s in %d ms", migration.label, duration_ms)
                applied.append(migration.label)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    return MigrationReport(applied=applied, already_applied=already)


def apply_migrations(
    dsn: str, directory: Path | None = None, *, lock_timeout_s: float = 60.0
) -> MigrationReport:
    """Apply the pending migrations, as `quantmesh-migrate` does (for test set-up and tools)."""
    return migrate(dsn, directory, lock_timeout_s=lock_timeout_s)


def _plan(migrations: list[Migration], history: dict[int, tuple[str, str]]) -> list[Migration]:
    by_version = {m.version: m for m in migrations}
    problems: list[str] = []
    for version, (name, checksum) in sorted(history.items()):
        migration = by_version.get(version)
        if migration is None:
            problems.append(f"V{version:04d}__{name} was applied but its file is missing")
        elif migration.checksum != checksum:
            problems.append(
                f"{migration.path.name} was changed after it was applied "
                f"(checksum {checksum[:12]}… in the database, {migration.checksum[:12]}… on disk); "
                "write a new migration instead of editing an applied one"
            )
    newest = max(history, default=0)
    pending = [m for m in migrations if m.version not in history]
    for migration in pending:
        if migration.version < newest:
            problems.append(
                f"{migration.path.name} is older than the newest applied migration "
                f"V{newest:04d}; give it a higher version"
            )
    if problems:
        raise MigrationError("; ".join(problems))
    return pending


def main(argv: list[str] | None = None) -> int:
    """`quantmesh-migrate [--dsn DSN] [--dir DIR] [--dry-run]`: apply pending SQL migrations."""
    parser = argparse.ArgumentParser(
        prog="quantmesh-migrate", description="Apply quantmesh's versioned SQL migrations."
    )
    parser.add_argument("--dsn", default=None, help="PostgreSQL URL (default: $QM_DATABASE_URL)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"migrations directory (default: {default_directory()})",
    )
    parser.add_argument("--lock-timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--dry-run", action="store_true", help="list pending migrations only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="quantmesh-migrate: %(message)s", stream=sys.stderr
    )

    dsn = args.dsn or os.environ.get("QM_DATABASE_URL")
    if not dsn:
        sys.stderr.write("quantmesh-migrate: QM_DATABASE_URL is not set and --dsn was not given\n")
        return 2
    try:
        report = migrate(dsn, args.dir, lock_timeout_s=args.lock_timeout, dry_run=args.dry_run)
    except MigrationError as exc:
        sys.stderr.write(f"quantmesh-migrate: refused: {exc}\n")
        return 1
    except psycopg.Error as exc:
        sys.stderr.write(f"quantmesh-migrate: failed on {redact_url(dsn)}: {exc}\n")
        return 1
    verb = "would apply" if args.dry_run else "applied"
    sys.stdout.write(
        f"quantmesh-migrate: {verb} {len(report.applied)}"
        f" ({', '.join(report.applied) or 'none'}), {len(report.already_applied)} already applied\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
