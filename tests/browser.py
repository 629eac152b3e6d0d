"""The chat page in a headless Chromium (Selenium and chromedriver), shared by the server tests."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def browser_or_skip(tmp_path):
    """A headless Chromium driven by Selenium through chromedriver, or a skip saying what is missing
    (a failure instead when OWL_JAX_REQUIRE_BROWSER=1, as in CI, so the test cannot silently not run)."""
    if os.environ.get("OWL_JAX_REQUIRE_BROWSER") == "1":
        skip = lambda why: pytest.fail(why + " (OWL_JAX_REQUIRE_BROWSER=1)")  # noqa: E731
    else:
        skip = pytest.skip
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip("the browser test needs the Python package selenium (pip install selenium)")
    find = lambda *names: next((p for n in names for p in [shutil.which(n)] if p), None)  # noqa: E731
    chromium = find("chromium", "chromium-browser", "google-chrome")
    driver_path = find("chromedriver")
    if chromium is None or driver_path is None:
        skip(
            "the browser test needs Chromium and chromedriver on PATH (Debian: apt-get install chromium "
            "chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # Naming the driver explicitly keeps Selenium Manager from looking for (or downloading) one.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def ask_in_page(browser, question: str, image=None, video=None) -> str:
    """Pick the files (if any), type `question`, send, and wait for the streamed answer; returns its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for element, path in (("image", image), ("video", video)):
        if path is not None:
            browser.find_element(By.ID, element).send_keys(str(path))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    n = len(browser.find_elements(By.CSS_SELECTOR, "#messages .user"))
    WebDriverWait(browser, 30).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, '#messages .assistant[data-done="true"]')) == n
    )
    bubble = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")[-1]
    assert "error" not in bubble.get_attribute("class").split(), browser.find_element(By.ID, "error").text
    # Each streamed piece is appended as its own text node: more than one means it arrived in pieces.
    pieces = browser.execute_script("return arguments[0].childNodes.length", bubble)
    assert pieces > 1, "the answer did not stream in"
    return bubble.get_attribute("textContent")
