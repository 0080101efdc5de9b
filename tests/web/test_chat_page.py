"""The web chat page at GET /, in real headless Chromium against a real server on the embedded model."""
from __future__ import annotations

import json
import os
import re
import time

import httpx

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts")
# Records every distinct text the last answer showed while it streamed.
RECORD_SNAPSHOTS = """() => {
  window.snapshots = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('.msg.assistant .content');
    const text = answers.length ? answers[answers.length - 1].textContent : '';
    if (text && text !== window.snapshots[window.snapshots.length - 1]) window.snapshots.push(text);
  }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
}"""


def set_max_tokens(page, value: int) -> None:
    if page.locator("#settings").is_hidden():
        page.get_by_role("button", name="Settings").click()
    page.get_by_label("Max tokens").fill(str(value))


def send(page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def wait_for_answer(page, count: int = 1) -> None:
    """Waits until `count` answers are finished (stats or an error shown, nothing streaming)."""
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant').length === n && !document.querySelector('.msg.streaming')"
        " && !document.querySelector('#stop:not([hidden])')",
        arg=count,
    )


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_served_at_root_with_its_assets(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    assert httpx.get(server.url + "/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/static/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(server.url + "/static/../app.py").status_code == 404
    assert httpx.get(server.url + "/static/missing.js").status_code == 404
    # POST / stays TGI's (and the Qwen demo's) generate route, with TGI's error shape.
    r = httpx.post(server.url + "/", json={"text": "neither shape"})
    assert r.status_code == 422 and "inputs" in r.json()["error"]


def test_model_list_comes_from_server(page, server):
    served = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    options = page.locator("#model option").evaluate_all("options => options.map(o => o.value)")
    assert options == served == ["smollm2"]
    assert page.get_by_label("Model").input_value() == "smollm2"


def test_streamed_answer_survives_reload(page):
    set_max_tokens(page, 48)
    page.evaluate(RECORD_SNAPSHOTS)
    send(page, "Write a Python function that adds two numbers.")
    page.wait_for_selector(".msg.streaming")  # the Stop button is up while the answer streams
    assert page.get_by_role("button", name="Stop generating").is_visible()
    wait_for_answer(page)

    answer = page.locator(".msg.assistant .content").inner_text()
    snapshots = page.evaluate("window.snapshots")
    assert len(snapshots) >= 3, snapshots  # the answer grew in steps, not all at once
    # Markdown is re-rendered as text arrives (a code fence opens, `**` closes), so only the length is checked.
    assert len(snapshots[0]) < len(snapshots[-1]) and snapshots[-1] == page.locator(".msg.assistant .content").text_content()
    stats = page.locator(".msg.assistant .stats").inner_text()
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · TTFT [\d.]+ s( · hit max tokens)?", stats), stats
    assert int(stats.split()[0]) <= 48
    assert page.get_by_role("button", name="Send").is_visible()
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "chat.png"))

    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .content").inner_text() == "Write a Python function that adds two numbers."
    assert page.locator(".msg.assistant .content").inner_text() == answer
    assert page.locator(".msg.assistant .stats").inner_text() == stats
    assert page.locator("#conversation-list li").count() == 1
    assert page.get_by_role("button", name="Open conversation: Write a Python function that adds two numbers.").is_visible()
    assert page.get_by_label("Max tokens").input_value() == "48"  # settings survive too

    page.get_by_role("button", name="New conversation").click()
    assert page.locator(".msg").count() == 0
    page.get_by_role("button", name="Open conversation: Write a Python function that adds two numbers.").click()
    assert page.locator(".msg.assistant .content").inner_text() == answer


def test_stop_aborts_the_request_on_the_server(page, server):
    set_max_tokens(page, 600)
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .content')?.textContent || '').length > 20")
    assert server.metric("ember:num_requests_running") == 1
    page.get_by_role("button", name="Stop generating").click()
    wait_for_answer(page)

    stats = page.locator(".msg.assistant .stats").inner_text()
    assert stats.endswith("· stopped"), stats
    assert int(stats.split()[0]) < 600
    assert wait_until(lambda: server.metric("ember:num_requests_running") == 0), server.log()
    assert page.locator(".msg.assistant .error").count() == 0
    shown = page.locator(".msg.assistant .content").inner_text()
    time.sleep(1)
    assert page.locator(".msg.assistant .content").inner_text() == shown  # nothing arrives after Stop


def test_server_error_is_shown(page):
    set_max_tokens(page, 5000)  # beyond the 1024-token context
    send(page, "Hello")
    wait_for_answer(page)
    error = page.get_by_role("alert")
    assert "400" in error.inner_text() and "maximum context length is 1024 tokens" in error.inner_text()
    assert page.locator(".msg.assistant .content").count() == 0

    set_max_tokens(page, 4)  # regenerating with a valid setting replaces the error with an answer
    page.get_by_role("button", name="Regenerate answer").click()
    wait_for_answer(page)
    assert page.get_by_role("alert").count() == 0
    assert page.locator(".msg.assistant .stats").inner_text().startswith(("1 tokens", "2 tokens", "3 tokens", "4 tokens"))


def test_edit_and_resend(page):
    set_max_tokens(page, 4)
    send(page, "Hello")
    wait_for_answer(page)
    page.get_by_role("button", name="Edit message").click()
    page.get_by_label("Edit message").fill("What is 2 + 2?")
    page.get_by_role("button", name="Save and send").click()
    wait_for_answer(page)
    assert page.locator(".msg.user .content").all_inner_texts() == ["What is 2 + 2?"]
    assert page.locator(".msg.assistant").count() == 1


STORED = {
    "id": "c1", "title": "Lists and code", "updatedAt": 0, "messages": [
        {"role": "user", "content": "Show me a list and some code."},
        {"role": "assistant", "model": "smollm2", "content": "## Steps\n1. First *step*\n2. Second with `code`\n\n```js\nconsole.log('<hi>');\n```",
         "stats": {"num_tokens": 30, "ttft_s": 0.25, "tokens_per_s": 12.5, "finish_reason": "stop", "temperature": 0.7, "top_p": 0.95, "max_tokens": 64}},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "model": "smollm2", "content": "", "error": "400 Bad Request: something went wrong"},
    ],
}


def test_keyboard_and_narrow_screen(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.add_init_script(f"localStorage.setItem('ember.conversations', JSON.stringify([{json.dumps(STORED)}]));"
                         "localStorage.setItem('ember.current', JSON.stringify('c1'));")
    page.goto(server.url + "/")
    assert page.locator(".msg.assistant h3").inner_text() == "Steps"
    assert page.locator(".msg.assistant li").all_inner_texts() == ["First step", "Second with code"]
    assert page.locator(".msg.assistant pre").inner_text() == "console.log('<hi>');"
    assert page.locator(".msg.assistant .stats").inner_text() == "30 tokens · 12.5 tok/s · TTFT 0.25 s"
    assert page.get_by_role("alert").inner_text() == "Error: 400 Bad Request: something went wrong"
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "chat-narrow.png"))
    page.get_by_role("button", name="Copy code").click()
    # the label changes once the asynchronous clipboard write has finished, so wait for it
    page.wait_for_function("() => document.querySelector('.msg.assistant .copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == "console.log('<hi>');"
    box = page.get_by_label("Message", exact=True)
    box.press("a")
    box.press("Shift+Enter")
    box.press("b")
    assert box.input_value() == "a\nb" and page.locator(".msg").count() == 4  # Shift+Enter is a new line

    sidebar = page.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # off screen
    assert page.locator("#composer").bounding_box()["width"] <= 390
    page.get_by_role("button", name="Show conversations").click()
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    assert page.get_by_role("button", name="Show conversations").get_attribute("aria-expanded") == "true"
    page.screenshot(path=os.path.join(ARTIFACTS, "chat-narrow-sidebar.png"))
    page.get_by_role("button", name="Open conversation: Lists and code").click()  # picking one closes the sidebar
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    page.get_by_role("button", name="Show conversations").click()
    page.keyboard.press("Escape")  # and so does Escape
    assert page.get_by_role("button", name="Show conversations").get_attribute("aria-expanded") == "false"
    context.close()


def test_markdown_escapes_html(page):
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **bold** `<b>`\\n```python\\nprint(\"<script>\")\\n```')")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>&lt;b&gt;</code>" in html
    assert '<pre><code>print(&quot;&lt;script&gt;&quot;)</code></pre>' in html
    assert 'aria-label="Copy code"' in html
    links = page.evaluate("renderMarkdown('[a](javascript:alert(1)) [b](https://example.com/?q=\"x\")')")
    assert "javascript:" not in links.replace("[a](javascript:alert(1))", "")
    assert 'href="https://example.com/?q=&quot;x&quot;"' in links
