"""The documentation site builds with ``mkdocs build --strict`` (a broken link, anchor or API reference fails), and
its quick-start page renders in Debian's headless chromium (the browser tests/serving/test_browser.py drives)."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
        + ["--site-dir", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return folder


def test_site_builds_every_page_and_the_api_reference(site: Path) -> None:
    for page in (
        "index.html",
        "quickstart/index.html",
        "deepspeed/index.html",
        "reference/pipeline/index.html",
    ):
        assert (site / page).is_file(), page
    reference = (site / "reference" / "pipeline" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings: the method and the words of its docstring are there.
    assert "generate_images" in reference and "classifier-free guidance" in reference
    assert (site / "assets" / "shoe.png").is_file()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the test's output is the assertions
        pass


@pytest.fixture
def site_url(site: Path) -> Iterator[str]:
    """The built site over HTTP on a free local port (its search runs in a web worker, which file:// refuses)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=site)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_quickstart_page_renders_with_theme_navigation_and_code(site_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: run scripts/install_data.sh (as root)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{site_url}/quickstart/")
        expect(page.locator("h1")).to_contain_text("Quick start")
        # The Material theme's navigation lists the guides; code blocks are highlighted, with a copy button.
        expect(page.locator("nav.md-nav--primary").get_by_text("Generate images").first).to_be_attached()
        expect(page.locator(".md-content .highlight").first).to_be_visible()
        expect(page.locator(".md-content .highlight .md-code__button, .md-clipboard").first).to_be_attached()
        page.screenshot(path=str(tmp_path / "quickstart.png"), full_page=False)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "quickstart.png").stat().st_size > 0
