"""``+stage=app`` from the command line: accounts, bad settings, serving and stopping."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from app_helpers import PASSWORD, csrf_of

from rlhf_pl.errors import ConfigError, UserError

CLI = [sys.executable, "-m", "rlhf_pl", "+stage=app", "experiment=quick"]


def _run(root: Path, *overrides: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, f"paths.output_root={root}", *overrides], input=stdin, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _cfg(root: Path, *overrides: str):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", ["+stage=app", "experiment=quick", f"paths.output_root={root}", *overrides])


def test_add_user_stores_a_hash_and_never_prints_the_password(tmp_path):
    done = _run(tmp_path, "app.add_user=root", "app.role=admin", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "created account 'root' (admin)" in done.stdout
    for path in tmp_path.rglob("*"):  # logs, configs, summaries: the password is nowhere but hashed in the db
        if path.is_file() and path.suffix != ".db":
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert PASSWORD not in done.stdout + done.stderr
    assert oct((tmp_path / "app").stat().st_mode & 0o777) == "0o700"


def test_add_user_refuses_a_taken_name_and_a_short_password(tmp_path, monkeypatch):
    import io

    from rlhf_pl.stages.app import add_user, open_database

    db = open_database(_cfg(tmp_path))
    try:
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        add_user(_cfg(tmp_path, "app.add_user=root"), db)
        for name, password, problem in (("root", PASSWORD, "app.add_user='root': the account 'root' exists already"),
                                        ("bob", "short", "app.add_user='bob': the password must have at least 8")):
            monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
            with pytest.raises(UserError, match=re.escape(problem)):
                add_user(_cfg(tmp_path, f"app.add_user={name}"), db)
    finally:
        db.dispose()


def test_bad_database_urls_are_named(tmp_path):
    from rlhf_pl.stages.app import open_database

    mysql = _run(tmp_path, "app.database_url=mysql://x/y")  # from the command line: one line, exit 2
    assert mysql.returncode == 2 and "error: app.database_url='mysql://x/y': backend 'mysql' is not supported; " \
        "use sqlite:///<file> or postgresql://<user>@<host>/<db>" in mysql.stderr
    assert "Traceback" not in mysql.stderr
    with pytest.raises(ConfigError) as unreachable:
        open_database(_cfg(tmp_path, "app.database_url=postgresql://nobody:secret@127.0.0.1:1/nowhere"))
    assert "app.database_url: cannot open postgresql+psycopg://nobody:***@127.0.0.1:1/nowhere" in str(unreachable.value)
    assert "secret" not in str(unreachable.value)  # the password of a URL is never shown


def test_serves_the_model_prints_its_address_and_stops_on_ctrl_c(tmp_path):
    from rlhf_pl.app.security import create_user
    from rlhf_pl.stages.app import open_database

    db = open_database(_cfg(tmp_path))
    with db.transaction() as session:
        create_user(session, "ada", PASSWORD, "labeler")
    db.dispose()
    server = subprocess.Popen([*CLI, f"paths.output_root={tmp_path}", "app.port=0"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in server.stdout:
            found = re.search(r"feedback app: (http://127\.0\.0\.1:\d+/)", line)
            if found:
                address = found.group(1)
                break
        assert address, "the app printed no address"
        with httpx.Client(base_url=address, timeout=30) as client:
            token = csrf_of(client.get("/login").text)
            client.post("/login", data={"username": "ada", "password": PASSWORD, "csrf_token": token})
            health = client.get("/api/health").json()
        assert health["ok"] and health["database"] == "sqlite" and health["policy"] == "tiny"  # nothing trained yet
    finally:
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
    assert server.returncode == 0, rest
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json")]
    served = [s for s in summaries if "address" in s]
    assert len(served) == 1 and served[0]["users"] == 1 and served[0]["address"] == address
