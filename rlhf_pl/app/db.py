"""The feedback app's database: SQLAlchemy 2 models, the engine, migrations, transactions.

One schema for SQLite (the default, a file under the output root in WAL mode) and PostgreSQL
(``app.database_url=postgresql://…``). The schema is made and upgraded by Alembic
(``rlhf_pl/app/migrations``) when the app starts, never by ``create_all``; a test checks that the
migrations and these models agree.

Tables:

- ``users``: accounts (``admin`` or ``labeler``), argon2 password hashes.
- ``conversations`` / ``messages``: chats with the served policy and written demonstrations. A
  message is one alternative at one position: a regenerated answer is a new alternative at the
  same position, and ``selected`` marks the one the conversation goes on from
  (:func:`selected_path`).
- ``ratings``: a user's thumbs up (+1) / down (−1) on an assistant message, with a reason.
- ``tasks`` / ``assignments`` / ``rankings``: ranking tasks (K completions of a conversation cut
  before a model-written message), who they are given to (each to ``overlap`` different
  labelers, never twice to one: a unique key) and the rankings people gave.
- ``submissions``: the idempotency keys of state-changing requests, so a retried request is
  stored once.
"""
from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from rlhf_pl.errors import ConfigError

T = TypeVar("T")
ROLES = ("admin", "labeler")
KINDS = ("chat", "demonstration")
TASK_SOURCES = ("collect", "chat")


def storable(text: str) -> str:
    """Model text as both databases can store it: a NUL (random or broken models emit them; PostgreSQL
    text cannot hold one) becomes U+FFFD, as bytes that are not UTF-8 do."""
    return text.replace("\x00", "\ufffd")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # one of ROLES
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # one of KINDS
    title: Mapped[str] = mapped_column(String(200), default="")
    policy: Mapped[Optional[str]] = mapped_column(Text, default=None)  # the model that answered (chat)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", order_by="(Message.position, Message.alternative)",
        cascade="all, delete-orphan")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("conversation_id", "position", "alternative"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # turn index in the conversation, from 0
    alternative: Mapped[int] = mapped_column(Integer, default=0)  # regenerations of the same turn: 0, 1, ...
    selected: Mapped[bool] = mapped_column(Boolean, default=True)  # the alternative the conversation follows
    role: Mapped[str] = mapped_column(String(16))  # system | user | assistant
    content: Mapped[str] = mapped_column(Text)
    # how the text came to be: "human" (typed), "model" (generated, unedited), "suggestion" (a demonstration
    # turn that started from a model suggestion and may have been edited)
    source: Mapped[str] = mapped_column(String(16), default="human")
    suggestion: Mapped[Optional[str]] = mapped_column(Text, default=None)  # the suggestion it started from
    edit_distance: Mapped[Optional[int]] = mapped_column(Integer, default=None)  # characters changed from it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("message_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    value: Mapped[int] = mapped_column(Integer)  # +1 or -1
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """A ranking task: ``prompt`` (messages up to the model-written message) and its K ``completions``."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_order", "created_at", "id"),)  # handing out oldest first walks it

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the collect stage's task id, or "chat-<n>-<m>"
    source: Mapped[str] = mapped_column(String(16))  # one of TASK_SOURCES
    queue: Mapped[str] = mapped_column(String(200), default="default", index=True)  # e.g. the collect run
    prompt: Mapped[list[Any]] = mapped_column(JSON)  # [{"role", "content"}, ...]
    completions: Mapped[list[Any]] = mapped_column(JSON)  # [str, ...]
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # provenance (source record, turn, policy, ...)
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # rankings wanted, each by a different labeler
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    """A task given to one labeler; ``state``: open | done | skipped."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),
                      Index("ix_assignments_task_state", "task_id", "state"))  # a task's live slots

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="open")
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)


class RankingRecord(Base):
    """One labeler's answer to one task: a ranking (tie groups, best first), "all bad", or a skip."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    ranking: Mapped[Optional[list[Any]]] = mapped_column(JSON, default=None)  # [[2], [0, 3], [1]]; None if skipped
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")  # why skipped (or a note)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Submission(Base):
    """An idempotency key: the first request with (user, key) is stored, a repeat returns its result."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("user_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    key: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- the shape of a conversation (pure: lists of Message rows) -------------------------------------


def by_position(messages: list[Message]) -> dict[int, list[Message]]:
    """Alternatives per position, positions and alternatives in order."""
    grouped: dict[int, list[Message]] = {}
    for message in sorted(messages, key=lambda m: (m.position, m.alternative)):
        grouped.setdefault(message.position, []).append(message)
    return grouped


def chosen(alternatives: list[Message]) -> Message:
    """The selected alternative (the newest if, against the invariant, none is)."""
    return next((m for m in alternatives if m.selected), alternatives[-1])


def selected_path(messages: list[Message]) -> list[Message]:
    """The conversation as it goes on: the selected alternative of every position, in order."""
    return [chosen(alternatives) for alternatives in by_position(messages).values()]


# --- the engine -----------------------------------------------------------------------------------


def default_url(output_root: str | Path) -> str:
    """``sqlite:///<output_root>/app/app.db`` (the directory is made)."""
    folder = Path(output_root).expanduser().absolute() / "app"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # it holds password hashes and the session key
    return f"sqlite:///{folder / 'app.db'}"


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver this project installs); other URLs as given."""
    try:
        parsed = make_url(url)
    except Exception as err:  # sqlalchemy.exc.ArgumentError
        raise ConfigError(f"app.database_url={url!r} is not a database URL ({err}); use sqlite:///<file> or "
                          "postgresql://<user>@<host>/<db>") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"app.database_url={url!r}: backend {parsed.get_backend_name()!r} is not supported; "
                          "use sqlite:///<file> or postgresql://<user>@<host>/<db>")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite: WAL journal (readers do not block the writer), ``synchronous=FULL``
    (a transaction is on disk when its commit returns, so an acknowledged submission survives ``kill -9``
    and power loss), foreign keys on, and a 30 s busy timeout so that concurrent writers queue up
    instead of failing."""
    url = normalise_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=20, max_overflow=40)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (Alembic, ``rlhf_pl/app/migrations``)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    logging.getLogger("alembic").setLevel(logging.WARNING)  # no INFO line per plugin at every start
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def once_more_on_conflict(work: Callable[[], T]) -> T:
    """``work()`` (which runs its own transaction), run again if a racing request hit a unique key first:
    the second run sees what the winner stored (the same labeler asking twice at once, a first rating
    of a message made twice)."""
    try:
        return work()
    except IntegrityError:
        return work()


class Database:
    """The engine and a session factory; :meth:`transaction` is the one way handlers write."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    def migrate(self) -> None:
        migrate(self.engine)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed as one transaction when the block ends (rolled back on error)."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
