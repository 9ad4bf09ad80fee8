"""The feedback app's ASGI application (FastAPI): login, the shared page layout, errors, limits.

:func:`create_app` wires the pieces: the database (:mod:`rlhf_pl.app.db`), the inference worker
(:mod:`rlhf_pl.app.worker`), sessions and CSRF (:mod:`rlhf_pl.app.security`), and one router per
area — chat (:mod:`rlhf_pl.app.chat`), demonstrations (:mod:`rlhf_pl.app.demos`), ranking
(:mod:`rlhf_pl.app.ranking`), admin and export (:mod:`rlhf_pl.app.admin`). Every route but the login
page, ``/static`` and ``/favicon.ico`` needs a session. API routes live under ``/api`` and answer
JSON; an error is ``{"error": "<one readable sentence>"}`` with the HTTP status.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from rlhf_pl.app import security
from rlhf_pl.app.db import Database, User
from rlhf_pl.app.security import CurrentUser
from rlhf_pl.app.worker import InferenceWorker

log = logging.getLogger("rlhf_pl.app")

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhf_pl_session"


@dataclass(frozen=True)
class AppSettings:
    """What the app needs besides the database and the worker (the stage builds it from ``app.*``)."""

    secret_key: str
    policy: str = "?"  # the served policy's directory or name (stored with every chat)
    secure_cookies: bool = False
    session_hours: float = 12.0
    suggestions: int = 3
    overlap: int = 1
    max_k: int = 9
    max_new_tokens: int = 96
    max_message_chars: int = 4000
    max_request_kb: int = 256
    submissions_per_minute: int = 120
    seed: int = 0


templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescaped: model and user text is never markup


def page(request: Request, name: str, user: Optional[User], status_code: int = 200, **context: Any) -> Response:
    """Render ``templates/<name>`` inside the shared layout (nav, CSRF meta tag, user)."""
    return templates.TemplateResponse(request, name, {"user": user, "csrf": security.csrf_token(request),
                                                      "settings": request.app.state.settings, **context},
                                      status_code=status_code)


def too_large(method: str, path: str, limit_kb: int) -> JSONResponse:
    log.warning("refused %s %s (413): body over %d KiB", method, path, limit_kb)
    return JSONResponse({"error": f"request body over {limit_kb} KiB (app.max_request_kb)"}, status_code=413)


class DeclaredSizeLimit:
    """413 for a request whose Content-Length is over the limit, before anything reads it, as JSON like
    every other error (FastAPI's ``max_body_size`` answers that case in plain text; it still counts the
    bytes of bodies that declare no length)."""

    def __init__(self, app: ASGIApp, limit_kb: int) -> None:
        self.app, self.limit_kb = app, limit_kb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit_kb * 1024:
                await too_large(scope["method"], scope["path"], self.limit_kb)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _wants_page(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and request.method == "GET"


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(db: Database, settings: AppSettings, worker: Optional[InferenceWorker] = None) -> FastAPI:
    """The ASGI app. ``worker`` may be None for an app that only ranks, administers and exports
    (chat and suggestions then answer 503)."""
    from rlhf_pl.app import admin, chat, demos, ranking

    app = FastAPI(title="rlhf_pl feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db, app.state.worker, app.state.settings = db, worker, settings
    app.state.limiter = security.RateLimiter(settings.submissions_per_minute)
    app.add_middleware(SessionMiddleware, secret_key=settings.secret_key, session_cookie=SESSION_COOKIE,
                       max_age=int(settings.session_hours * 3600), same_site="strict",
                       https_only=settings.secure_cookies)
    app.add_middleware(DeclaredSizeLimit, limit_kb=settings.max_request_kb)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 413:  # a body without Content-Length that grew over the limit
            return too_large(request.method, request.url.path, settings.max_request_kb)
        if exc.status_code == 401 and _wants_page(request):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.get("/login")
    def login_page(request: Request, next: str = "/") -> Response:
        return page(request, "login.html", None, next=_safe_next(next), error=None)

    @app.post("/login", max_body_size=settings.max_request_kb * 1024)
    def login(request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
              next: str = Form("/")) -> Response:
        if not security.csrf_ok(request, csrf_token):
            raise security.refuse(request, 403, "the login form expired; reload the page")
        with db.sessions() as session:
            user = session.query(User).filter(User.username == username.strip()).one_or_none()
            if user is None or not user.active or not security.verify_password(user.password_hash, password):
                log.warning("failed login for %r", username.strip()[:64])
                return page(request, "login.html", None, next=_safe_next(next),
                            error="wrong username or password", status_code=401)
            security.login(request, user)
            log.info("login: %s (%s)", user.username, user.role)
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout", max_body_size=settings.max_request_kb * 1024)
    def logout(request: Request, user: CurrentUser) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/")
    def home(user: CurrentUser) -> Response:
        return RedirectResponse("/chat", status_code=303)

    @app.get("/api/me")
    def me(request: Request, user: CurrentUser) -> dict[str, Any]:
        return {"id": user.id, "username": user.username, "role": user.role, "csrf": security.csrf_token(request)}

    @app.get("/api/health")
    def health(request: Request, user: CurrentUser) -> dict[str, Any]:
        worker = request.app.state.worker
        return {"ok": True, "database": db.backend, "policy": settings.policy,
                "worker": None if worker is None else vars(worker.stats)}

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    # FastAPI's own body limit on every route counts the bytes of a body that declares no length (413
    # through the handler above); one that declares too many is refused before routing (DeclaredSizeLimit)
    for module in (chat, demos, ranking, admin):
        app.include_router(module.router, max_body_size=settings.max_request_kb * 1024)
    return app


def _safe_next(target: str) -> str:
    """Only a local path may follow a login (no open redirect to another site)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"
