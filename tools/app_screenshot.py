"""Screenshot of the feedback app's Rank page for the README (``docs/app_rank.png``).

    python tools/app_screenshot.py [--out docs/app_rank.png]

Makes a fresh SQLite database with one labeler and one ranking task (a multi-turn conversation
and four completions, written here), serves the app without a model on a free loopback port,
logs in, ties the two worst completions and moves one into second place in Debian's Chromium (Playwright),
and saves the screenshot.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

PASSWORD = "screenshot-password"
PROMPT = [
    {"role": "user", "content": "I'm baking bread tomorrow. How long should the dough rise?"},
    {"role": "assistant", "content": "For a basic white loaf, let it rise until it has doubled: usually 1 to 2 "
                                     "hours at room temperature."},
    {"role": "user", "content": "And if my kitchen is cold?"},
]
COMPLETIONS = [
    "Then it will take longer, often 3 hours or more. Put the bowl somewhere warm, like an oven with only the "
    "light on, and go by the size of the dough rather than the clock.",
    "Cold kitchens are bad for bread.",
    "It rises slower in the cold, so give it more time; a warm spot helps.",
    "Bread was first baked in ancient Egypt around 8000 BC.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "app_rank.png")
    args = parser.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from rlhf_pl.app.db import Database
    from rlhf_pl.app.security import create_user
    from rlhf_pl.app.server import AppSettings, create_app
    from rlhf_pl.app.tasks import add_tasks
    from rlhf_pl.stages.app import listen

    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'app.db'}")
        db.migrate()
        with db.transaction() as session:
            create_user(session, "ada", PASSWORD, "labeler")
            add_tasks(session, [{"id": "bread-1", "prompt": PROMPT, "completions": COMPLETIONS, "meta": {}}],
                      queue="collect round 1", overlap=2, source="collect")
        app = create_app(db, AppSettings(secret_key="s" * 64, policy="outputs/runs/…_ppo/policy"))
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(f"{base}/login")
            page.fill("#username", "ada")
            page.fill("#password", PASSWORD)
            page.click("#login-button")
            page.wait_for_url(f"{base}/chat**")
            page.goto(f"{base}/rank")
            page.locator('[data-testid="completion-0"]').wait_for()
            page.locator('[data-testid="completion-3"]').drag_to(page.locator('[data-testid="completion-1"]'))  # tie
            page.locator('[data-testid="completion-2"]').drag_to(page.locator('[data-testid="gap-1"]'))  # 2nd alone
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        server.should_exit = True
        thread.join(10)
        db.dispose()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
