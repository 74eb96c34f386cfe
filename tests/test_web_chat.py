"""The web chat of `deco-gguf serve` in a real browser: headless Chromium (Debian's chromium and chromium-driver,
installed by scripts/setup.sh) opens the page, types a message and sends it; the reply that streams in equals
the API's greedy reply to the same conversation.

The page samples with the server's defaults (it sends only the settings a user changed), so the server is
started greedy (--temp 0) with a short reply length (--n-predict).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from llama_server import Served, post  # tests/llama_server.py

from deco_gguf.runtime.native import is_patched

if not is_patched():
    pytest.skip("llama_cpp is not the patched DECO build (run scripts/build-runtime.sh)", allow_module_level=True)

from deco_gguf.runtime.server import GET_WEB_UI, web_ui_built  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MESSAGE = "Who is the LORD?"
N = 24  # reply tokens
REPLY = '[aria-label="Assistant message with actions"] .markdown-content'


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from deco_gguf.converter import convert

    out = tmp_path_factory.mktemp("web-chat") / "deco-tiny-f16.gguf"
    convert(REPO / "models" / "deco-tiny", out, "f16")
    return out


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are missing: run scripts/setup.sh"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    yield session
    session.quit()


def idle(url: str) -> bool:
    with urllib.request.urlopen(url + "/slots", timeout=10) as r:
        return not any(slot["is_processing"] for slot in json.load(r))


def test_browser_chat_reply_equals_the_api_reply(model, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert web_ui_built(), f"the runtime was built without the web chat: {GET_WEB_UI}"
    with Served(str(model), "--parallel", "1", "--", "--temp", "0", "--n-predict", str(N)) as served:
        browser.get(served.url + "/")
        wait = WebDriverWait(browser, 60)
        box = wait.until(
            lambda b: next((t for t in b.find_elements(By.TAG_NAME, "textarea") if t.is_displayed()), None)
        )
        box.send_keys(MESSAGE)
        box.send_keys(Keys.ENTER)

        seen: list[str] = []  # the reply's text as it grows

        def finished(b) -> bool:
            shown = [e.text for e in b.find_elements(By.CSS_SELECTOR, REPLY)]
            if shown and shown[-1] and (not seen or seen[-1] != shown[-1]):
                seen.append(shown[-1])
            return bool(seen) and idle(served.url) and seen[-1] == shown[-1]

        wait.until(finished)
        time.sleep(0.5)  # the last streamed piece rendered
        shown = browser.find_elements(By.CSS_SELECTOR, REPLY)[-1].text
        api = post(
            served.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": MESSAGE}], "temperature": 0, "cache_prompt": False},
        )
    reply = api["choices"][0]["message"]["content"]
    assert api["usage"]["completion_tokens"] == N
    assert " ".join(shown.split()) == " ".join(reply.split())  # the page renders it as Markdown: spaces folded
    assert all(shown.startswith(part) for part in seen)
