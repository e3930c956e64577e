"""The playground in a real headless Chromium (Debian's, driven by playwright) against a real server process:
load, type, generate, see the text stream in, and get the same text as the API for the same seed."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import httpx
import pytest

from .test_server import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "The quick brown fox"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")]


@contextlib.contextmanager
def served(model_dir: Path, *args: str):
    with running_server(model_dir, *args) as (url, _):
        yield url


@pytest.fixture(scope="module")
def attention_export(tiny_checkpoint, tmp_path_factory) -> Path:
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-playground"
    export_model(str(tiny_checkpoint), out, with_attention=True, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def set_slider(page, name: str, value) -> None:
    page.eval_on_selector(f"#{name}", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def generate(page, prompt: str, seed: int) -> str:
    page.fill("#prompt", prompt)
    set_slider(page, "max-tokens", 24)
    set_slider(page, "temperature", 0.9)
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent !== 'generating'", timeout=30_000)
    assert page.text_content("#status") == "done", page.text_content("#error")
    return "".join(page.eval_on_selector_all("#output .piece", "pieces => pieces.map(p => p.textContent)"))


def test_playground_streams_the_same_text_as_the_api(browser, attention_export):
    with served(attention_export) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('manifest-list').textContent.includes('precision')")
        assert "fp32" in page.text_content("#manifest-list")
        page.evaluate("""() => { window.pieceCounts = [];  // how many pieces were shown while generating
            new MutationObserver(() => window.pieceCounts.push(document.querySelectorAll('#output .piece').length))
              .observe(document.getElementById('output'), {childList: true}); }""")
        text = generate(page, PROMPT, seed=7)
        api = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9,
                                                         "top_p": 0.95, "top_k": 0, "seed": 7}).json()
        assert text == api["choices"][0]["text"] and text
        assert max(page.evaluate("window.pieceCounts")) > 1  # the text came piece by piece
        title = page.get_attribute("#output .piece", "title")
        assert "%" in title and "most likely" in title  # per-token probability on hover
        assert page.text_content("#ttft").endswith("ms") and float(page.text_content("#tps")) > 0
        page.select_option("#attention-layer", "1")
        page.click("#attention")
        page.wait_for_function("document.getElementById('attention-note').textContent.startsWith('layer 1')")
        assert page.eval_on_selector("#attention-canvas", "c => c.width") > 0


def test_playground_asks_for_the_api_key_and_uses_it(browser, tiny_export):
    with served(tiny_export, "--api-key", "sesame") as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('manifest-list').textContent.includes('API key')")
        page.fill("#prompt", PROMPT)
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent === 'failed'")
        assert "API key" in page.text_content("#error")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        assert generate(page, PROMPT, seed=1)
