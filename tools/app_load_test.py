"""Load test of the feedback app on loopback: concurrent labelers submitting rankings, and the
time to the first streamed token of a chat answer.

    python tools/app_load_test.py                        # 50 labelers x 20 rankings, SQLite (issue 15)
    python tools/app_load_test.py --database-url postgresql://postgres@127.0.0.1:5432/load

It makes a fresh output root, creates the accounts and ``labelers x per_labeler`` ranking tasks
(K = 4, overlap 1) in the app's database, starts ``python -m rlhf_pl +stage=app experiment=quick``
(the tiny model) on a free port, and then runs every labeler at once, each in its own session:
log in, then ``per_labeler`` times fetch the next task and submit a ranking (with a tie group).
Afterwards it checks, and exits 1 unless all hold: exactly ``labelers x per_labeler`` rankings are
stored, one per task (none lost, none duplicated), each labeler's ``/api/rankings/mine`` lists
exactly the rankings that labeler submitted, and another labeler's task answers 404. Then it
times the first streamed token of ``--chats`` chat answers, one after another. Traffic goes to
127.0.0.1 only; every loop is bounded and the whole run stops after ``--timeout`` seconds.

Prints p50/p95 submit latency (the issue's target: p95 < 100 ms on SQLite on this machine) and
p50/p95 time to first token; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx

PASSWORD = "load-test-password"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def prepare(url: str, labelers: int, tasks: int) -> None:
    """The accounts ``labeler0..`` and ``tasks`` ranking tasks of K = 4 in the database at ``url``."""
    from rlhf_pl.app.db import Database
    from rlhf_pl.app.security import create_user
    from rlhf_pl.app.tasks import add_tasks

    db = Database(url)
    db.migrate()
    with db.transaction() as session:
        for i in range(labelers):
            create_user(session, f"labeler{i}", PASSWORD, "labeler")
        records = [{"id": f"load-{n:05d}", "prompt": [{"role": "user", "content": f"What is {n} plus 1?"}],
                    "completions": [str(n + 1), str(n), f"It is {n + 1}.", "I do not know."],
                    "meta": {"load_test": True}} for n in range(tasks)]
        add_tasks(session, records, queue="load", overlap=1, source="collect")
    db.dispose()


def start_server(root: Path, url: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "rlhf_pl", "+stage=app", "experiment=quick", f"paths.output_root={root}",
           f"app.database_url={url}", "app.port=0", "app.submissions_per_minute=600", "app.max_new_tokens=32"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    for line in server.stdout:
        found = re.search(r"feedback app: (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return server, found.group(1)
        if time.monotonic() > deadline:
            break
    server.kill()
    raise SystemExit(f"the app did not start: {' '.join(cmd)}")


async def login(client: httpx.AsyncClient, name: str) -> None:
    page = await client.get("/login")
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    response = await client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token})
    if response.status_code not in (200, 303) or "/login" in str(response.url):
        raise SystemExit(f"login of {name} failed: {response.status_code}")
    client.headers["X-CSRF-Token"] = (await client.get("/api/me")).json()["csrf"]


async def logged_in(base: str, name: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base, timeout=60, follow_redirects=True)
    await login(client, name)
    return client


async def labeler(client: httpx.AsyncClient, name: str, count: int, think_s: float,
                  latencies: list[float]) -> dict[str, Any]:
    """Rank ``count`` tasks, reading each for a random 0..2·``think_s`` seconds (seeded by the name)
    first; returns the acknowledged task ids and the client (still open)."""
    rng = random.Random(name)
    acknowledged: list[str] = []
    for n in range(count):
        task = (await client.get("/api/tasks/next")).json()["task"]
        if task is None:
            break
        await asyncio.sleep(rng.uniform(0, 2 * think_s))
        body = {"ranking": [[2], [0, 1], [3]], "all_bad": False, "key": f"{name}-{n}-{task['id']}"}
        started = time.perf_counter()
        response = await client.post(f"/api/tasks/{task['id']}/ranking", json=body)
        latencies.append(time.perf_counter() - started)
        if response.status_code == 200:
            acknowledged.append(task["id"])
    return {"name": name, "client": client, "acknowledged": acknowledged}


async def first_token_times(base: str, chats: int) -> list[float]:
    """Seconds from sending a chat message to its first streamed text, ``chats`` times in a row."""
    async with httpx.AsyncClient(base_url=base, timeout=60, follow_redirects=True) as client:
        await login(client, "labeler0")
        times = []
        for n in range(chats):
            chat = (await client.post("/api/chats", json={"title": f"load {n}", "key": f"ttft-chat-{n}"})).json()
            started = time.perf_counter()
            async with client.stream("POST", f"/api/chats/{chat['id']}/messages",
                                     json={"content": f"What is {n} plus 2?", "key": f"ttft-{n}-{chat['id']}"}) as r:
                async for line in r.aiter_lines():
                    if line.strip() and "text" in json.loads(line):
                        times.append(time.perf_counter() - started)
                        break
        return times


async def check(base: str, results: list[dict[str, Any]], expected: int, url: str) -> list[str]:
    """Every acknowledged ranking stored once, visible to its labeler only; returns the problems found."""
    from sqlalchemy import func, select

    from rlhf_pl.app.db import Database, RankingRecord, User

    problems = []
    db = Database(url)
    with db.sessions() as session:
        stored = session.execute(select(RankingRecord.task_id, User.username)
                                 .join(User, User.id == RankingRecord.user_id)).all()
        distinct_tasks = session.scalar(select(func.count(func.distinct(RankingRecord.task_id))))
    db.dispose()
    acknowledged = {(t, r["name"]) for r in results for t in r["acknowledged"]}
    if len(stored) != expected or distinct_tasks != expected:
        problems.append(f"{len(stored)} rankings stored on {distinct_tasks} tasks, expected {expected} on {expected}")
    if set(map(tuple, stored)) != acknowledged:
        problems.append(f"stored and acknowledged differ: {len(set(map(tuple, stored)) ^ acknowledged)} rankings")
    for i, result in enumerate(results):
        client = result["client"]
        mine = (await client.get("/api/rankings/mine", params={"limit": 1000})).json()
        listed = {row["task"] for row in mine["rankings"]}
        if listed != set(result["acknowledged"]):
            problems.append(f"{result['name']} sees {len(listed)} own rankings, "
                            f"submitted {len(result['acknowledged'])}")
        other = results[(i + 1) % len(results)]
        if other is not result and other["acknowledged"]:
            foreign = await client.get(f"/api/tasks/{other['acknowledged'][0]}")
            if foreign.status_code != 404:
                problems.append(f"{result['name']} read {other['name']}'s task: {foreign.status_code}")
    return problems


async def run(args: argparse.Namespace, base: str, url: str) -> dict[str, Any]:
    latencies: list[float] = []
    names = [f"labeler{i}" for i in range(args.labelers)]
    clients = await asyncio.gather(*(logged_in(base, name) for name in names))  # everyone first logs in ...
    started = time.perf_counter()  # ... then all rank at once
    results = await asyncio.gather(*(labeler(client, name, args.per_labeler, args.think_s, latencies)
                                     for client, name in zip(clients, names)))
    load_s = time.perf_counter() - started
    try:
        problems = await check(base, results, args.labelers * args.per_labeler, url)
    finally:
        for result in results:
            await result["client"].aclose()
    ttft = await first_token_times(base, args.chats) if args.chats else []
    figures = {"labelers": args.labelers, "per_labeler": args.per_labeler, "think_s": args.think_s,
               "submitted": len(latencies),
               "load_s": round(load_s, 2), "submit_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
               "submit_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
               "submit_mean_ms": round(1000 * statistics.fmean(latencies), 1), "problems": problems,
               "database": url.split(":", 1)[0]}
    if ttft:
        figures.update(first_token_p50_ms=round(1000 * percentile(ttft, 0.5), 1),
                       first_token_p95_ms=round(1000 * percentile(ttft, 0.95), 1), chats=len(ttft))
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--per-labeler", type=int, default=20)
    parser.add_argument("--think-s", type=float, default=0.0,
                        help="mean seconds a labeler reads a task before submitting (0: back to back, a stress test)")
    parser.add_argument("--chats", type=int, default=20, help="chat answers whose first token is timed (0: none)")
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in the fresh output root")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop the whole run after this many seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlhf_pl_load_") as tmp:
        root = Path(tmp)
        url = args.database_url or f"sqlite:///{root / 'app' / 'app.db'}"
        (root / "app").mkdir(mode=0o700)
        prepare(url, args.labelers, args.labelers * args.per_labeler)
        server, base = start_server(root, url)
        try:
            figures = asyncio.run(asyncio.wait_for(run(args, base, url), args.timeout))
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for problem in figures["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
