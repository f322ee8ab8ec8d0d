"""mitmweb in a real headless browser: `make web`, two Claude Code requests through it, then Debian's
chromium (driven by Python playwright, pointed at it with executable_path: playwright cannot download
browsers here) opens the UI, reads the warmturn view of the warm flow and runs warmturn.export from the
command bar. Screenshots go to the test's directory (and to $WARMTURN_SCREENSHOTS when set).

Opt-in when a part is missing (chromium from apt, playwright from pip): skipped with the reason, or a
failure under `make test-browser` (WARMTURN_BROWSER_TESTS=1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES, free_port
from tests.procs import read_capture
from tests.test_scripts import BANNER, make, wait_until
from warmturn import rules

pytestmark = [pytest.mark.model, pytest.mark.browser]

TOKEN = "browser-test-token"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path, why = None, "Python playwright is not installed (make test-browser installs it)"
    else:
        why = "Debian's chromium is not installed (apt-get install chromium)"
    if path is None:
        if os.environ.get("WARMTURN_BROWSER_TESTS") == "1":
            pytest.fail(why)
        pytest.skip(f"opt-in browser test: {why}")
    return path


def claude_code_request() -> dict:
    """A real Claude Code 2.1.332 request as the client sent it (restored from its capture), shortened."""
    rec = json.loads((FIXTURES / "claude_code_2.1.332" / "p_small.jsonl").read_text().splitlines()[0])
    body = rules.restore(rec["request"]["body"], None, rec["stripped"])[0]
    return {**body, "max_tokens": 8}


def test_mitmweb_shows_the_warmturn_view_and_exports(tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    port, web_port = free_port(), free_port()
    cap, log = tmp_path / "cap.jsonl", tmp_path / "make.log"
    args = f"--set capture_file={cap} --set embedded_log={tmp_path}/server.log"
    shots = [tmp_path / "request.png", tmp_path / "response.png", tmp_path / "export.png"]
    with make("web", log, PORT=str(port), WEB_PORT=str(web_port), WEB_TOKEN=TOKEN, ARGS=args) as proc:
        wait_until(lambda: BANNER in log.read_text(), proc, log, 120)
        assert f"http://127.0.0.1:{web_port}/?token={TOKEN}" in log.read_text()
        for _ in range(2):  # the same request twice: the second is served from the prefix cache
            r = httpx.post(f"http://127.0.0.1:{port}/v1/messages?beta=true", json=claude_code_request(), timeout=600,
                           headers={"x-api-key": "local", "anthropic-version": "2023-06-01"})
            assert r.status_code == 200, r.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True,  # no GPU, no sandbox in containers
                                        args=["--no-sandbox", "--disable-gpu", "--no-zygote"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{web_port}/?token={TOKEN}")
            page.wait_for_selector("text=v1/messages", timeout=60_000)
            page.locator("text=v1/messages").last.click()
            view = page.locator("text=warmturn: messages").first
            view.wait_for(timeout=30_000)
            page.screenshot(path=str(shots[0]))
            request_text = page.inner_text("body")
            page.click("text=Response")
            page.locator("text=stop_reason").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots[1]))
            response_text = page.inner_text("body")
            page.click("nav >> text=Options")
            page.click("text=Display Command Bar")
            out = tmp_path / "export.jsonl"
            page.fill("input[placeholder='Enter command']", f"warmturn.export @all {out}")
            page.press("input[placeholder='Enter command']", "Enter")
            page.locator("text=appended 2 flows").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots[2]))
            browser.close()
    if os.environ.get("WARMTURN_SCREENSHOTS"):
        for s in shots:
            shutil.copy(s, Path(os.environ["WARMTURN_SCREENSHOTS"]) / s.name)
    warm = read_capture(cap)[-1]
    u = warm["usage"]
    prompt = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
    hit = 100 * u["cache_read_input_tokens"] // prompt
    for text in (request_text, response_text):
        assert "TTFT " in text and "queue wait" in text
        assert f"tokens: prompt {prompt} (cache read {u['cache_read_input_tokens']}, cache creation " in text
        assert f"hit {hit}%" in text and hit >= 90
        assert "normalized: system block 0" in text and "model name canonicalized" in text
    assert "stop_reason: max_tokens" in response_text
    assert len(read_capture(out)) == 2
