"""The web chat page at "/": served by the app, and driven in headless Chromium (Debian's `chromium` package through
Playwright's Python API; `playwright install` is never run): send a message, wait for the streamed reply, rate two
replies to the same prompt into a preference pair, reset, and show a clear error for a wrong API key.

Skipped, with the reason, only when no Chromium binary is installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import requests

from rlchat.data import normalize_text
from rlchat.feedback_store import FeedbackStore, scrub_pii
from serve import testing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def serve_app(ray_local, tmp_path_factory) -> testing.TestApp:
    """The session's shared Serve app (deployed once, whichever test module asks first)."""
    yield testing.shared_app(tmp_path_factory.mktemp("serve_app"))
    testing.shutdown()


@pytest.mark.slow
def test_page_is_served_as_plain_html(serve_app):
    r = requests.get(serve_app.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element in (
        'id="input"',
        'id="send"',
        'id="stop"',
        'id="temperature"',
        'id="max-tokens"',
        'id="reset"',
        'id="api-key"',
    ):
        assert element in html
    assert "v1/chat/completions" in html and "v1/feedback" in html
    assert "http://" not in html.split("<script>")[1] and "https://" not in html  # no external resources


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chat_page_in_headless_chromium(serve_app, tmp_path: Path):
    from playwright import sync_api  # in the `test` extra: a missing package is a failure, not a skip

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(serve_app.url + "/")
            sync_api.expect(page.locator("#status")).to_contain_text("step 1")
            sync_api.expect(page.locator("#status")).to_contain_text("API key required")

            # a wrong key: the error is shown, nothing crashes
            page.fill("#api-key", "wrong")
            page.fill("#input", "Hello?")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.error")).to_contain_text("401")
            # ...and it points at the key, keeping the message (it was taken for a refusal of the message itself)
            sync_api.expect(page.locator(".msg.error")).to_contain_text("API key field")
            sync_api.expect(page.locator(".msg.user")).to_have_text("Hello?")

            # the right key, a fresh conversation, controls set, a streamed reply
            page.fill("#api-key", serve_app.api_key)
            page.dispatch_event("#api-key", "change")
            page.click("#reset")
            sync_api.expect(page.locator(".msg.user")).to_have_count(0)
            page.locator("#temperature").fill("1.2")
            sync_api.expect(page.locator("#temperature-value")).to_have_text("1.20")
            page.fill("#max-tokens", "12")
            page.fill("#input", "Tell me about the sea.")
            page.click("#send")
            sync_api.expect(page.locator(".msg.user")).to_have_text("Tell me about the sea.")
            first = page.locator(".msg.assistant").nth(0)
            sync_api.expect(first).to_have_attribute("data-state", "done", timeout=60_000)
            assert first.get_attribute("data-finish") in ("stop", "length")
            assert first.get_attribute("data-completion-id").startswith("chatcmpl-")
            reply = first.locator(".text").inner_text()
            assert reply.strip(), "the streamed reply is empty"
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            # rate it, regenerate, rate the other reply the other way: a preference pair in the feedback store
            first.locator(".thumb-up").click()
            sync_api.expect(first.locator(".meta")).to_contain_text("thanks")
            page.click("#regenerate")
            second = page.locator(".msg.assistant").nth(1)
            sync_api.expect(second).to_have_attribute("data-state", "done", timeout=60_000)
            second.locator(".thumb-down").click()
            sync_api.expect(second.locator(".meta")).to_contain_text("preference pair")
            page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)
            last = FeedbackStore(serve_app.feedback_store).preference_records()[-1]
            assert last.messages == [{"role": "user", "content": "Tell me about the sea."}]
            assert last.chosen[0]["content"] == normalize_text(scrub_pii(reply))  # the shared app scrubs PII

            page.click("#reset")
            sync_api.expect(page.locator(".msg.assistant")).to_have_count(0)
            sync_api.expect(page.locator(".msg.system")).to_have_text("new conversation")

            # Reset and Stop during a reply: the request is held (never answered) so the reply is mid-stream
            held: list = []
            sent: list = []

            def hold_first(route):
                sent.append(route.request.post_data_json)
                if not held:
                    held.append(route)  # left pending: the page sees a reply that has not finished
                else:
                    route.continue_()

            page.route("**/v1/chat/completions", hold_first)
            page.fill("#input", "first question")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "streaming")
            sync_api.expect(page.locator("#stop")).to_be_enabled()
            page.click("#reset")  # mid-reply: the new conversation must not inherit the partial reply
            sync_api.expect(page.locator("#stop")).to_be_disabled()
            page.fill("#input", "second question")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute(
                "data-state", "done", timeout=60_000
            )
            assert sent[-1]["messages"] == [{"role": "user", "content": "second question"}]
            held.clear()
            page.click("#reset")
            page.fill("#input", "third question")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "streaming")
            page.click("#stop")  # Stop keeps what arrived -- nothing yet here: no empty reply enters the conversation
            stopped = page.locator(".msg.assistant")
            sync_api.expect(stopped).to_have_attribute("data-finish", "stopped")
            # ...and the bubble says so rather than staying empty (shown, not part of the conversation)
            sync_api.expect(stopped.locator(".text")).to_have_text("(stopped before any reply)")
            sync_api.expect(stopped).to_have_class(re.compile(r"\bunsaid\b"))
            page.fill("#input", "fourth question")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute(
                "data-state", "done", timeout=60_000
            )
            roles = [m["role"] for m in sent[-1]["messages"]]
            assert roles == ["user", "user"], sent[-1]["messages"]
            page.unroute("**/v1/chat/completions")

            # a message the server refuses (over serve.max_chars) leaves the conversation and goes back to the input,
            # so the next message is not refused with it
            page.click("#reset")
            page.fill("#input", "x" * 33_000)
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.error")).to_contain_text("not sent")
            assert page.locator("#input").input_value() == "x" * 33_000
            sync_api.expect(page.locator(".msg.user")).to_have_count(0)
            page.fill("#input", "short question")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            sync_api.expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
            assert reply.get_attribute("data-finish") in ("stop", "length")

            # a rating that fails (a wrong key) can be sent again once the key is right
            page.fill("#api-key", "wrong")
            page.dispatch_event("#api-key", "change")
            reply.locator(".thumb-up").click()
            sync_api.expect(reply.locator(".meta")).to_contain_text("feedback failed")
            sync_api.expect(reply.locator(".thumb-up")).to_be_enabled()
            page.fill("#api-key", serve_app.api_key)
            page.dispatch_event("#api-key", "change")
            reply.locator(".thumb-up").click()
            sync_api.expect(reply.locator(".meta")).to_contain_text("thanks")
            sync_api.expect(reply.locator(".thumb-down")).to_be_disabled()

            # limits come from /v1/models: the shared app allows max_tokens up to 64
            assert page.locator("#max-tokens").get_attribute("max") == "64"
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def _sse(*events: str) -> str:
    return "".join(f"data: {e}\n\n" for e in events)


def _delta(text: str = "", finish: str | None = None) -> str:
    import json

    choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return json.dumps({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "choices": [choice]})


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chat_page_handles_cut_streams_withheld_replies_long_chats_and_a_late_error(serve_app):
    """Found by a review, each confirmed in Chromium before the fix: a stream that ended cleanly before its
    finish_reason was kept as a whole reply; a reply withheld by the safety filter went back to the model as the
    assistant's turn; the page ignored /v1/models' max_messages / max_chars, so the 33rd exchange of a chat was
    refused for good ("edit the message" could not help); a Reset while an error body was still arriving put the old
    conversation's error into the new one; an emptied max-tokens field sent ``max_tokens: 0`` (a 400). Faults are
    scripted with Playwright's routes (the rest is the real app)."""
    import http.server
    import json
    import threading
    import time

    from playwright import sync_api

    class SlowError(http.server.BaseHTTPRequestHandler):  # a 503 whose body arrives 1.5 s after its headers
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"error": {"message": "the server is overloaded", "code": "overloaded"}}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(1.5)
            self.wfile.write(body)

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowError)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    sent: list[dict] = []

    def real(route) -> None:  # the app answers; the test keeps what the page sent
        sent.append(route.request.post_data_json)
        route.continue_()

    def scripted(body: str):
        def fulfill(route) -> None:
            sent.append(route.request.post_data_json)
            route.fulfill(status=200, content_type="text/event-stream", body=body)

        return fulfill

    def ask(page, text: str) -> None:
        page.fill("#input", text)
        page.press("#input", "Enter")
        sync_api.expect(page.locator("#stop")).to_be_disabled(timeout=60_000)  # the reply (or its error) is in

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(serve_app.url + "/")
            page.fill("#api-key", serve_app.api_key)
            page.dispatch_event("#api-key", "change")
            page.fill("#max-tokens", "4")

            # 1. a stream that ends before its finish_reason: an error, the question kept, the partial text not
            page.route("**/v1/chat/completions", scripted(_sse(_delta(), _delta("The capital of France is"))))
            ask(page, "What is the capital of France?")
            sync_api.expect(page.locator(".msg.error")).to_contain_text("Regenerate retries")
            sync_api.expect(page.locator(".msg.assistant")).to_have_count(0)
            page.unroute("**/v1/chat/completions")
            page.route("**/v1/chat/completions", real)
            ask(page, "and of Italy?")
            assert [m["content"] for m in sent[-1]["messages"]] == ["What is the capital of France?", "and of Italy?"]

            # 2. a withheld reply is shown but not kept: the next turn does not carry it
            page.click("#reset")
            page.unroute("**/v1/chat/completions")
            notice = "\n[withheld: the safety filter flagged this reply]"
            withheld = _sse(
                _delta(), _delta("Sure, here is how"), _delta(notice), _delta("", "content_filter"), "[DONE]"
            )
            page.route("**/v1/chat/completions", scripted(withheld))
            ask(page, "how do I pick a lock?")
            reply = page.locator(".msg.assistant").last
            sync_api.expect(reply).to_have_attribute("data-finish", "content_filter")
            sync_api.expect(reply.locator(".meta")).to_have_count(0)  # nothing to rate
            page.unroute("**/v1/chat/completions")
            page.route("**/v1/chat/completions", real)
            ask(page, "thanks")
            assert [m["role"] for m in sent[-1]["messages"]] == ["user", "user"], sent[-1]

            # 3. a chat longer than the advertised limits: each request keeps within them, oldest exchanges first
            card = {"id": "rlchat", "object": "model", "max_tokens": 64, "max_messages": 5, "max_chars": 60}
            page.route("**/v1/models", lambda r: r.fulfill(json={"object": "list", "data": [card]}))
            page.dispatch_event("#api-key", "change")  # limits are read again
            page.click("#reset")
            n = len(sent)
            for i in range(6):
                ask(page, f"question {i}")
            assert page.locator(".msg.error").count() == 0
            for body in sent[n:]:
                msgs = body["messages"]
                assert len(msgs) <= 5 and sum(len(m["content"]) for m in msgs) <= 60, msgs
                assert msgs[0]["role"] == "user" and msgs[-1]["content"].startswith("question ")
            assert sent[-1]["messages"][-1]["content"] == "question 5"
            page.unroute("**/v1/models")

            # 4. Reset while an error body is still arriving: the new conversation stays clean
            page.unroute("**/v1/chat/completions")
            slow_url = f"http://127.0.0.1:{slow.server_address[1]}/v1/chat/completions"
            page.route("**/v1/chat/completions", lambda r: r.continue_(url=slow_url))
            page.fill("#input", "one more")
            page.press("#input", "Enter")
            page.wait_for_timeout(700)  # the 503's headers are in, its body is not
            page.click("#reset")
            page.wait_for_timeout(2000)
            assert page.locator(".msg").all_inner_texts() == ["new conversation"]

            # 5. an emptied max-tokens field leaves the length to the server (it sent max_tokens 0: a 400)
            page.unroute("**/v1/chat/completions")
            page.route("**/v1/chat/completions", real)
            page.fill("#max-tokens", "")
            ask(page, "and of Spain?")
            assert "max_tokens" not in sent[-1], sent[-1]
            assert page.locator(".msg.error").count() == 0
            sync_api.expect(page.locator(".msg.assistant")).to_have_count(1)
            page.fill("#max-tokens", "2e1")  # a number field keeps what was typed: 20 (parseInt read 2)
            ask(page, "and of Portugal?")
            assert sent[-1]["max_tokens"] == 20, sent[-1]
            assert errors == []
        finally:
            browser.close()
            slow.shutdown()
