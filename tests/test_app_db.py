"""The app's database: migrations match the models on SQLite and PostgreSQL, upgrade step by step,
and SQLite runs in WAL mode with synchronous commits."""
from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

import rlhf_pl.app.db as app_db
from rlhf_pl.app.db import Base, Database, normalise_url
from rlhf_pl.errors import ConfigError


def _alembic(connection) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(app_db.__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def test_migrations_build_exactly_the_models_and_upgrade_one_step_at_a_time(database_url):
    db = Database(database_url)
    try:
        with db.engine.begin() as connection:
            command.upgrade(_alembic(connection), "0001")
        assert "ix_tasks_order" not in {i["name"] for i in inspect(db.engine).get_indexes("tasks")}
        db.migrate()  # 0001 -> head
        db.migrate()  # at head: nothing to do
        with db.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert connection.execute(text("select version_num from alembic_version")).scalar() == "0002"
        assert "ix_tasks_order" in {i["name"] for i in inspect(db.engine).get_indexes("tasks")}
    finally:
        db.dispose()


def test_sqlite_is_in_wal_mode_with_synchronous_commits_and_foreign_keys(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        with db.engine.connect() as connection:
            assert connection.execute(text("pragma journal_mode")).scalar() == "wal"
            assert connection.execute(text("pragma synchronous")).scalar() == 2  # FULL
            assert connection.execute(text("pragma foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_database_urls():
    assert normalise_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="backend 'mysql' is not supported"):
        normalise_url("mysql://u@h/d")
    with pytest.raises(ConfigError, match="is not a database URL"):
        normalise_url("not a url")
