"""The app's limits and sessions: oversized bodies (413), too many submissions (429), CSRF, roles,
sessions ended by a new password or a deactivated account, and no open redirect after login."""
from __future__ import annotations

from app_helpers import PASSWORD, csrf_of, make_harness
from sqlalchemy import select

from rlhf_pl.app.db import User
from rlhf_pl.app.security import hash_password


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_stored(tmp_path, caplog):
    h = make_harness(f"sqlite:///{tmp_path / 'a.db'}", max_request_kb=1)
    try:
        h.add_user("ada")
        client = h.client("ada")
        big = client.post("/api/demos", json={"key": "demo-key-01", "title": "x" * 2000})
        assert big.status_code == 413 and big.json() == {"error": "request body over 1 KiB (app.max_request_kb)"}
        chunked = client.post("/api/demos", content=iter([b'{"key": "demo-key-02", "title": "', b"y" * 2000, b'"}']),
                              headers={"Content-Type": "application/json"})  # no Content-Length: counted as it comes
        assert chunked.status_code == 413
        assert client.get("/api/demos").json()["demos"] == []
        assert "(413): body over 1 KiB" in caplog.text
    finally:
        h.close()


def test_more_submissions_a_minute_than_allowed_get_429_with_the_wait(tmp_path):
    h = make_harness(f"sqlite:///{tmp_path / 'a.db'}", submissions_per_minute=3)
    try:
        h.add_user("ada")
        h.add_user("bob")
        ada, bob = h.client("ada"), h.client("bob")
        codes = [ada.post("/api/demos", json={"key": f"demo-key-{i:02d}"}).status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = ada.post("/api/demos", json={"key": "demo-key-99"}).json()["error"]
        assert refused.startswith("more than 3 submissions a minute (app.submissions_per_minute); wait ")
        assert ada.get("/api/demos").status_code == 200  # reading is not limited
        assert bob.post("/api/demos", json={"key": "demo-key-b1"}).status_code == 200  # per user
    finally:
        h.close()


def test_sessions_end_with_a_new_password_or_a_deactivated_account_and_roles_are_enforced(tmp_path):
    h = make_harness(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        h.add_user("ada")
        h.add_user("bob")
        ada, bob = h.client("ada"), h.client("bob")
        assert ada.get("/api/admin/users").status_code == 403  # a labeler is no admin
        with h.db.transaction() as session:
            session.scalar(select(User).where(User.username == "ada")).password_hash = hash_password("a new password")
            session.scalar(select(User).where(User.username == "bob")).active = False
        assert ada.get("/api/me").status_code == 401 and bob.get("/api/me").status_code == 401
        no_csrf = h.client()
        token = csrf_of(no_csrf.get("/login").text)
        assert no_csrf.post("/login", data={"username": "ada", "password": "a new password", "csrf_token": "wrong"},
                            follow_redirects=False).status_code == 403
        evil = no_csrf.post("/login", data={"username": "ada", "password": "a new password", "csrf_token": token,
                                            "next": "//evil.example/"}, follow_redirects=False)
        assert evil.status_code == 303 and evil.headers["location"] == "/"  # no redirect off the site
        bob_again = h.client()
        token = csrf_of(bob_again.get("/login").text)
        assert bob_again.post("/login", data={"username": "bob", "password": PASSWORD, "csrf_token": token},
                              follow_redirects=False).status_code == 401  # deactivated
    finally:
        h.close()
