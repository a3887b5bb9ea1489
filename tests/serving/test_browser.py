"""The chat page in a real browser: Debian's headless chromium driven by Playwright (no browser download).

It uploads an image and asks about it (the answer streams in), then generates an image with the guidance
slider and a seed (streamed: the image grows through its partial images), and saves a screenshot of the page
next to the test's other output (tmp_path)."""

from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: run scripts/install_data.sh (as root)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.set_default_timeout(60_000)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(server.url)
        yield page
        browser.close()


def test_page_chats_about_an_uploaded_image_and_generates_one(page, image_file, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text("tiny")
    expect(page.locator("#status")).to_have_text("ready")

    # 1. Ask about an uploaded image: the request carries it as a data URL and streams the answer.
    page.set_input_files("#image-input", str(image_file))
    expect(page.locator("#attachment")).to_be_visible()
    page.fill("#prompt", "what is this ?")
    with page.expect_request("**/v1/chat/completions") as chat:
        page.click("#send")
    request = chat.value.post_data_json
    assert request["stream"] is True and request["model"] == "tiny"
    parts = request["messages"][-1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "what is this ?"}
    answer = page.locator(".message.assistant[data-done]")
    expect(answer).to_have_count(1)
    assert answer.inner_text().strip()  # the untrained model's words (or "(empty answer)")
    expect(page.locator(".message.user img.uploaded")).to_have_count(1)
    expect(page.locator("#attachment")).to_be_hidden()

    # 2. Generate an image with guidance 4.5 (the slider) and seed 7, streamed: every partial image the
    #    server sends replaces the last one (a MutationObserver records the source each change replaced: its
    #    callback may run after several changes, when the image's current source is already a later one).
    page.evaluate(
        """() => {
            window.replacedSources = [];
            new MutationObserver((changes) => {
                for (const change of changes) {
                    if (change.target.matches?.("img.generated")) window.replacedSources.push(change.oldValue);
                }
            }).observe(document.body, {
                subtree: true, attributes: true, attributeFilter: ["src"], attributeOldValue: true,
            });
        }"""
    )
    page.eval_on_selector(
        "#guidance", "(slider) => { slider.value = '4.5'; slider.dispatchEvent(new Event('input')); }"
    )
    expect(page.locator("#guidance-value")).to_have_text("4.5")
    page.fill("#seed", "7")
    page.fill("#prompt", "a cat")
    with page.expect_request("**/v1/images/generations") as generation:
        page.click("#generate")
    request = generation.value.post_data_json
    assert (request["prompt"], request["guidance_scale"], request["seed"], request["n"]) == (
        "a cat",
        4.5,
        7,
        1,
    )
    assert request["stream"] is True and request["partial_images"] == 3
    generated = page.locator(".message.assistant[data-done] img.generated")
    expect(generated).to_have_count(1)
    # The tiny model's 4 code rows: previews after rows 1, 2 and 3, then the final image.
    expect(generated).to_have_attribute("data-partials", "3")
    expect(generated).to_have_class("generated")  # no longer "generated partial"
    replaced = page.evaluate("window.replacedSources")
    assert len(replaced) == 4  # the source was set four times
    shown = [*replaced[1:], generated.get_attribute("src")]  # what each setting put there
    assert len(set(shown)) == 4
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.generated')].every((image) => image.naturalWidth === 16)"
    )
    assert page.locator(".message.error").count() == 0
    assert page.errors == []

    screenshot = tmp_path / "serve-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
