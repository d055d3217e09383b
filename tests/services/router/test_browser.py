"""The page in a browser: Debian's headless Chromium, driven by Playwright, against the router on loopback.

The router is real (FastAPI under uvicorn, the page attached); its classifier, retriever and generator are
the HTTP-level fakes of ``router_fakes``, so answers are deterministic and fast. Playwright's own browser
downloads are never used: the test launches ``/usr/bin/chromium`` (``.ci/install-browser.sh`` installs it)
and is skipped, saying so, only where that binary is absent.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from image_factories import make_dicom
from ports import free_base_port, serve_in_thread
from router_fakes import CORPUS, FakeStack, build_router_app

from services.common.prompts import build_report_prompt
from training.data.medsynth.draw import DrawStyle, FindingInstance, draw_image

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/mmedrag_web_answer.png")
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

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="Debian's chromium is not installed (run .ci/install-browser.sh)"
)


@pytest.fixture(scope="module")
def stack() -> FakeStack:
    return FakeStack()


@pytest.fixture(scope="module")
def base_url(stack: FakeStack) -> Iterator[str]:
    """The router with the page attached, served by uvicorn in a thread on a free loopback port."""
    app = build_router_app(stack)  # build_app attaches the page
    with serve_in_thread(app, free_base_port(), timeout_s=20) as url:
        yield url


@pytest.fixture(scope="module")
def browser_context() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="mmedrag-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser_context: object, base_url: str) -> Iterator[object]:
    """A fresh tab on the page; it fails the test if the page asks any other host for anything."""
    page = browser_context.new_page()
    foreign: list[str] = []
    page.on(
        "request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else foreign.append(r.url)
    )
    page.goto(base_url + "/")
    yield page
    page.close()
    assert foreign == []


def _medsynth_chest(path: Path) -> Path:
    """A MedSynth chest radiograph with a right pleural effusion, as the tiny artifacts hold."""
    finding = FindingInstance("pleural_effusion_right", "moderate", 1.0)
    image, _ = draw_image("radiology", [finding], np.random.default_rng(3), DrawStyle(size=256))
    image.save(path)
    return path


def test_vqa_answer_evidence_and_timings_render(
    page, stack: FakeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.answer = "Yes, there is a right pleural effusion."
    page.set_input_files("#image", str(_medsynth_chest(tmp_path / "chest.png")))
    thumb = page.locator("#thumb-img")
    thumb.wait_for(state="visible")
    assert page.evaluate("document.getElementById('thumb-img').naturalWidth") == 256
    assert "PNG · 256 × 256 px" in page.locator("#thumb-caption").text_content()

    page.get_by_label("Question", exact=True).fill("Is a right pleural effusion present?")
    page.get_by_label("API key").fill("secret-key")
    with page.expect_request("**/vqa") as sent:
        page.get_by_role("button", name="Send").click()
    page.locator("#result").wait_for(state="visible")

    assert sent.value.headers["authorization"] == "Bearer secret-key"
    assert page.locator("#answer").text_content() == "Yes"
    assert "right pleural effusion" in page.locator("#raw").text_content()
    assert page.locator("#domain-label").text_content() == "Radiology"
    assert page.locator("#domain-confidence").text_content() == "90% confidence"
    items = page.locator("#evidence li")
    assert items.count() == len(CORPUS["radiology"])
    assert [items.nth(i).locator(".evidence-text").text_content() for i in range(3)] == CORPUS["radiology"]
    assert [items.nth(i).get_attribute("data-kept") for i in range(3)] == ["true", "false", "false"]
    assert items.nth(0).locator(".badge").text_content() == "Kept · in prompt"
    assert "kept 1 of 3" in page.locator("#retrieval-summary").text_content()
    assert page.locator("#timings li").count() == 4
    assert "Research use only" in page.locator("#disclaimer").text_content()
    prompt = stack.generator_bodies[-1]["messages"][0]["content"][1]["text"]
    assert "Is a right pleural effusion present?" in prompt

    screenshot = tmp_path / "web_answer.png"
    page.screenshot(path=str(screenshot), full_page=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    with capsys.disabled():  # shown on the terminal even when output is captured
        print(f"\nscreenshot of the answer: {SCREENSHOT_COPY}")  # noqa: T201


def test_a_text_file_shows_the_api_error_message(page, base_url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("Patient notes: not an image.\n")
    expected = httpx.post(
        base_url + "/vqa",
        files={"image": ("notes.txt", notes.read_bytes())},
        data={"question": "Any effusion?"},
    ).json()["error"]

    page.set_input_files("#image", str(notes))
    page.locator("#image-error").wait_for(state="visible")
    assert page.locator("#image-error").text_content() == expected["message"]
    assert page.locator("#image").get_attribute("aria-invalid") == "true"

    page.get_by_label("Question", exact=True).fill("Any effusion?")
    page.get_by_role("button", name="Send").click()
    page.locator("#error").wait_for(state="visible")
    assert "415" in page.locator("#error-title").text_content()
    assert page.locator("#error-message").text_content() == expected["message"]
    assert f"code: {expected['code']}" in page.locator("#error-meta").text_content()
    assert page.locator("#result").is_hidden()


def test_report_from_a_dicom_by_keyboard_on_a_narrow_screen(page, stack: FakeStack, tmp_path: Path) -> None:
    stack.answer = "FINDINGS: The lungs are clear. IMPRESSION: No acute disease."
    page.set_viewport_size({"width": 375, "height": 812})
    dicom = tmp_path / "chest.dcm"
    dicom.write_bytes(make_dicom((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 9) % 4096))
    page.set_input_files("#image", str(dicom))
    page.locator("#thumb-img").wait_for(state="visible")
    assert page.locator("#thumb-caption").text_content().startswith("chest.dcmDICOM · 64 × 64 px")

    page.focus("#task-vqa")
    page.keyboard.press("ArrowRight")  # native radio group: the arrow key selects "Report"
    assert page.locator("#task-report").is_checked()
    assert page.locator("#question-field").is_hidden()
    page.focus("#submit")
    page.keyboard.press("Enter")
    page.locator("#result").wait_for(state="visible")

    assert page.locator("#answer-kind").text_content() == "Report"
    assert page.locator("#answer").text_content() == stack.answer
    assert page.evaluate("document.activeElement.id") == "result-title"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    prompt = stack.generator_bodies[-1]["messages"][0]["content"][1]["text"]
    assert prompt == build_report_prompt("radiology", CORPUS["radiology"][:1])
