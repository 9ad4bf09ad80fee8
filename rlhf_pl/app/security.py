"""Accounts, sessions, CSRF and limits of the feedback app.

- Passwords: argon2id (``argon2-cffi``'s :class:`PasswordHasher`, its default parameters).
- Sessions: Starlette's ``SessionMiddleware`` — a cookie signed with the app's secret key
  (itsdangerous), HttpOnly, ``SameSite=Strict``, ``Secure`` with ``app.secure_cookies``. It holds the
  user id, the CSRF token and the password-hash fingerprint: changing a password or deactivating an
  account ends the account's sessions.
- CSRF: every state-changing request (POST, PUT, PATCH, DELETE) must carry the session's token in
  the ``X-CSRF-Token`` header (pages read it from ``<meta name="csrf-token">``) or, for the login
  form, a ``csrf_token`` form field. Refused requests get 403 and a log line.
- Limits: request bodies above ``app.max_request_kb`` get 413; each user's state-changing requests
  are limited to ``app.submissions_per_minute`` (429, with the seconds to wait).

Every refusal is logged with the route, the user (if any) and why: the logs never hold a password,
a session cookie or a CSRF token.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_pl.app.db import ROLES, User
from rlhf_pl.errors import ConfigError

log = logging.getLogger("rlhf_pl.app.security")

CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
USERNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MIN_PASSWORD = 8

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def fingerprint(password_hash: str) -> str:
    """A short digest of the password hash, kept in the session: a new password ends old sessions."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def check_username(name: str) -> str:
    name = (name or "").strip()
    if not (1 <= len(name) <= 64) or not set(name) <= USERNAME_CHARS:
        raise ValueError(f"username {name!r}: 1 to 64 characters of letters, digits, '.', '_' and '-'")
    return name


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password must have at least {MIN_PASSWORD} characters")
    return password


def create_user(session: Session, username: str, password: str, role: str) -> User:
    """Add an account (``role`` in :data:`ROLES`); ValueError for a taken or bad name or a short password."""
    username = check_username(username)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    check_new_password(password)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"the account {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.flush()
    return user


def secret_key(path: Path) -> str:
    """The session-signing key in ``path``, made (32 random bytes, mode 0600) if the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"app.secret_key_file={str(path)!r} is readable by other users (mode "
                          f"{oct(path.stat().st_mode & 0o777)}); chmod 600 it")
    key = path.read_text().strip()
    if len(key) < 32:
        raise ConfigError(f"app.secret_key_file={str(path)!r} holds fewer than 32 characters; "
                          "delete it to make a new key")
    return key


# --- CSRF -------------------------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok(request: Request, given: Optional[str]) -> bool:
    expected = request.session.get("csrf")
    return bool(expected and given and hmac.compare_digest(str(expected), str(given)))


def refuse(request: Request, status: int, why: str, user: Optional[User] = None) -> HTTPException:
    """Log a refused request (route, user, reason) and return the HTTPException to raise."""
    who = user.username if user is not None else (f"user id {request.session.get('uid')}"
                                                  if request.session.get("uid") else "anonymous")
    log.warning("refused %s %s (%s) for %s: %s", request.method, request.url.path, status, who, why)
    return HTTPException(status_code=status, detail=why)


# --- the current user -------------------------------------------------------------------------------


def session_user(request: Request, db: Session) -> Optional[User]:
    """The active user of the request's session, or None (no session, a deactivated account, an old password)."""
    uid = request.session.get("uid")
    if not isinstance(uid, int):
        return None
    user = db.get(User, uid)
    if user is None or not user.active or request.session.get("pw") != fingerprint(user.password_hash):
        request.session.clear()
        return None
    return user


def login(request: Request, user: User) -> None:
    """Start a session for ``user`` (a new CSRF token: the pre-login one is not reused)."""
    request.session.clear()
    request.session.update({"uid": user.id, "pw": fingerprint(user.password_hash),
                            "csrf": secrets.token_urlsafe(32)})


def get_db(request: Request):
    """A read session for a request (writes go through ``Database.transaction``)."""
    with request.app.state.db.sessions() as session:
        yield session


DB = Annotated[Session, Depends(get_db)]


def require_user(request: Request, db: DB) -> User:
    user = session_user(request, db)
    if user is None:
        raise refuse(request, 401, "log in first")
    if request.method in UNSAFE_METHODS and not csrf_ok(request, request.headers.get(CSRF_HEADER)):
        raise refuse(request, 403, f"missing or wrong CSRF token (send the page's token in {CSRF_HEADER})", user)
    if request.method in UNSAFE_METHODS:
        request.app.state.limiter.check(request, user)
    return user


CurrentUser = Annotated[User, Depends(require_user)]


def require_admin(request: Request, user: CurrentUser) -> User:
    if user.role != "admin":
        raise refuse(request, 403, "admins only", user)
    return user


AdminUser = Annotated[User, Depends(require_admin)]


class RateLimiter:
    """At most ``per_minute`` state-changing requests per user in any 60 s window (in memory, per process)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, request: Request, user: User) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._times.setdefault(user.id, deque())
            while times and now - times[0] >= 60.0:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = 60.0 - (now - times[0])
                raise refuse(request, 429, f"more than {self.per_minute} submissions a minute "
                                           f"(app.submissions_per_minute); wait {wait:.0f} s", user)
            times.append(now)
