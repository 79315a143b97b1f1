"""The course in the clients students use, driven by a real browser (headless Chromium).

- JupyterLab: start `jupyter lab` on localhost, open a lecture and a lab, Run All, and check that
  the outputs, a figure and an ipywidgets control render (so the widget extension is installed).
  The lecture's markdown reads cleanly there: no raw MyST (`{cite`, `:::`), its key idea as a
  blockquote, its citations as links.
- Standalone HTML: the lecture executed in JupyterLab exports with nbconvert to one HTML file that
  shows its figures when opened from disk.
- The offline HTML book: built without executing (the lecture executed in JupyterLab lends its
  outputs), opened from disk; every lecture is reached by following links from the index.

Screenshots go to _build/screenshots/. Needs Debian's chromium (`make browser-setup`) and the
`playwright` Python package (no browser download: it drives /usr/bin/chromium). Run with
`make test-browser`; the `browser` marker keeps these tests out of `make test-unit`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")
LECTURE = "03_convnext"  # one of the cheapest lectures (~20 s), with a figure and a widget
LAB = "01_vit"
RUN_TIMEOUT_S = int(os.environ.get("COURSE_BROWSER_TIMEOUT", 480))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: run `make browser-setup`"),
]
playwright = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def workdir():
    """A scratch folder with copies of the notebooks (the tests save executed copies there)."""
    path = Path(tempfile.mkdtemp(prefix="course-browser-"))
    shutil.copy(ROOT / "lectures" / f"{LECTURE}.ipynb", path)
    shutil.copy(ROOT / "labs" / f"{LAB}.ipynb", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def jupyter_lab(workdir):
    """`jupyter lab` on 127.0.0.1 with a random token, stopped (kernels included) afterwards."""
    port, token = free_port(), secrets.token_hex(16)
    config = workdir / ".jupyter"
    settings = config / "user-settings"
    # Render every cell (not only those in view), and no news prompt over the notebook.
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={workdir}",
           f"--LabApp.workspaces_dir={config / 'workspaces'}", f"--LabApp.user_settings_dir={settings}"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(config / "data")}
    env.pop("JUPYTER_TOKEN", None)
    log = open(workdir / "jupyter.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
                break
            except Exception:
                assert server.poll() is None, (workdir / "jupyter.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not start within 60 s")
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # anything the server left in its group
        except (ProcessLookupError, PermissionError):
            pass
        log.close()
        assert not port_open(port), "the Jupyter server is still listening after the test"


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        profile = tempfile.mkdtemp(prefix="course-chromium-")
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield context
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def run_all_cells(page, url: str, name: str):
    """Open a notebook in JupyterLab, Run All from the menu, wait until every cell has run."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    # JupyterLab may ask which kernel to start: take the one it proposes (the notebook's python3).
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-mod-accept")
    try:
        dialog.wait_for(timeout=5_000)
        dialog.click()
    except playwright.TimeoutError:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    code_cells = page.locator(".jp-Notebook .jp-CodeCell")
    n = code_cells.count()
    # Every code cell gets a number in its prompt once it ran; "[*]" while it runs or waits.
    try:
        page.wait_for_function(
            """(n) => {
                const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""", arg=n, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
    except playwright.TimeoutError:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"jupyterlab-{name}-timeout.png"))
        prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        pytest.fail(f"{name}: not every cell ran within {RUN_TIMEOUT_S} s; prompts: {prompts}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, f"{name}: a cell raised: {errors.first.inner_text()[:2000]}"
    return n


def save(page):
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)


def test_lecture_runs_in_jupyterlab_with_figures_and_widgets(jupyter_lab, browser, workdir):
    base, token = jupyter_lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    start = time.perf_counter()
    n = run_all_cells(page, f"{base}/lab/tree/{LECTURE}.ipynb?token={token}&reset", LECTURE)
    seconds = time.perf_counter() - start
    outputs = page.locator(".jp-OutputArea-output")
    figures = page.locator(".jp-OutputArea-output img")
    # The lecture's `widgets.interact` control (tqdm's progress bars are widgets too: not those).
    controls = page.locator(".jp-OutputArea-output .widget-interact")
    assert outputs.count() > 0 and figures.count() > 0
    assert controls.count() > 0, "no ipywidgets control rendered"
    assert controls.first.locator("input, select, button").count() > 0, "the widget has no input element"
    assert page.locator(".jp-OutputArea-output:has-text('Error displaying widget')").count() == 0, \
        "the widget manager is missing: is jupyterlab_widgets installed?"
    assert figures.first.evaluate("img => img.naturalWidth") > 100, "the figure did not load"
    # The markdown as a student reads it: plain Markdown, no MyST left over.
    rendered = page.locator(".jp-MarkdownCell .jp-RenderedMarkdown")
    markdown = "\n".join(rendered.all_inner_texts())
    for raw in ("{cite", ":::", "```{", ")="):
        assert raw not in markdown, f"raw MyST {raw!r} is visible in JupyterLab"
    key_idea = page.locator(".jp-RenderedMarkdown blockquote", has_text="Key idea")
    citations = page.locator(".jp-RenderedMarkdown a", has_text="et al.")
    assert key_idea.count() == 1 and citations.count() > 3, (key_idea.count(), citations.count())
    key_idea.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"jupyterlab-{LECTURE}-markdown.png"))
    figures.nth(1 if figures.count() > 1 else 0).scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"jupyterlab-{LECTURE}.png"))
    cell = page.locator(".jp-CodeCell", has=controls.first).first
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(SHOTS / f"jupyterlab-{LECTURE}-widget.png"))
    save(page)
    print(f"{LECTURE} in JupyterLab: {n} cells in {seconds:.0f} s, {outputs.count()} outputs, "
          f"{figures.count()} figures, {controls.count()} widget controls, {citations.count()} citation links, "
          f"no raw MyST in {rendered.count()} markdown cells; screenshots in {SHOTS.relative_to(ROOT)}")
    page.close()


def test_lab_runs_in_jupyterlab(jupyter_lab, browser):
    base, token = jupyter_lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    start = time.perf_counter()
    n = run_all_cells(page, f"{base}/lab/tree/{LAB}.ipynb?token={token}&reset", LAB)
    text = page.locator(".jp-Notebook").inner_text()
    assert "[TODO]" in text and "exercises passed" in text, "the lab's checks did not print their report"
    page.locator(".jp-OutputArea-output", has_text="exercises passed").last.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"jupyterlab-lab-{LAB}.png"))
    print(f"lab {LAB} in JupyterLab: {n} cells in {time.perf_counter() - start:.0f} s")
    page.close()


def test_executed_notebook_exports_to_standalone_html(workdir, browser):
    """nbconvert turns the notebook executed above (or, alone, one executed here) into one HTML
    file; opened from disk it shows the figures, which are embedded in it."""
    notebook = workdir / f"{LECTURE}.ipynb"
    executed = any(o.get("output_type") == "display_data" for c in json.loads(notebook.read_text())["cells"]
                   for o in c.get("outputs", []))
    cmd = [str(BIN / "jupyter"), "nbconvert", "--to", "html", str(notebook), "--output-dir", str(workdir / "html")]
    if not executed:
        cmd += ["--execute", "--ExecutePreprocessor.timeout=300"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    html = workdir / "html" / f"{LECTURE}.html"
    assert html.stat().st_size > 100_000 and "data:image/png;base64" in html.read_text()
    page = browser.new_page()
    page.goto(html.as_uri(), wait_until="domcontentloaded")
    images = page.locator(".jp-OutputArea-output img")
    assert images.count() > 0
    images.first.scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 100)", timeout=30_000)
    page.screenshot(path=str(SHOTS / f"html-export-{LECTURE}.png"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(html, SHOTS / f"{LECTURE}.html")
    print(f"{LECTURE}.html: {html.stat().st_size / 1e6:.1f} MB, {images.count()} figures")
    page.close()


def executed_lecture(workdir: Path) -> Path:
    """The lecture as JupyterLab ran and saved it above, or executed here when run alone."""
    notebook = workdir / f"{LECTURE}.ipynb"
    if not any(o.get("output_type") == "display_data" for c in json.loads(notebook.read_text())["cells"]
               for o in c.get("outputs", [])):
        subprocess.run([str(BIN / "jupyter"), "nbconvert", "--to", "notebook", "--execute", "--inplace",
                        "--ExecutePreprocessor.timeout=600", str(notebook)], check=True, capture_output=True, timeout=900)
    return notebook


def test_offline_book_opens_from_disk(workdir, browser):
    """`make book` offline: build without executing, lend the lecture executed above its outputs,
    render the static HTML book, open it from disk and follow the links from the index to every
    lecture; screenshot a lecture page with a figure and a citation."""
    executed = executed_lecture(workdir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute", "--offline",
                           "--outputs-from", str(executed.parent)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = time.perf_counter() - start
    summary = next(ln for ln in proc.stdout.splitlines() if ln.startswith("offline HTML book"))
    html = ROOT / "_build" / "html"
    page = browser.new_page()
    page.goto((html / "index.html").as_uri(), wait_until="load")
    lectures = page.locator("nav a[href^='lectures.']")
    hrefs = [lectures.nth(i).get_attribute("href") for i in range(lectures.count())]
    expected = sorted(f"lectures.{p.stem.split('_', 1)[1]}.html" for p in (ROOT / "lectures").glob("*.md"))
    assert sorted(hrefs) == expected, (hrefs, expected)
    visited, links = 0, 0
    for href in hrefs:
        page.goto((html / "index.html").as_uri(), wait_until="load")
        page.locator(f"nav a[href='{href}']").first.click()
        page.wait_for_load_state("load")
        assert page.url.endswith(href)
        heading = page.locator("main h1").first.inner_text()
        text = page.locator("main").inner_text()
        assert heading.startswith("Lecture"), heading
        assert "{cite" not in text and ":::" not in text, f"{href}: raw MyST visible"
        assert page.locator("main a.cite").count() > 0 and page.locator("section.references li").count() > 0
        links += page.locator("main a").count()
        visited += 1
    page.goto((html / f"lectures.{LECTURE.split('_', 1)[1]}.html").as_uri(), wait_until="load")
    figures = page.locator("main img.output")
    assert figures.count() > 0, "the executed lecture's figures are missing"
    page.wait_for_function("() => [...document.querySelectorAll('main img.output')].every(i => i.complete && i.naturalWidth > 100)",
                           timeout=30_000)
    # The first figure that has a citation above it on the same screen.
    cite = page.locator("main a.cite").first
    cite.scroll_into_view_if_needed()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"book-{LECTURE}-citation.png"))
    figures.first.scroll_into_view_if_needed()
    page.evaluate("window.scrollBy(0, -250)")
    page.screenshot(path=str(SHOTS / f"book-{LECTURE}-figure.png"))
    print(f"{summary}\nbuilt in {built:.0f} s; in Chromium from disk: {visited} lectures reached from the index "
          f"({links} links on them), {figures.count()} figures on {LECTURE}; screenshots in {SHOTS.relative_to(ROOT)}")
    page.close()
