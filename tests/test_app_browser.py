"""The feedback app in a real Chromium (Debian's package, driven by Playwright): log in, chat with a
streamed answer, write a demonstration from an edited suggestion, rank K = 4 completions with a tie
by drag and drop, and an admin's export that trains the reward model. Model and user text that
looks like markup is shown as text."""
from __future__ import annotations

import json

from app_helpers import PASSWORD
from browser_helpers import browser, live_app, log_in, page  # noqa: F401
from sqlalchemy import select

from rlhf_pl.app.db import Conversation, Message

SCRIPT = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"


def _messages(harness, kind: str) -> list[Message]:
    with harness.db.sessions() as session:
        return list(session.scalars(select(Message).join(Conversation).where(Conversation.kind == kind)
                                    .order_by(Message.position, Message.alternative)))


def test_login_refuses_a_wrong_password_then_logs_in_and_out(live_app, page):  # noqa: F811
    live_app.harness.add_user("ada", "labeler")
    page.goto(f"{live_app.url}/rank")  # every page but login needs a session
    assert "/login" in page.url
    page.fill("#username", "ada")
    page.fill("#password", PASSWORD + "x")
    page.click("#login-button")
    assert page.inner_text("#login-error") == "wrong username or password"
    log_in(page, live_app.url, "ada")
    assert "ada (labeler)" in page.inner_text("header")
    assert page.locator("nav a", has_text="Admin").count() == 0  # a labeler sees no admin page
    cookie = next(c for c in page.context.cookies() if c["name"] == "rlhf_pl_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.click("header button:has-text('Log out')")
    page.wait_for_url(f"{live_app.url}/login")
    page.goto(f"{live_app.url}/chat")
    assert "/login" in page.url
    assert page.js_errors == []


def test_chat_streams_the_answer_keeps_regenerations_rates_and_shows_markup_as_text(live_app, page):  # noqa: F811
    live_app.harness.add_user("ada", "labeler")
    log_in(page, live_app.url, "ada")
    # record every length the streaming answer's text goes through
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const live = document.querySelector('[data-testid="streaming"] [data-testid="message-text"]');
            if (live) window.lengths.push(live.textContent.length);
        }).observe(document.getElementById('chat-messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input", SCRIPT)
    page.click("#chat-send")
    answer = page.locator('[data-testid="message"][data-role="assistant"] [data-testid="message-text"]')
    answer.first.wait_for()
    page.locator('[data-testid="streaming"]').wait_for(state="detached")
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths)  # it grew piece by piece while streaming
    stored = _messages(live_app.harness, "chat")
    assert [m.role for m in stored] == ["user", "assistant"] and stored[0].content == SCRIPT
    assert answer.first.inner_text() == stored[1].content
    user_text = page.locator('[data-testid="message"][data-role="user"] [data-testid="message-text"]')
    assert user_text.first.inner_text() == SCRIPT  # shown as text ...
    assert page.evaluate("window.pwned") is None  # ... and never run

    page.click('[data-testid="regenerate"]')
    page.locator('[data-testid="alt-label"]', has_text="2/2").wait_for()
    page.locator('[data-testid="streaming"]').wait_for(state="detached")
    page.fill('[data-testid="rate-reason"]', "made up")
    page.click('[data-testid="rate-down"]')
    page.locator('[data-testid="rate-down"][aria-pressed="true"]').wait_for()
    stored = _messages(live_app.harness, "chat")
    assert [(m.position, m.alternative, m.selected) for m in stored if m.role == "assistant"] == [
        (1, 0, False), (1, 1, True)]  # the first answer is kept
    with live_app.harness.db.sessions() as session:
        from rlhf_pl.app.db import Rating

        rating = session.scalars(select(Rating)).one()
    assert (rating.value, rating.reason, rating.message_id) == (-1, "made up", stored[-1].id)
    assert page.js_errors == []


def test_a_demonstration_starts_from_an_inserted_suggestion_and_records_the_edit(live_app, page):  # noqa: F811
    live_app.harness.add_user("ada", "labeler")
    log_in(page, live_app.url, "ada")
    page.goto(f"{live_app.url}/write")
    page.click("#add-user")
    page.fill('[data-testid="turn-0"]', "What is 2 plus 3?")
    page.click("#add-assistant")
    page.fill("#suggest-k", "2")
    page.click('[data-testid="suggest-1"]')
    suggestion = page.locator('[data-testid="suggestion-1-0"]')
    suggestion.wait_for()
    assert page.locator('[data-testid="suggestion-1-1"]').count() == 1  # k = 2 suggestions
    suggested = suggestion.inner_text()
    page.click('[data-testid="insert-1-0"]')
    assert page.input_value('[data-testid="turn-1"]') == suggested
    page.fill('[data-testid="turn-1"]', suggested + " 5.")  # the trainer edits it: 3 characters added
    page.click("#save-demo")
    page.locator('[data-testid="provenance-1"]', has_text="from suggestion, 3 chars edited").wait_for()
    stored = _messages(live_app.harness, "demonstration")
    assert [(m.role, m.source) for m in stored] == [("user", "human"), ("assistant", "suggestion")]
    assert (stored[1].suggestion, stored[1].content, stored[1].edit_distance) == (suggested, suggested + " 5.", 3)
    assert page.js_errors == []


def _ranking_task(harness, completions: list[str]) -> str:
    from rlhf_pl.app.tasks import add_tasks

    with harness.db.transaction() as session:
        add_tasks(session, [{"id": "task-1", "prompt": [{"role": "user", "content": "Name a colour."}],
                             "completions": completions, "meta": {"origin": "test"}}],
                  queue="browser", overlap=1, source="collect")
    return "task-1"


def test_rank_four_completions_with_a_tie_by_drag_and_drop_then_export_trains_the_reward_model(
        live_app, page, tmp_path):  # noqa: F811
    import subprocess
    import sys

    live_app.harness.add_user("ada", "labeler")
    live_app.harness.add_user("root", "admin")
    completions = ["Blue.", "Red.", SCRIPT, "Green is a colour."]
    _ranking_task(live_app.harness, completions)
    log_in(page, live_app.url, "ada")
    page.goto(f"{live_app.url}/rank")
    items = page.locator('[data-testid^="completion-"]')
    items.first.wait_for()
    assert items.count() == 4
    assert page.locator('[data-testid="completion-2"]').inner_text().find(SCRIPT) >= 0  # markup shown as text
    assert page.evaluate("window.pwned") is None
    # the order the page starts with is 0, 1, 2, 3 (one group each); make it 3 > {0, 1} > 2:
    page.locator('[data-testid="completion-3"]').drag_to(page.locator('[data-testid="gap-0"]'))  # 3 to the top
    page.locator('[data-testid="completion-1"]').drag_to(page.locator('[data-testid="completion-0"]'))  # tie 1 with 0
    groups = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="group-"]')].map(g =>
        [...g.querySelectorAll('[data-testid^="completion-"]')].map(c => Number(c.dataset.testid.split('-')[1])))""")
    assert [sorted(g) for g in groups] == [[3], [0, 1], [2]]
    page.click('[data-testid="submit-ranking"]')
    page.locator('[data-testid="no-task"]').wait_for()  # the task is done and nothing else waits
    with live_app.harness.db.sessions() as session:
        from rlhf_pl.app.db import RankingRecord

        record = session.scalars(select(RankingRecord)).one()
    assert [sorted(g) for g in record.ranking] == [[3], [0, 1], [2]] and not record.all_bad
    assert page.js_errors == []

    page.click("header button:has-text('Log out')")
    page.wait_for_url(f"{live_app.url}/login")
    log_in(page, live_app.url, "root")
    page.goto(f"{live_app.url}/admin")
    page.click("#tab-export")
    with page.expect_download() as download:
        page.click("#export-rankings-per-labeler")
    path = tmp_path / "rankings.jsonl"
    download.value.save_as(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == 1 and records[0]["completions"] == completions
    # 12 copies: enough rows for the quick reward model's split (one record is a valid data set too)
    path.write_text("".join(json.dumps({**records[0], "copy": i}) + "\n" for i in range(12)))
    done = subprocess.run([sys.executable, "-m", "rlhf_pl", "+stage=rm", "experiment=quick",
                           f"data.comparisons={path}", f"paths.output_root={tmp_path / 'out'}",
                           "trainer.enable_progress_bar=false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "out").glob("runs/*/reward_model/config.json"))
