"""RoutingExplorer and CacheExplorer in a real browser: JupyterLab on 127.0.0.1, headless
Chromium via Playwright.

Opens `tests/browser_notebooks/routing_explorer.ipynb` (copied into a temporary root), runs
all cells, checks that the widget and its figure render, moves the capacity-factor slider
and checks that the figure and the numbers change, then measures the latency of one slider
change (key press to new image, in the browser's own clock) over several presses. The
latency is printed and recorded as a test property, never asserted (timings belong to
benchmarks). `cache_explorer.ipynb` gets the same treatment for notebook 08's
`CacheExplorer` (its cache-size slider). Screenshots land in pytest's `tmp_path`; their
paths are printed.

Needs Chromium from the system package manager at /usr/bin/chromium (`apt-get install -y
chromium`; `.ci/run` does it) and the `playwright` Python package; Playwright's own browser
download is not used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "tests" / "browser_notebooks" / "routing_explorer.ipynb"
CACHE_NOTEBOOK = REPO / "tests" / "browser_notebooks" / "cache_explorer.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--headless", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
TOKEN = "moe-course-test"
IMG = ".jp-OutputArea-output .jupyter-widgets img"
LATENCY_PRESSES = 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slider_handle(page, label: str):
    return page.locator(f".widget-slider:has(.widget-label:text-is('{label}')) .noUi-handle")


def slider_readout(page, label: str) -> str:
    return page.locator(
        f".widget-slider:has(.widget-label:text-is('{label}')) .widget-readout").inner_text()


CELL_STATE = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
        .map(e => e.textContent);
    if (prompts.length && prompts.every(t => /\\[\\d+\\]/.test(t))) return 'done';
    return prompts.some(t => t.includes('[*]')) ? 'running' : 'waiting';
}"""


def accept_kernel_dialog(page) -> bool:
    """Click "Select" in a "Select Kernel" dialog if one is open; True if it was."""
    button = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-Dialog-button.jp-mod-accept")
    if button.count() == 0:
        return False
    button.first.click()
    return True


def run_all_cells(page, attempts: int = 3, idle_s: float = 20.0, run_s: float = 180.0) -> None:
    """Run > Run All Cells until every code cell has an execution count.

    Right after a notebook opens, JupyterLab may swap the kernel it started, and a Run All
    sent meanwhile is lost (cells stay `[ ]`); on a loaded machine it may also ask which
    kernel to use. So accept that dialog (the notebook's own kernel) and click again when
    nothing runs for `idle_s`.
    """
    for _ in range(attempts):
        accept_kernel_dialog(page)
        page.click(".jp-Notebook .jp-Cell >> nth=0")  # the notebook must be the active widget
        page.click(".lm-MenuBar-item:has-text('Run')")
        page.click(".lm-Menu-item:not(.lm-mod-disabled):has-text('Run All Cells')",
                   timeout=10_000)
        idle_since, deadline = time.monotonic(), time.monotonic() + run_s
        while time.monotonic() < deadline:
            if accept_kernel_dialog(page):
                idle_since = time.monotonic()
            state = page.evaluate(CELL_STATE)
            if state == "done":
                return
            if state == "running":
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_s:
                break
            page.wait_for_timeout(250)
        page.keyboard.press("Escape")
    pytest.fail(f"Run All Cells did not execute every cell after {attempts} attempts")


@pytest.fixture
def lab_server(tmp_path):
    """`jupyter lab` serving a copy of the browser notebooks; yields (base_url, log path)."""
    root = tmp_path / "root"
    shutil.copytree(NOTEBOOK.parent, root)
    dirs = {name: tmp_path / "home" / name.lower() for name in (
        "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
        "MPLCONFIGDIR", "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")}
    for d in dirs.values():
        d.mkdir(parents=True)
    # no "get notified about Jupyter news?" toast over the screenshots
    news = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = dict(os.environ, **{k: str(v) for k, v in dirs.items()})
    env.pop("NBGRADER_EXECUTION", None)
    env.pop("MOE_COURSE_GRADING", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the kernel imports moe_course from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    port = free_port()
    log_path = tmp_path / "lab_server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={root}", "--allow-root", "--LabApp.news_url=",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start; its log:\n{log_path.read_text()}")
                time.sleep(0.25)
        yield base, log_path
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group, with kernels
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def _sync_playwright():
    """Playwright's sync API, or a failure that says what to install."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing at /usr/bin/chromium: install it with "
                    "`apt-get install -y chromium` (the browser test needs the system package; "
                    "`.ci/run` installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: install the test extras "
                    "(pip install -e '.[test]')")
    return sync_playwright


@contextlib.contextmanager
def explorer_page(lab_server, notebook: Path, shots: dict[str, Path]):
    """A Chromium page on `notebook` in the lab with all its cells run, the widget's figure
    decoded and nothing on stderr; yields (page, page errors). On a failure a screenshot is
    saved to shots["failure"] and its path printed with the server's log."""
    base, log_path = lab_server
    with _sync_playwright()() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        idle = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
        try:
            page.goto(f"{base}/lab/tree/{notebook.name}?token={TOKEN}",
                      wait_until="domcontentloaded")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_selector(idle, timeout=60_000)
            run_all_cells(page)
            page.wait_for_selector(IMG, timeout=120_000)
            page.wait_for_selector(idle, timeout=60_000)
            page.wait_for_function(f"() => document.querySelector('{IMG}').naturalWidth > 0",
                                   timeout=30_000)
            assert page.locator(".jp-OutputArea-output .jp-RenderedText[data-mime-type="
                                "'application/vnd.jupyter.stderr']").count() == 0
            yield page, errors
        except Exception:
            page.screenshot(path=str(shots["failure"]))
            print(f"failure screenshot: {shots['failure']}\nserver log: {log_path}")
            raise
        finally:
            browser.close()


def time_presses(page, handle, key: str, presses: int) -> list[float]:
    """Press `key` on a slider's `handle` `presses` times, waiting for each new figure; the
    latency of each press in ms (key down to new image src, in the page's own clock). One
    new figure per press, no more."""
    page.evaluate(
        """(sel) => {
            const img = document.querySelector(sel);
            window.__keys = []; window.__srcs = [];
            document.addEventListener(
                'keydown', () => window.__keys.push(performance.now()), true);
            new MutationObserver(() => window.__srcs.push(performance.now()))
                .observe(img, {attributes: true, attributeFilter: ['src']});
        }""", IMG)
    handle.focus()
    for i in range(presses):
        page.keyboard.press(key)
        page.wait_for_function(f"() => window.__srcs.length >= {i + 1}", timeout=30_000)
        page.wait_for_timeout(150)
    keys = page.evaluate("() => window.__keys")
    srcs = page.evaluate("() => window.__srcs")
    assert len(srcs) == presses, (keys, srcs)
    latencies = [s - k for k, s in zip(keys, srcs, strict=True)]
    assert all(x > 0 for x in latencies), latencies
    return latencies


def report_latency(what: str, latencies: list[float], shots: dict[str, Path], errors: list[str],
                   capsys) -> None:
    with capsys.disabled():
        print(f"\n{what} slider latency (key press -> new figure), {len(latencies)} presses: "
              f"median {statistics.median(latencies):.0f} ms, all "
              f"{[round(x) for x in latencies]} ms")
        for name, path in shots.items():
            if name != "failure":
                print(f"screenshot {name}: {path}")
        if errors:
            print("page errors:", *errors, sep="\n  ")


def test_routing_explorer_in_jupyterlab(lab_server, tmp_path, record_property, capsys):
    shots = {name: tmp_path / f"{name}.png" for name in ("1_rendered", "2_capacity_moved",
                                                          "3_after_latency", "failure")}
    with explorer_page(lab_server, NOTEBOOK, shots) as (page, errors):
        # the widget renders: 7 sliders, the router dropdown, a decoded figure, numbers
        assert page.locator(".jp-OutputArea-output .widget-slider").count() == 7
        assert page.locator(".jp-OutputArea-output .widget-dropdown").count() == 1
        numbers = page.locator(".jp-OutputArea-output .widget-html").last
        assert "capacity C = 8" in numbers.inner_text()
        width = page.evaluate(f"() => document.querySelector('{IMG}').naturalWidth")
        assert width == 800  # 10 in x 80 dpi
        page.screenshot(path=str(shots["1_rendered"]))

        # capacity factor 1.0 -> 0.75: C = ceil(2 * 32 * 0.75 / 8) = 6
        src = page.locator(IMG).get_attribute("src")
        handle = slider_handle(page, "capacity factor")
        handle.focus()
        handle.press("ArrowLeft")
        page.wait_for_function(
            "([sel, before]) => document.querySelector(sel).getAttribute('src') !== before",
            arg=[IMG, src], timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-html')]"
            ".some(e => e.innerText.includes('capacity C = 6'))", timeout=30_000)
        assert slider_readout(page, "capacity factor") == "0.75"
        page.wait_for_function(f"() => document.querySelector('{IMG}').naturalWidth > 0")
        page.screenshot(path=str(shots["2_capacity_moved"]))

        latencies = time_presses(page, slider_handle(page, "seed"), "ArrowRight",
                                 LATENCY_PRESSES)
        assert slider_readout(page, "seed") == str(LATENCY_PRESSES)
        page.screenshot(path=str(shots["3_after_latency"]))

    record_property("slider_latency_ms_median", round(statistics.median(latencies), 1))
    record_property("slider_latency_ms", [round(x, 1) for x in latencies])
    report_latency("RoutingExplorer (goal < 300 ms)", latencies, shots, errors, capsys)


def test_cache_explorer_in_jupyterlab(lab_server, tmp_path, record_property, capsys):
    """Notebook 08's CacheExplorer: renders, follows its cache-size slider, one new figure
    per key press; the latency of a press is printed and recorded, never asserted."""
    shots = {name: tmp_path / f"cache_{name}.png" for name in ("1_rendered", "2_after_latency",
                                                                "failure")}
    presses = 5  # cache size 5 -> 0, one step per press
    with explorer_page(lab_server, CACHE_NOTEBOOK, shots) as (page, errors):
        assert page.locator(".jp-OutputArea-output .widget-slider").count() == 1
        assert page.locator(".jp-OutputArea-output .widget-dropdown").count() == 2
        assert slider_readout(page, "cache size") == "5"
        page.screenshot(path=str(shots["1_rendered"]))
        latencies = time_presses(page, slider_handle(page, "cache size"), "ArrowLeft", presses)
        assert slider_readout(page, "cache size") == "0"
        page.screenshot(path=str(shots["2_after_latency"]))

    record_property("cache_slider_latency_ms_median", round(statistics.median(latencies), 1))
    report_latency("CacheExplorer", latencies, shots, errors, capsys)
