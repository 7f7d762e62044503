"""Drive ``normative-anomaly serve`` in a real browser: Debian's Chromium through Playwright.

Shared by the browser tests (Testing/web/test_web_app.py) and ``scripts/benchmark_web.py``; needs Playwright
(requirements-test.txt), imported only when a browser is driven. The browser is the system's
(``apt-get install chromium``); Playwright never downloads one. Every new frame of a view
is a new ``blob:`` image on trame-rca's ``img.image-display-area``; an init script records
when each one has loaded, so latencies are measured in the page's own clock.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM = os.environ.get("NORMATIVE_ANOMALY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
# window.__frames[i]: load times (performance.now()) of the frames of the i-th view, in page order
# (the axial view first); window.__pointer: when the last pointerdown happened.
FRAME_WATCH = """
window.__frames = [];
window.__pointer = null;
document.addEventListener('pointerdown', () => { window.__pointer = performance.now(); }, true);
new MutationObserver(mutations => {
  for (const m of mutations) {
    const img = m.target;
    if (m.attributeName !== 'src' || !img.classList || !img.classList.contains('image-display-area')) continue;
    const views = Array.from(document.querySelectorAll('img.image-display-area'));
    const index = views.indexOf(img);
    const src = img.src;
    const done = () => { if (img.src === src) (window.__frames[index] = window.__frames[index] || []).push(performance.now()); };
    if (img.complete) done(); else img.addEventListener('load', done, {once: true});
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['src']});
"""


def browser_available() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def web_server(work_dir: Path, *extra: str, startup_s: float = 120.0) -> Iterator[str]:
    """``normative-anomaly serve`` in a child process on a free loopback port; yields its URL."""
    port = free_port()
    log_path = Path(work_dir) / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    command = [sys.executable, "-m", "NormativeAnomalyLib.cli", "serve", "--port", str(port),
               "--work-dir", str(Path(work_dir) / "server"), *extra]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + startup_s
        while "App running at" not in log_path.read_text(encoding="utf-8", errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}):\n{server_log(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {startup_s} s:\n{server_log(log_path)}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_log(path: Path, lines: int = 40) -> str:
    """The server's log without VTK's repeated deprecation notices."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [line for line in text if line.strip() and not re.search(r"WindowResizeEvent|ConfigureEvent|vtkObject.cxx",
                                                                    line)]
    return "\n".join(keep[-lines:])


@contextmanager
def browser_page(url: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
            page.add_init_script(FRAME_WATCH)
            page.goto(url)
            page.wait_for_selector("img.image-display-area", timeout=60_000)
            page.wait_for_function("window.__frames.length > 0", timeout=60_000)
            yield page
        finally:
            browser.close()


def run_model(page, model: str | None = None, timeout_s: float = 300.0) -> str:
    """Choose ``model`` (default: the one shown), click Run, wait until it is done; returns the model."""
    if model is not None:
        page.evaluate(f"trame.state.set('model', {model!r})")
        page.wait_for_function(f"document.querySelector('#model-card').textContent.startsWith({model!r})")
    model = page.inner_text("#model-card").split()[0]
    page.click("#run-button")
    page.wait_for_function(
        f"document.querySelector('#status').textContent.includes({model + ': done'!r}) || "
        "(document.querySelector('#error') && document.querySelector('#error').offsetParent !== null)",
        timeout=timeout_s * 1000)
    if page.is_visible("#error"):
        raise AssertionError(f"the run failed: {page.inner_text('#error')}")
    return model


def segment_voxels(page) -> int:
    """The active result's segment voxel count, as the server read it back from the segmentation node."""
    return int(page.get_attribute("#lesion-summary", "data-voxels"))


def click_slider(page, slider_id: str, fraction: float) -> None:
    """Click a Vuetify slider's track at ``fraction`` of its length (a slider move)."""
    track = page.locator(f"#{slider_id}").locator("xpath=ancestor::div[contains(@class,'v-slider')]").first
    box = track.locator(".v-slider-track").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


def frames(page, view: int = 0) -> int:
    return page.evaluate(f"(window.__frames[{view}] || []).length")


def wait_for_frame(page, view: int, after: int, timeout_s: float = 10.0) -> float:
    """Wait for the view's frame number ``after`` (0-based) to load; returns its load time (ms)."""
    page.wait_for_function(f"(window.__frames[{view}] || []).length > {after}", timeout=timeout_s * 1000)
    return page.evaluate(f"window.__frames[{view}][{after}]")


def wait_for_quiet(page, view: int = 0, quiet_ms: int = 600, timeout_s: float = 15.0) -> None:
    """Wait until the view has sent no new frame for ``quiet_ms``."""
    deadline = time.monotonic() + timeout_s
    count = frames(page, view)
    while time.monotonic() < deadline:
        page.wait_for_timeout(quiet_ms)
        now = frames(page, view)
        if now == count:
            return
        count = now
