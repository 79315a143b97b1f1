"""Build the course book with MyST (what `make book` runs).

    python scripts/build_book.py                # execute every notebook and build the book
    python scripts/build_book.py --no-execute   # only check and build the pages
    python scripts/build_book.py --offline      # the offline build, even when online
    python scripts/build_book.py --no-execute --outputs-from DIR   # outputs of executed notebooks in DIR

First it writes the generated pages (the `course_lib` API reference and the references page,
scripts/book_pages.py). Then:

- Online, it builds the HTML site with the book theme into _build/html (`myst build --html`,
  which downloads the theme), ready to publish on any static host.
- Offline (no route to api.mystmd.org, where MyST downloads its theme), it builds the complete
  site content instead into _build/site: every page with its executed outputs and figures,
  cross-references, citations and the search index. The theme is replaced by an empty
  placeholder in _build/templates, and the remote "Open in Colab" badge image by a local copy
  (book/colab-badge.svg) in MyST's image cache. Then scripts/static_book.mjs renders that content
  into a static HTML site in _build/html (table of contents in a sidebar, figures, MathML math,
  citations with each page's reference list, admonitions), with the npm packages pinned in
  package.json (`npm ci` on first use), and checks every local link and anchor in it.

Outputs are not executed twice: `--no-execute --outputs-from DIR` builds without executing and
puts on each page the outputs of an executed notebook of the same name in DIR (the browser test
passes the lecture it has just run in JupyterLab).

Both run with --strict, so a broken cross-reference, citation or image fails the build. Then the
result is checked: every page of the table of contents is there and, when executed, every lecture
page holds its executed figures (`check_site`).

Notebooks execute on a Jupyter server that this script starts itself (with root allowed, since
containers and CI often run as root, and a random token) and always stops afterwards, kernels
included, so no server is left running.
"""

from __future__ import annotations

import argparse
import hashlib
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITE = ROOT / "_build" / "site"
THEME = ROOT / "_build" / "templates" / "site" / "myst" / "book-theme"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Pages of the table of contents, by folder; lectures are the pages that must show figures.
PAGE_FOLDERS = ("lectures", "labs", "solutions", "data", "book/api")


def is_online(timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen("https://api.mystmd.org/templates/site/myst/book-theme", timeout=timeout)
        return True
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyter(token: str, port: int) -> subprocess.Popen:
    config_dir = Path(tempfile.mkdtemp(prefix="course-jupyter-"))
    (config_dir / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"allow_root": True}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)}
    cmd = [str(BIN / "jupyter"), "server", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}"]
    # Its own process group, so that stopping it also stops every kernel it started.
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
            return server
        except Exception:
            if server.poll() is not None:
                raise RuntimeError(f"the Jupyter server exited with code {server.returncode}: run `{' '.join(cmd)}` to see why")
            time.sleep(0.5)
    stop(server)
    raise RuntimeError("the Jupyter server did not start within 60 s")


def stop(server: subprocess.Popen) -> None:
    """Stop the server (it shuts its kernels down), then anything left in its process group."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def prefill_offline_theme() -> None:
    """MyST only needs the theme's template.yml to build the site content; the real theme
    (downloaded online) replaces this placeholder on the next online build."""
    if (THEME / "template.yml").exists() and not (THEME / ".offline-placeholder").exists():
        return  # a real downloaded theme: keep it
    THEME.mkdir(parents=True, exist_ok=True)
    (THEME / "template.yml").write_text("myst: v1\nkind: site\ntitle: offline placeholder for the book theme\n")
    (THEME / "package.json").write_text('{"name": "book-theme-offline-placeholder", "version": "0.0.0", "private": true}\n')
    (THEME / ".offline-placeholder").write_text("made by scripts/build_book.py for offline builds\n")


def prefill_offline_images() -> None:
    """MyST downloads remote images into _build/site/public/<md5 of the URL>.<ext> and reuses a
    file already there. Offline, put the local copy of the Colab badge there."""
    public = SITE / "public"
    public.mkdir(parents=True, exist_ok=True)
    cached = public / (hashlib.md5(COLAB_BADGE.encode()).hexdigest() + ".svg")
    if not cached.exists():
        shutil.copyfile(ROOT / "book" / "colab-badge.svg", cached)


def expected_pages() -> list[str]:
    """The source file of every page the table of contents lists."""
    pages = ["README.md", "book/references.md"]
    for folder in PAGE_FOLDERS:
        pages += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.md"))
    return pages


def page_contents(site: Path = SITE) -> dict[str, dict]:
    """Built page JSON by source file (`lectures/01_vit.md`)."""
    out = {}
    for path in (site / "content").glob("*.json"):
        page = json.loads(path.read_text())
        location = page.get("location", "").lstrip("/")
        if location:
            out[location] = page
    return out


def count_nodes(node, kind: str) -> int:
    if isinstance(node, dict):
        return (node.get("type") == kind) + sum(count_nodes(v, kind) for v in node.values())
    if isinstance(node, list):
        return sum(count_nodes(v, kind) for v in node)
    return 0


def unresolved_links(node) -> list[str]:
    """Links MyST could not resolve: `#label` or a relative file that is not a page or a static
    file. (A missing `#label` already fails --strict through myst.yml's error_rules.)"""
    if isinstance(node, list):
        return [u for v in node for u in unresolved_links(v)]
    if not isinstance(node, dict):
        return []
    found = [u for v in node.values() for u in unresolved_links(v)]
    url = node.get("url", "")
    if node.get("type") == "link" and not (node.get("internal") or node.get("static")):
        if url.startswith("#") or (":" not in url and url.split("#")[0].endswith((".md", ".ipynb"))):
            found.append(url)
    return found


def figures(page: dict) -> int:
    """Executed image outputs (PNG/SVG figures) on a page."""
    return json.dumps(page["mdast"]).count('"image/png"')


def check_site(executed: bool, site: Path = SITE) -> list[str]:
    """What is missing from a built site: pages, executed figures, resolved references."""
    problems = []
    pages = page_contents(site)
    for source in expected_pages():
        if source not in pages:
            problems.append(f"{source}: no page was built")
    for source, page in pages.items():
        for url in unresolved_links(page["mdast"]):
            problems.append(f"{source}: the link {url!r} leads nowhere")
        if source.startswith("lectures/") and executed and figures(page) == 0:
            problems.append(f"{source}: no executed figure on the page")
        if source.startswith("lectures/") and "colab.research.google.com" not in json.dumps(page["mdast"]):
            problems.append(f"{source}: no 'Open in Colab' badge")
    return problems


def fill_outputs(folder: Path, site: Path = SITE) -> list[str]:
    """Give each built lecture page the outputs of the notebook in `folder` that is that lecture
    executed: same file name, same code cells as lectures/NAME.ipynb (a lab of the same name is
    not). Outputs are written in MyST's format, figures as files in site/public. Returns the pages."""
    import nbformat

    def code(path: Path) -> list[str]:
        return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]

    def slots(node) -> list[dict]:
        if isinstance(node, list):
            return [s for v in node for s in slots(v)]
        if not isinstance(node, dict):
            return []
        return [node] if node.get("type") == "outputs" else [s for v in node.values() for s in slots(v)]

    pages = {json.loads(path.read_text()).get("location", "").lstrip("/"): path for path in (site / "content").glob("*.json")}
    filled = []
    for executed in sorted(folder.glob("*.ipynb")):
        source = f"lectures/{executed.stem}.md"
        lecture = ROOT / "lectures" / f"{executed.stem}.ipynb"
        if source not in pages or not lecture.exists() or code(executed) != code(lecture):
            continue
        page = json.loads(pages[source].read_text())
        cells = [c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"]
        targets = slots(page["mdast"])
        if len(cells) != len(targets):
            raise SystemExit(f"{executed}: {len(cells)} code cells, but the page of {source} has {len(targets)}")
        for slot, cell in zip(targets, cells):
            slot["children"] = [{"type": "output", "children": [], "jupyter_data": _myst_output(o, site)} for o in cell.outputs]
        pages[source].write_text(json.dumps(page))
        filled.append(source)
    return filled


def _myst_output(output: dict, site: Path) -> dict:
    """A notebook output as MyST's site JSON stores it: images as files in public/."""
    import base64

    output = json.loads(json.dumps(output))
    if "text" in output and isinstance(output["text"], list):
        output["text"] = "".join(output["text"])
    if output.get("output_type") == "error":
        output["traceback"] = "\n".join(output.get("traceback", []))
    data = {}
    for kind, value in output.get("data", {}).items():
        value = "".join(value) if isinstance(value, list) else value
        if kind.startswith("image/") and kind != "image/svg+xml":
            digest = hashlib.md5(value.encode()).hexdigest()
            name = f"{digest}.{kind.split('/')[1]}"
            (site / "public" / name).write_bytes(base64.b64decode(value))
            data[kind] = {"content_type": kind, "hash": digest, "path": f"/{name}"}
        else:
            data[kind] = {"content_type": kind, "content": value if isinstance(value, str) else json.dumps(value)}
    if data:
        output["data"] = data
    return output


def static_html(site: Path = SITE, out: Path = ROOT / "_build" / "html") -> dict:
    """scripts/static_book.mjs: the site content -> static HTML in `out` (installs its pinned npm
    packages on first use). Returns its summary: pages, figures, links checked, broken, seconds."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise SystemExit("the offline HTML book needs Node.js 18+ (node and npm): install it, or read _build/site")
    if not (ROOT / "node_modules" / "myst-to-html").exists():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"`npm ci` could not install the pinned packages of package.json (is the npm registry "
                             f"reachable?):\n{proc.stderr[-2000:]}")
    proc = subprocess.run([node, str(ROOT / "scripts" / "static_book.mjs"), str(site), str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"scripts/static_book.mjs failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(lines[-1])
    if summary["broken"]:
        raise SystemExit("broken links in the HTML book:\n  " + "\n  ".join(summary["broken"][:50]))
    return summary


def summarize(site: Path = SITE) -> str:
    pages = page_contents(site)
    outputs = sum(count_nodes(p["mdast"], "output") for p in pages.values())
    figs = sum(figures(p) for p in pages.values())
    cites = sum(len(p.get("references", {}).get("cite", {}).get("order", [])) for p in pages.values())
    return f"{len(pages)} pages, {outputs} executed outputs, {figs} figures, {cites} citations"


def run_myst(cmd: list[str], env: dict) -> int:
    """Run MyST, passing its output through, except one line per widget that a notebook opens:
    MyST's executor has no widget manager (tqdm's bars and `interact` are widgets), and says so
    with "Exception opening new comm". The figures are unaffected."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    comms = 0
    for line in proc.stdout:
        if "Exception opening new comm" in line:
            comms += 1
        else:
            print(line, end="", flush=True)
    if comms:
        print(f"({comms} widget comms could not open while executing: MyST's executor has no widget "
              "manager; the lectures draw a static figure for the book)")
    return proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-execute", action="store_true", help="build the pages without executing notebooks")
    p.add_argument("--offline", action="store_true", help="build the offline HTML book even if online")
    p.add_argument("--outputs-from", type=Path, metavar="DIR",
                   help="with --no-execute: show the outputs of the executed notebooks in DIR (same file names)")
    args = p.parse_args()

    subprocess.run([sys.executable, str(ROOT / "scripts" / "book_pages.py")], cwd=ROOT, check=True)
    online = not args.offline and is_online()
    myst = str(BIN / "myst")
    if online:
        cmd = [myst, "build", "--html", "--strict"]
    else:
        prefill_offline_theme()
        prefill_offline_images()
        cmd = [myst, "build", "--site", "--strict"]
    env = {**os.environ, "MYST_NO_UPDATE_NOTIFIER": "1", "NO_UPDATE_NOTIFIER": "1"}
    server = None
    if not args.no_execute:
        cmd.append("--execute")
        token, port = secrets.token_hex(16), free_port()
        server = start_jupyter(token, port)
        env.update(JUPYTER_BASE_URL=f"http://127.0.0.1:{port}", JUPYTER_TOKEN=token)
    print(("online: " if online else "offline: ") + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    try:
        rc = run_myst(cmd, env)
    finally:
        if server is not None:
            stop(server)
    if rc != 0:
        print(f"myst build failed (exit code {rc})", file=sys.stderr)
        return rc
    problems = check_site(executed=not args.no_execute)
    if problems:
        print("the built book is incomplete:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.outputs_from:
        filled = fill_outputs(args.outputs_from)
        print(f"outputs from {args.outputs_from}: {', '.join(filled) or 'no page has a notebook there'}")
    print(f"book content built in {time.perf_counter() - start:.0f} s: {summarize()}")
    if online:
        print(f"book built with the MyST book theme in _build/html: open _build/html/index.html")
        return 0
    summary = static_html()
    print(f"offline HTML book in _build/html (the book theme cannot be downloaded here): {summary['pages']} pages, "
          f"{summary['figures']} figures, {summary['links']} local links checked (0 broken) in {summary['seconds']:.1f} s; "
          f"open _build/html/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
