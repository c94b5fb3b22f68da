"""Migrations on a real PostgreSQL: order, idempotence, tamper detection, locking, constraints."""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from quantmesh_common.storage.migrate import (
    MigrationError,
    MigrationLockTimeoutError,
    _lock_key,
    default_directory,
    load_migrations,
    main,
    migrate,
)

pytestmark = pytest.mark.integration

CORE_TABLES = {
    "accounts",
    "instruments",
    "ticks",
    "bars",
    "orders",
    "order_events",
    "fills",
    "positions",
    "equity_snapshots",
    "schema_migrations",
}


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
    return {str(r[0]) for r in rows}


def _history(dsn: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
        ).fetchall()
    return [(int(v), str(n), str(c).strip()) for v, n, c in rows]


def test_migrate_when_schema_empty_applies_all_in_order_and_records_them(
    schema_dsn: str, migrations_copy: Path
) -> None:
    report = migrate(schema_dsn, migrations_copy)

    files = load_migrations(migrations_copy)
    assert report.applied == [m.label for m in files]
    assert report.already_applied == []
    assert _history(schema_dsn) == [(m.version, m.name, m.checksum) for m in files]
    assert _tables(schema_dsn) >= CORE_TABLES


def test_migrate_when_run_twice_second_run_applies_nothing(
    schema_dsn: str, migrations_copy: Path
) -> None:
    migrate(schema_dsn, migrations_copy)
    history = _history(schema_dsn)

    again = migrate(schema_dsn, migrations_copy)

    assert again.applied == []
    assert len(again.already_applied) == len(history)
    assert _history(schema_dsn) == history


def test_main_when_dry_run_lists_pending_and_applies_nothing(
    schema_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = load_migrations(default_directory())

    code = main(["--dsn", schema_dsn, "--dry-run"])

    out = capsys.readouterr().out
    assert code == 0
    labels = ", ".join(m.label for m in shipped)
    assert f"would apply {len(shipped)} ({labels})" in out
    assert _tables(schema_dsn) == {"schema_migrations"}


def test_migrate_when_new_file_added_applies_only_it(
    schema_dsn: str, migrations_copy: Path
) -> None:
    migrate(schema_dsn, migrations_copy)
    (migrations_copy / "V9001__add_notes.sql").write_text(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);\n"
    )

    report = migrate(schema_dsn, migrations_copy)

    assert report.applied == ["V9001__add_notes"]
    assert "notes" in _tables(schema_dsn)


def test_migrate_when_applied_file_changed_refuses_naming_it(
    schema_dsn: str, migrations_copy: Path
) -> None:
    migrate(schema_dsn, migrations_copy)
    target = migrations_copy / "V0001__core_tables.sql"
    target.write_text(target.read_text() + "\n-- an innocent-looking edit\n")
    (migrations_copy / "V9001__later.sql").write_text("CREATE TABLE later (id int);\n")

    with pytest.raises(MigrationError, match=re.escape("V0001__core_tables.sql was changed")):
        migrate(schema_dsn, migrations_copy)

    assert "later" not in _tables(schema_dsn)  # nothing is applied once tampering is found


def test_main_when_applied_file_changed_exits_1_with_reason(
    schema_dsn: str, migrations_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dsn", schema_dsn, "--dir", str(migrations_copy)]) == 0
    target = migrations_copy / "V0002__timescale_hypertables.sql"
    target.write_text(target.read_text().replace("1 day", "one day"))

    code = main(["--dsn", schema_dsn, "--dir", str(migrations_copy)])

    err = capsys.readouterr().err
    assert code == 1
    assert "refused" in err
    assert "V0002__timescale_hypertables.sql was changed" in err


def test_migrate_when_applied_file_deleted_refuses(schema_dsn: str, migrations_copy: Path) -> None:
    (migrations_copy / "V9001__temp.sql").write_text("CREATE TABLE temp_t (id int);\n")
    migrate(schema_dsn, migrations_copy)
    (migrations_copy / "V9001__temp.sql").unlink()

    with pytest.raises(
        MigrationError, match=re.escape("V9001__temp was applied but its file is missing")
    ):
        migrate(schema_dsn, migrations_copy)


def test_migrate_when_pending_file_older_than_applied_refuses(
    schema_dsn: str, migrations_copy: Path
) -> None:
    (migrations_copy / "V9002__newer.sql").write_text("CREATE TABLE newer (id int);\n")
    migrate(schema_dsn, migrations_copy)
    (migrations_copy / "V9001__older.sql").write_text("CREATE TABLE older (id int);\n")

    with pytest.raises(MigrationError, match=re.escape("V9001__older.sql is older than")):
        migrate(schema_dsn, migrations_copy)


def test_migrate_when_a_file_fails_rolls_it_back_and_keeps_earlier_ones(
    schema_dsn: str, migrations_copy: Path
) -> None:
    (migrations_copy / "V9001__broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n"
    )

    with pytest.raises(
        MigrationError, match=re.escape("V9001__broken.sql failed and was rolled back")
    ):
        migrate(schema_dsn, migrations_copy)

    tables = _tables(schema_dsn)
    assert "half_done" not in tables
    assert "ticks" in tables
    shipped = [m.version for m in load_migrations(migrations_copy) if m.version != 9001]
    assert [v for v, _, _ in _history(schema_dsn)] == shipped


def test_migrate_when_lock_held_elsewhere_times_out(schema_dsn: str, migrations_copy: Path) -> None:
    with psycopg.connect(schema_dsn, autocommit=True) as holder:
        schema = holder.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        holder.execute("SELECT pg_advisory_lock(%s)", (_lock_key(str(schema[0])),))

        with pytest.raises(MigrationLockTimeoutError):
            migrate(schema_dsn, migrations_copy, lock_timeout_s=0.5)

    assert "ticks" not in _tables(schema_dsn)


def test_migrate_when_two_run_at_once_applies_each_file_once(
    schema_dsn: str, migrations_copy: Path
) -> None:
    reports: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            reports.append(migrate(schema_dsn, migrations_copy).applied)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert sorted(len(applied) for applied in reports) == [0, len(load_migrations(migrations_copy))]
    assert len(_history(schema_dsn)) == len(load_migrations(migrations_copy))


def test_migrate_on_plain_postgres_keeps_plain_tables(schema_dsn: str) -> None:
    migrate(schema_dsn)

    with psycopg.connect(schema_dsn) as conn:
        has_timescale = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        ).fetchone()
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = 'ticks'::regclass").fetchone()
    assert has_timescale is not None
    assert kind is not None
    if has_timescale[0]:
        pytest.skip("this server has TimescaleDB: the plain-PostgreSQL path does not apply")
    assert kind[0] == "r"


# -- the schema's constraints --------------------------------------------------------------

_TICK = (
    "INSERT INTO ticks (venue, instrument_id, ts_event, ts_init, price, size, aggressor_side,"
    " trade_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


def test_ticks_when_same_trade_inserted_twice_rejects_the_duplicate(schema_dsn: str) -> None:
    migrate(schema_dsn)
    row = (
        "SIM",
        "BTC-USDT.SIM",
        1_700_000_000_000_000_001,
        1_700_000_000_000_000_009,
        Decimal("50000.10"),
        Decimal("0.5"),
        "BUYER",
        "t-1",
    )

    with psycopg.connect(schema_dsn) as conn:
        conn.execute(_TICK, row)
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation, match="ticks_dedup"):
            conn.execute(_TICK, row)
        conn.rollback()
        conn.execute(_TICK, (*row[:7], "t-2"))  # another trade at the same instant is fine
        conn.commit()
        count = conn.execute("SELECT count(*) FROM ticks").fetchone()

    assert count == (2,)


def test_fills_when_same_account_trade_reapplied_rejects_the_duplicate(schema_dsn: str) -> None:
    migrate(schema_dsn)
    insert = (
        "INSERT INTO fills (report_id, account_id, venue, trade_id, client_order_id,"
        " instrument_id, side, quantity, price, ts_event, ts_init)"
        " VALUES (%s, 'acc-1', 'SIM', 'T-77', 'O-1', 'BTC-USDT.SIM', 'BUY', 1, 100, 5, 6)"
    )

    with psycopg.connect(schema_dsn) as conn:
        conn.execute(insert, ("r-1",))
        conn.commit()
        # A redelivered report (new report id, same venue trade) must not count twice.
        with pytest.raises(psycopg.errors.UniqueViolation, match="fills_dedup"):
            conn.execute(insert, ("r-2",))


def test_money_columns_when_round_tripped_keep_every_decimal_digit(schema_dsn: str) -> None:
    migrate(schema_dsn)
    price = Decimal("0.000000012345678901234567890123")
    ts = 1_700_000_000_123_456_789

    with psycopg.connect(schema_dsn) as conn:
        conn.execute(
            "INSERT INTO bars (instrument_id, interval, ts_open, ts_close, open, high, low,"
            " close, volume) VALUES ('X-USDT.SIM', '1m', %s, %s, %s, %s, %s, %s, 0)",
            (ts, ts + 60_000_000_000, price, price, price, price),
        )
        row = conn.execute(
            "SELECT open, ts_open, qm_ns_to_timestamptz(ts_open) FROM bars"
        ).fetchone()

    assert row is not None
    assert row[0] == price
    assert row[1] == ts  # nanoseconds survive exactly
    assert row[2].isoformat() == "2023-11-14T22:13:20.123456+00:00"


def test_bars_when_low_above_high_rejects_the_row(schema_dsn: str) -> None:
    migrate(schema_dsn)

    with psycopg.connect(schema_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO bars (instrument_id, interval, ts_open, ts_close, open, high, low,"
            " close, volume) VALUES ('X-USDT.SIM', '1m', 0, 60, 10, 10, 11, 10, 0)"
        )
