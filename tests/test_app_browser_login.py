"""In Chromium: the login page, a failed login, the session, logging out."""
from __future__ import annotations

from app_helpers import PASSWORD
from browser_helpers import browser, live_app, log_in, page  # noqa: F401


def test_login_refuses_a_wrong_password_then_logs_in_and_out(live_app, page):  # noqa: F811
    live_app.harness.add_user("ada", "labeler")
    page.goto(f"{live_app.url}/")  # every page but login needs a session
    assert "/login" in page.url
    page.fill("#username", "ada")
    page.fill("#password", PASSWORD + "x")
    page.click("#login-button")
    assert page.inner_text("#login-error") == "wrong username or password"
    log_in(page, live_app.url, "ada", landing="/")
    assert "ada (labeler)" in page.inner_text("header")
    assert page.locator("nav a", has_text="Admin").count() == 0  # a labeler sees no admin page
    cookie = next(c for c in page.context.cookies() if c["name"] == "rlhf_pl_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.click("header button:has-text('Log out')")
    page.wait_for_url(f"{live_app.url}/login")
    page.goto(f"{live_app.url}/")
    assert "/login" in page.url
    assert page.js_errors == []
