"""Fixtures for the web page tests: Debian's chromium (installed here when missing), driven by Playwright's
Python package, against a real `ember serve` process on the embedded model."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.server.conftest import EmberServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def _install_chromium() -> str | None:
    """Installs Debian's chromium package when it is missing; returns why it could not, or None."""
    if os.path.exists(CHROMIUM):
        return None
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh machine may have empty package lists
        subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.exists(CHROMIUM):
        return f"`apt-get install chromium` failed: {(result.stderr or result.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web tests need Playwright: pip install playwright")
    why_not = _install_chromium()
    if why_not:
        pytest.skip(f"the web tests need Debian's chromium at {CHROMIUM}: {why_not}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    """The embedded model served as `smollm2`, with a small context so a request can exceed it."""
    ember = EmberServer(
        "--max-model-len", "1024", "--kv-cache-memory-gib", "0.25",
        log_path=str(tmp_path_factory.mktemp("web") / "ember.log"),
    )
    yield ember
    ember.stop()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) with the chat page open."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)  # answers come from a small model on a shared CPU
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("#model option", state="attached")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
