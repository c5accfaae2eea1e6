"""The chat page at / in headless Chromium: type a message, see the reply stream in piece by piece."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from test_serve import CPU_MODEL, MODEL, running_server

from bitnet158.serve import create_app

sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium (.ci/run): there the test must run, not skip.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium on PATH (apt-get install chromium)"
)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server(create_app(CPU_MODEL, MODEL, max_batch=2)) as base:
        yield base


def test_chat_page_streams_the_reply(url):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            # Record the reply's text every time it changes, to see that it grew in several steps.
            page.evaluate("""() => {
                window.replySnapshots = [];
                new MutationObserver(() => {
                    const reply = document.querySelector('.assistant');
                    if (reply) window.replySnapshots.push(reply.textContent);
                }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#prompt", "Write a class for a stack.")
            page.click("#send")
            page.wait_for_function("() => !document.getElementById('send').disabled", timeout=120_000)
            reply = page.text_content(".assistant")
            user = page.text_content(".user")
            snapshots = page.evaluate("window.replySnapshots")
        finally:
            browser.close()
    assert user == "Write a class for a stack."
    assert reply and not reply.startswith("Error")
    growing = [s for s in dict.fromkeys(snapshots) if s]
    assert len(growing) >= 3 and growing[-1] == reply  # streamed in pieces, not in one go
