"""The migration files themselves: naming, order and checksums, without a database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantmesh_common.storage.migrate import (
    MigrationError,
    default_directory,
    load_migrations,
    main,
)


def test_default_directory_when_in_workspace_holds_the_versioned_files() -> None:
    migrations = load_migrations(default_directory())

    assert [m.label for m in migrations[:2]] == [
        "V0001__core_tables",
        "V0002__timescale_hypertables",
    ]
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert all(len(m.checksum) == 64 for m in migrations)


def test_load_migrations_when_file_misnamed_refuses(tmp_path: Path) -> None:
    (tmp_path / "V0001__ok.sql").write_text("SELECT 1;")
    (tmp_path / "0002_missing_prefix.sql").write_text("SELECT 1;")

    with pytest.raises(MigrationError, match=re.escape("0002_missing_prefix.sql")):
        load_migrations(tmp_path)


def test_load_migrations_when_version_repeated_refuses(tmp_path: Path) -> None:
    (tmp_path / "V0001__a.sql").write_text("SELECT 1;")
    (tmp_path / "V00001__b.sql").write_text("SELECT 2;")

    with pytest.raises(MigrationError, match="version 1 also used"):
        load_migrations(tmp_path)


def test_load_migrations_when_only_line_endings_differ_checksum_is_equal(tmp_path: Path) -> None:
    (tmp_path / "lf").mkdir()
    (tmp_path / "crlf").mkdir()
    (tmp_path / "lf" / "V0001__a.sql").write_bytes(b"SELECT 1;\nSELECT 2;\n")
    (tmp_path / "crlf" / "V0001__a.sql").write_bytes(b"SELECT 1;\r\nSELECT 2;\r\n")

    [lf] = load_migrations(tmp_path / "lf")
    [crlf] = load_migrations(tmp_path / "crlf")

    assert lf.checksum == crlf.checksum


def test_main_when_no_dsn_given_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QM_DATABASE_URL", raising=False)

    code = main([])

    assert code == 2
    assert "QM_DATABASE_URL" in capsys.readouterr().err
