"""The feedback web app as a stage: ``python -m rlhf_pl +stage=app`` serves it until Ctrl-C.

Reads top to bottom: the database (``app.database_url``, default a SQLite file under the output
root, migrated to the newest schema) → with ``app.add_user=<name>``: create that account with
``app.role`` (the password is asked on the terminal, or read from the first line of stdin; it is
never logged) and stop → the served policy (``app.serve_from``: the latest PPO output, else the
SFT output, else ``model.*``) under the precision plugin, and the sampler plugin → the inference
worker thread → the ASGI app (:func:`rlhf_pl.app.server.create_app`) on uvicorn at
``app.host:app.port``, whose address is printed → at shutdown, the summary (what the database holds).
Settings: :class:`rlhf_pl.config.AppConfig` (``app.*``).
"""
from __future__ import annotations

import getpass
import logging
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from sqlalchemy import func, select

from rlhf_pl.errors import ConfigError, UserError
from rlhf_pl.outputs import InputSpec, model_config_at
from rlhf_pl.stages import StageResult

log = logging.getLogger(__name__)

USES_LIGHTNING = False  # run_stage needs no Lightning here: the worker seeds its own generator (seed)
INPUTS = {
    "policy": InputSpec("app.serve_from", stage="ppo", output="policy", marker="config.json",
                        fallback=(("sft", "model"),), required=False),
}


def database_url(cfg: DictConfig) -> str:
    from rlhf_pl.app.db import default_url

    return cfg.app.database_url or default_url(cfg.paths.output_root)


def open_database(cfg: DictConfig) -> Any:
    """The app's :class:`~rlhf_pl.app.db.Database`, migrated; a ConfigError naming the URL if it cannot be reached."""
    from sqlalchemy.exc import OperationalError

    from rlhf_pl.app.db import Database

    db = Database(database_url(cfg))
    try:
        db.migrate()
    except OperationalError as err:
        shown = db.engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"app.database_url: cannot open {shown}: {str(err.orig).strip()}") from None
    return db


def read_password(name: str) -> str:
    """Twice on a terminal (getpass, not echoed); else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise UserError("the two passwords differ; nothing was created")
        return first
    return sys.stdin.readline().rstrip("\n")


def add_user(cfg: DictConfig, db: Any) -> StageResult:
    from rlhf_pl.app.security import create_user

    name = str(cfg.app.add_user)
    try:
        with db.transaction() as session:
            user = create_user(session, name, read_password(name), cfg.app.role)
    except ValueError as err:
        raise UserError(f"app.add_user={name!r}: {err}") from None
    print(f"created account {user.username!r} ({user.role}) in {db.engine.url.render_as_string(hide_password=True)}")
    return StageResult({}, {"created": user.username, "role": user.role})


def served_policy(cfg: DictConfig, inputs: Any) -> tuple[DictConfig, str]:
    """The model config to serve and its label: ``base`` is ``model.*``; else a directory (given or the latest)."""
    if cfg.app.serve_from == "base":
        return cfg.model, str(cfg.model.name_or_path)
    path = inputs["policy"]
    if path is None:
        log.info("app.serve_from=auto: no PPO or SFT output of %r recorded; serving model.* (%s)",
                 cfg.model.name, cfg.model.name_or_path)
        return cfg.model, str(cfg.model.name_or_path)
    return model_config_at(cfg.model, Path(path)), str(path)


def build_worker(cfg: DictConfig, inputs: Any) -> tuple[Any, str]:
    """The inference worker (not started) on the served policy, and the policy's label."""
    from rlhf_pl import registry
    from rlhf_pl.app.worker import InferenceWorker
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.precision import build_for_stage, inference_autocast
    from rlhf_pl.sampling import build_backend, model_device

    precision = build_for_stage(cfg, "app", frozen=("policy",))
    model_cfg, label = served_policy(cfg, inputs)
    model, tokenizer, _ = load_model_and_tokenizer(model_cfg)
    model = precision.prepare_frozen(model.eval())
    device = model_device(model)
    worker = InferenceWorker(model, tokenizer, registry.build("samplers", cfg.sampler), max_batch=cfg.app.max_batch,
                             batch_window_s=cfg.app.batch_window_ms / 1000, max_new_tokens=cfg.app.max_new_tokens,
                             seed=cfg.seed, autocast=lambda: inference_autocast(precision, device),
                             backend=build_backend(cfg))
    return worker, label


def settings_of(cfg: DictConfig, policy: str) -> Any:
    from rlhf_pl.app.security import secret_key
    from rlhf_pl.app.server import AppSettings

    a = cfg.app
    key_file = Path(a.secret_key_file or Path(cfg.paths.output_root) / "app" / "secret_key").expanduser()
    return AppSettings(secret_key=secret_key(key_file), policy=policy, secure_cookies=a.secure_cookies,
                       session_hours=a.session_hours, suggestions=a.suggestions, overlap=a.overlap, max_k=a.max_k,
                       max_new_tokens=a.max_new_tokens, max_message_chars=a.max_message_chars,
                       max_request_kb=a.max_request_kb, submissions_per_minute=a.submissions_per_minute,
                       seed=cfg.seed)


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so the printed address is the real one."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as err:
        raise ConfigError(f"app.host={host!r} app.port={port}: cannot listen there ({err.strerror or err})") from None
    sock.set_inheritable(True)
    # Accepted connections inherit TCP_NODELAY on Linux. asyncio sets it only on sockets made with
    # proto=IPPROTO_TCP, which create_server's are not: without it a small response waits ~40 ms for
    # the client's delayed ACK (Nagle's algorithm) on every request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def counts(db: Any) -> dict[str, int]:
    from rlhf_pl.app import db as tables

    with db.sessions() as session:
        return {name: session.scalar(select(func.count()).select_from(table)) or 0 for name, table in (
            ("users", tables.User), ("conversations", tables.Conversation), ("messages", tables.Message),
            ("ratings", tables.Rating), ("tasks", tables.Task), ("rankings", tables.RankingRecord))}


def run(cfg: DictConfig, run_dir: Path, inputs: Any, ready: Optional[Any] = None) -> StageResult:
    import uvicorn

    from rlhf_pl.app.server import create_app

    db = open_database(cfg)
    if cfg.app.add_user:
        return add_user(cfg, db)
    if not counts(db)["users"]:
        log.warning("no accounts yet: create one with `python -m rlhf_pl +stage=app app.add_user=<name> "
                    "app.role=admin` (same paths.output_root / app.database_url)")
    worker, policy = build_worker(cfg, inputs)
    app = create_app(db, settings_of(cfg, policy), worker)
    sock = listen(cfg.app.host, cfg.app.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    worker.start()
    print(f"feedback app: http://{host}:{port}/  (policy {policy}; database "
          f"{db.engine.url.render_as_string(hide_password=True)}; Ctrl-C stops it)", flush=True)
    if ready is not None:
        ready(host, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C / SIGTERM, then re-raises the signal
        log.info("feedback app stopped")
    finally:
        worker.stop()
        db.dispose()
    return StageResult({}, {**counts(db), "policy": policy, "address": f"http://{host}:{port}/",
                            "worker": vars(worker.stats)})
