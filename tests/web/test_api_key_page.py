"""The web chat page against a server started with --api-key: a 401 brings up the key dialog, the key is kept in
localStorage and sent as a bearer token on every API call, and a call that answered 401 is retried."""
from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.server.conftest import EmberServer
from tests.web.test_chat_page import ARTIFACTS, send, set_max_tokens, wait_for_answer

KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    ember = EmberServer(
        "--max-model-len", "1024", "--kv-cache-memory-gib", "0.25", "--api-key", KEY,
        log_path=str(tmp_path_factory.mktemp("web-key") / "ember.log"),
    )
    yield ember
    ember.stop()


@pytest.fixture
def keyed_page(browser, keyed_server):
    """A fresh browser context (empty localStorage) on the page of the server that needs a key; nothing opened yet."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    console: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: console.append(message.text))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not [line for line in console if KEY in line], "the API key was written to the console"


def dialog(page):
    return page.get_by_role("dialog", name="API key", exact=True)


def save_key(page, key: str) -> None:
    page.locator("#api-key").fill(key)
    page.get_by_role("button", name="Save API key").click()


def wait_for_models(page) -> None:
    page.wait_for_selector("#model option[value='smollm2']", state="attached")


def stored_key(page):
    value = page.evaluate("localStorage.getItem('ember.apiKey')")
    return None if value is None else json.loads(value)


def test_asks_for_the_key_and_keeps_it(keyed_page, keyed_server):
    wrong = httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

    page = keyed_page
    page.goto(keyed_server.url + "/")
    dialog(page).wait_for()  # /v1/models answered 401
    assert "needs an API key" in dialog(page).inner_text()
    assert page.locator("#api-key").get_attribute("type") == "password"
    assert page.locator("#api-key-error").is_hidden()  # no key was sent, so none was wrong
    assert page.locator("#model option").count() == 0  # the model list waits for the key

    save_key(page, "wrong-key")
    page.locator("#api-key-error").wait_for()  # the retry answered 401 again: asked again, with the server's message
    assert dialog(page).is_visible()
    error = page.locator("#api-key-error").inner_text()
    assert "401" in error and wrong.json()["error"]["message"] in error, error
    assert page.locator("#api-key").input_value() == ""
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "chat-api-key.png"))

    save_key(page, KEY)
    wait_for_models(page)
    assert dialog(page).is_hidden()
    assert page.locator(".banner").count() == 0
    assert page.get_by_label("Model").input_value() == "smollm2"
    assert stored_key(page) == KEY
    assert page.get_by_role("button", name="API key", exact=True).is_visible()  # to change or forget it later

    set_max_tokens(page, 4)
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Hello")
    wait_for_answer(page)
    assert request.value.all_headers()["authorization"] == f"Bearer {KEY}"
    assert page.locator(".msg.assistant .error").count() == 0
    assert page.locator(".msg.assistant .stats").inner_text().startswith(("1 tokens", "2 tokens", "3 tokens", "4 tokens"))

    page.reload()
    wait_for_models(page)  # with the stored key: no dialog
    assert dialog(page).is_hidden()
    assert page.locator(".msg.assistant").count() == 1


def test_wrong_stored_key_cancel_forget_and_retry(keyed_page, keyed_server):
    page = keyed_page
    page.goto(keyed_server.url + "/")
    dialog(page).wait_for()
    page.evaluate("localStorage.setItem('ember.apiKey', JSON.stringify('stale-key'))")
    page.reload()
    page.locator("#api-key-error").wait_for()  # the stored key was sent and refused
    assert "not accepted" in page.locator("#api-key-error").inner_text()

    page.get_by_role("button", name="Cancel", exact=True).click()  # dismissed: the call fails as it stands
    assert dialog(page).is_hidden()
    banner = page.locator(".banner.error")
    banner.wait_for()
    assert banner.inner_text().startswith("Could not load the model list: 401")

    page.get_by_role("button", name="API key", exact=True).click()
    assert dialog(page).is_visible()
    page.get_by_role("button", name="Forget API key").click()
    assert dialog(page).is_hidden() and stored_key(page) is None

    page.get_by_role("button", name="API key", exact=True).click()
    assert page.get_by_role("button", name="Forget API key").is_hidden()  # nothing stored to forget
    page.keyboard.press("Escape")
    assert dialog(page).is_hidden()
    page.get_by_role("button", name="API key", exact=True).click()  # Escape left the dialog ready to open again
    save_key(page, KEY)
    wait_for_models(page)  # a key saved from the header reloads the model list
    assert page.locator(".banner").count() == 0

    # The key changes under a loaded page: the chat request answers 401, asks, and is sent again with the new key.
    page.evaluate("localStorage.setItem('ember.apiKey', JSON.stringify('rotated-away'))")
    set_max_tokens(page, 4)
    send(page, "Hello")
    page.locator("#api-key-error").wait_for()
    save_key(page, KEY)
    wait_for_answer(page)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant .error").count() == 0
    assert page.locator(".msg.assistant .stats").count() == 1


def test_no_dialog_without_a_key(page):
    """A server started without --api-key never asks (the `page` fixture has loaded the model list)."""
    assert dialog(page).is_hidden()
    assert page.get_by_role("button", name="API key", exact=True).is_hidden()
    assert page.evaluate("localStorage.getItem('ember.apiKey')") is None
