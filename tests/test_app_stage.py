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
from app_helpers import PASSWORD, csrf_of

CLI = [sys.executable, "-m", "rlhf_pl", "+stage=app", "experiment=quick"]


def _run(root: Path, *overrides: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, f"paths.output_root={root}", *overrides], input=stdin, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_add_user_stores_a_hash_and_never_prints_the_password(tmp_path):
    done = _run(tmp_path, "app.add_user=root", "app.role=admin", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "created account 'root' (admin)" in done.stdout
    for path in tmp_path.rglob("*"):  # logs, configs, summaries: the password is nowhere but hashed in the db
        if path.is_file() and path.suffix != ".db":
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert PASSWORD not in done.stdout + done.stderr
    assert oct((tmp_path / "app").stat().st_mode & 0o777) == "0o700"

    again = _run(tmp_path, "app.add_user=root", stdin=PASSWORD + "\n")
    assert again.returncode == 2 and "error: app.add_user='root': the account 'root' exists already" in again.stderr
    short = _run(tmp_path, "app.add_user=bob", stdin="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    assert "Traceback" not in again.stderr + short.stderr


def test_bad_database_urls_are_named(tmp_path):
    mysql = _run(tmp_path, "app.database_url=mysql://x/y")
    assert mysql.returncode == 2 and "backend 'mysql' is not supported" in mysql.stderr
    unreachable = _run(tmp_path, "app.database_url=postgresql://nobody:secret@127.0.0.1:1/nowhere")
    assert unreachable.returncode == 2 and "app.database_url: cannot open postgresql+psycopg://nobody:***@" \
        in unreachable.stderr
    assert "secret" not in unreachable.stderr  # the password of a URL is never shown
    assert "Traceback" not in mysql.stderr + unreachable.stderr


def test_serves_the_model_prints_its_address_and_stops_on_ctrl_c(tmp_path):
    assert _run(tmp_path, "app.add_user=ada", stdin=PASSWORD + "\n").returncode == 0
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
