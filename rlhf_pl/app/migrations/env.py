"""Alembic environment: run by :func:`rlhf_pl.app.db.migrate` on the connection it passes, or by the
``alembic`` command for a developer making a new revision::

    alembic -x url=sqlite:////tmp/dev.db -c /dev/null revision --autogenerate -m "what changed"  # see docs/app.md
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from rlhf_pl.app.db import Base, normalise_url

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database with -x url=<sqlalchemy url>")
    engine = create_engine(normalise_url(url))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
