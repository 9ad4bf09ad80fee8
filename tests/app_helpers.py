"""Test helpers for the feedback app: an app on the tiny model, logged-in clients, a PostgreSQL server.

``database`` (a fixture, parametrised): a fresh database per test, SQLite and PostgreSQL. The
PostgreSQL server is a throwaway cluster started once per test session from Debian's
``postgresql`` package (``.ci/run`` installs it), or the server at ``RLHF_PL_TEST_POSTGRES_URL``.
A machine without either fails these tests, saying how to install it: they are never skipped.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

PASSWORD = "correct horse battery"
_databases = itertools.count()


# --- PostgreSQL -----------------------------------------------------------------------------------


def _pg_bin(name: str) -> Optional[str]:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster in ``folder`` on a free loopback port, trust auth, stopped by :meth:`stop`."""

    def __init__(self, folder: Path) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            pytest.fail("PostgreSQL is not installed: the app's database tests need Debian's `postgresql` package "
                        "(apt-get install postgresql; .ci/run does it) or RLHF_PL_TEST_POSTGRES_URL=postgresql://...")
        self.folder, self.port, self.pg_ctl = folder, _free_port(), pg_ctl
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.prefix = ["runuser", "-u", "postgres", "--"]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "postgres")
            for parent in folder.parents:  # the server's user must reach its data directory
                if parent == Path("/"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
        data = folder / "data"
        self._run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        # no archive or replica: WAL is recycled after each checkpoint instead of growing to 1 GB (max_wal_size)
        options = (f"-p {self.port} -k {folder} -h 127.0.0.1 -c fsync=off -c max_connections=200 "
                   "-c wal_level=minimal -c max_wal_senders=0 -c max_wal_size=64MB -c min_wal_size=32MB")
        self._run([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start"])
        self.data = data
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self.prefix + cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server at ``server_url``; returns its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return re.sub(r"/[^/]*$", f"/{name}", server_url)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (each is ~8 MB on disk; a test session makes dozens), closing its connections."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    url = os.environ.get("RLHF_PL_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix=f"rlhf_pl_pg_{os.getpid()}_", dir="/tmp"))  # short: a socket lives there
    server = PostgresServer(folder)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty database URL: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"rlhf_test_{os.getpid()}_{next(_databases)}"
    yield create_database(server, name)
    drop_database(server, name)


# --- the app --------------------------------------------------------------------------------------


@dataclass
class Harness:
    """An app on a migrated database, with a worker on the tiny model (if asked for)."""

    app: Any
    db: Any
    worker: Any = None
    clients: list[Any] = field(default_factory=list)

    def add_user(self, name: str, role: str = "labeler", password: str = PASSWORD) -> int:
        from rlhf_pl.app.security import create_user

        with self.db.transaction() as session:
            return create_user(session, name, password, role).id

    def client(self, name: Optional[str] = None, password: str = PASSWORD) -> Any:
        """A TestClient, logged in as ``name`` (None: anonymous) with its CSRF header set."""
        from fastapi.testclient import TestClient

        client = TestClient(self.app)
        self.clients.append(client)
        if name is not None:
            login(client, name, password)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self.worker is not None:
            self.worker.stop()
        self.db.dispose()


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match, "the page has no CSRF meta tag"
    return match.group(1)


def login(client: Any, name: str, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": name, "password": password, "csrf_token": token},
                           follow_redirects=False)
    assert response.status_code == 303, f"login of {name} failed: {response.status_code} {response.text[:200]}"
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
    return client


def make_worker(model: Any, tokenizer: Any, sampler: Any = None, **kwargs: Any) -> Any:
    """A started worker on ``model`` with ``sampler`` (default: the temperature-1 sampler)."""
    from rlhf_pl import registry
    from rlhf_pl.app.worker import InferenceWorker

    kwargs.setdefault("max_new_tokens", 16)
    sampler = sampler or registry.build_by_name("samplers", "temperature", temperature=1.0)
    worker = InferenceWorker(model, tokenizer, sampler, **kwargs)
    worker.start()
    return worker


def make_harness(url: str, worker: Any = None, **settings: Any) -> Harness:
    from rlhf_pl.app.db import Database
    from rlhf_pl.app.server import AppSettings, create_app

    db = Database(url)
    db.migrate()
    settings.setdefault("secret_key", "k" * 64)
    app = create_app(db, AppSettings(**settings), worker)
    return Harness(app, db, worker)


@contextlib.contextmanager
def live_server(asgi_app: Any) -> Iterator[str]:
    """Serve ``asgi_app`` with uvicorn in a thread on a free loopback port (the app stage's own
    listening socket, TCP_NODELAY set); yields the base URL and stops the server afterwards."""
    import uvicorn

    from rlhf_pl.stages.app import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the app server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
