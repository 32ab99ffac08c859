"""The web console in a real browser: Playwright driving Debian's Chromium (never Playwright's
own browser download). Skipped, with the reason, when Playwright or Chromium is missing;
`.ci/run` installs Chromium with apt first.

Each test leaves a screenshot in test-artifacts/ (MDP_TEST_ARTIFACTS overrides). With
MDP_UPDATE_SCREENSHOTS=1 the job page test also rewrites docs/web-console.png, the README's.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.web.conftest import ARTIFACTS, Console, submit, wait_for_state

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')"
)
expect = playwright_api.expect
expect.set_options(timeout=30_000)  # the machine may be busy: wait for what must come

pytestmark = pytest.mark.timeout(180)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
README_SHOT = Path(__file__).parents[2] / "docs" / "web-console.png"


def chromium_path() -> str | None:
    """Debian's Chromium (MDP_TEST_CHROMIUM overrides)."""
    for candidate in (os.environ.get("MDP_TEST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run does it)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(
    browser: playwright_api.Browser, console: Console, request: pytest.FixtureRequest
) -> Iterator[playwright_api.Page]:
    """A signed-in page (through the URL mdp-web prints); screenshot saved after the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=console.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"/login?token={console.token}")
    expect(page).to_have_url(f"{console.url}/")
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        context.close()


@pytest.fixture
def http(console: Console) -> Iterator[object]:
    with console.client() as client:
        yield client


def test_dashboard_lists_a_registered_worker(page: playwright_api.Page) -> None:
    row = page.locator("table tr", has=page.locator("code", has_text="shell")).first
    expect(row).to_be_visible()
    workers = int(row.locator("td").nth(1).inner_text().strip())
    assert workers >= 1
    # Workers: from mmi.workers when the broker has it, else a note saying why not.
    expect(page.locator("#workers-h + *")).to_be_visible()
    # 360 px wide, dark mode: nothing sticks out sideways.
    page.emulate_media(color_scheme="dark")
    page.set_viewport_size({"width": 360, "height": 740})
    page.reload()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"  # the dark palette
    # The API page renders the OpenAPI document from files served here (no CDN).
    page.set_viewport_size({"width": 1100, "height": 760})
    page.goto("/api/v1/docs")
    expect(page.get_by_text("/api/v1/jobs/{job_id}/events")).to_be_visible()
    expect(page.get_by_role("button", name="Authorize")).to_be_visible()
    page.goto("/")


def test_run_form_shows_output_live_and_the_final_state(
    page: playwright_api.Page, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    page.goto("/run")
    page.select_option("#service", "shell")
    # Keyboard only: the command field has focus; Enter submits the form.
    expect(page.locator("#command_name")).to_be_focused()
    page.keyboard.type(
        f"for i in 1 2 3; do echo tick $i; done; while [ ! -e {go} ]; do sleep 0.05; done; "
        "echo tick 4; echo done >&2"
    )
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]+$"))
    output = page.locator("#output")
    # The first lines arrive while the command still runs (it waits for the file `go`).
    expect(output).to_contain_text("tick 3")
    expect(page.locator("#state")).to_have_text("running")
    assert "tick 4" not in output.inner_text()
    go.touch()
    expect(output).to_contain_text("tick 4")
    expect(page.locator("#state")).to_have_text("ok")
    expect(output.locator(".stderr")).to_have_text("done\n")
    expect(page.locator("#exit-code")).to_have_text("0")
    expect(page.locator("#cancel")).to_have_count(0)  # no cancel once it ended
    if os.environ.get("MDP_UPDATE_SCREENSHOTS"):
        page.screenshot(path=str(README_SHOT))


def test_cancel_kills_a_running_command(
    page: playwright_api.Page, http: object, console: Console
) -> None:
    job_id = submit(http, command_type="shell", command_name="echo started; exec sleep 60")  # type: ignore[arg-type]
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#output")).to_contain_text("started")
    page.locator("#cancel").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#state")).to_have_text("cancelled")
    job = wait_for_state(http, job_id, {"cancelled"})  # type: ignore[arg-type]
    assert job["finished"] - job["started"] < 30  # ended by the cancel, not by itself


def test_script_in_output_is_shown_as_text(page: playwright_api.Page, http: object) -> None:
    evil = '<script>document.title="pwned"</script><b>bold</b><img src=x onerror=alert(1)>'
    job_id = submit(http, command_type="os", command_name="echo", parameters=[evil])  # type: ignore[arg-type]
    page.goto(f"/jobs/{job_id}")
    output = page.locator("#output")
    expect(output).to_contain_text(evil)
    expect(page.locator("#state")).to_have_text("ok")
    assert output.locator("script, b, img").count() == 0
    assert page.locator("main img, main b").count() == 0
    assert "pwned" not in page.title()
    expect(page.locator(".facts")).to_contain_text(evil)  # the command line, too


def test_jobs_filter_by_state(page: playwright_api.Page, http: object) -> None:
    tag = uuid.uuid4().hex[:8]
    ok = submit(http, command_type="shell", command_name=f"echo ok-{tag}")  # type: ignore[arg-type]
    failed = submit(http, command_type="shell", command_name=f"echo failed-{tag}; exit 1")  # type: ignore[arg-type]
    wait_for_state(http, ok, {"ok"})  # type: ignore[arg-type]
    wait_for_state(http, failed, {"failed"})  # type: ignore[arg-type]
    page.goto("/jobs")
    expect(page.locator(f'a[href="/jobs/{ok}"]')).to_be_visible()
    page.select_option("#f-state", "failed")
    page.locator("#f-service").press("Enter")  # Enter in a field submits the filter form
    expect(page).to_have_url(re.compile(r"state=failed"))
    expect(page.locator(f'a[href="/jobs/{failed}"]')).to_be_visible()
    expect(page.locator(f'a[href="/jobs/{ok}"]')).to_have_count(0)
    for badge in page.locator("table.jobs .badge").all():
        expect(badge).to_have_text("failed")


def test_reload_resumes_a_running_jobs_output_without_duplicates(
    page: playwright_api.Page, http: object, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    job_id = submit(
        http,  # type: ignore[arg-type]
        command_type="shell",
        command_name=f"echo n1; echo n2; while [ ! -e {go} ]; do sleep 0.05; done; "
        "for i in 3 4 5 6; do echo n$i; sleep 0.1; done",
    )
    page.goto(f"/jobs/{job_id}")
    output = page.locator("#output")
    expect(output).to_contain_text("n2")
    page.reload()  # a new EventSource: stored chunks again, once, then the live ones
    expect(output).to_contain_text("n2")
    expect(page.locator("#state")).to_have_text("running")
    go.touch()
    expect(page.locator("#state")).to_have_text("ok")
    wait_until(lambda: output.get_attribute("data-done") == "true", timeout=10)
    assert output.inner_text().split() == [f"n{i}" for i in range(1, 7)]
