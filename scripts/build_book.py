"""Build the course book with MyST (what `make book` runs).

    python scripts/build_book.py                # execute every notebook and build the book
    python scripts/build_book.py --no-execute   # only check and build the pages

Online, this builds the HTML site with the book theme into _build/html. Offline (no route to
api.mystmd.org, where MyST downloads its theme), it builds the complete site content instead into
_build/site: every page with its executed outputs and figures, cross-references and the search
index, with --strict so that any broken reference fails the build. The theme is then replaced by
an empty placeholder in _build/templates.

Notebooks execute on a Jupyter server that this script starts itself (with root allowed, since
containers and CI often run as root, and a random token) and always stops afterwards, so no
server is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
THEME = ROOT / "_build" / "templates" / "site" / "myst" / "book-theme"


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
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
            return server
        except Exception:
            if server.poll() is not None:
                raise RuntimeError(f"the Jupyter server exited with code {server.returncode}: run `{' '.join(cmd)}` to see why")
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("the Jupyter server did not start within 60 s")


def prefill_offline_theme() -> None:
    """MyST only needs the theme's template.yml to build the site content; the real theme
    (downloaded online) replaces this placeholder on the next online build."""
    if (THEME / "template.yml").exists() and not (THEME / ".offline-placeholder").exists():
        return  # a real downloaded theme: keep it
    THEME.mkdir(parents=True, exist_ok=True)
    (THEME / "template.yml").write_text("myst: v1\nkind: site\ntitle: offline placeholder for the book theme\n")
    (THEME / "package.json").write_text('{"name": "book-theme-offline-placeholder", "version": "0.0.0", "private": true}\n')
    (THEME / ".offline-placeholder").write_text("made by scripts/build_book.py for offline builds\n")


def summarize(site: Path) -> str:
    pages = sorted((site / "content").glob("*.json"))
    outputs = figures = 0
    for page in pages:
        text = page.read_text()
        outputs += text.count('"type":"output"') + text.count('"type": "output"')
        figures += text.count("image/png")
    return f"{len(pages)} pages, {outputs} executed outputs, {figures} figures"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-execute", action="store_true", help="build the pages without executing notebooks")
    p.add_argument("--offline", action="store_true", help="build the site content even if online")
    args = p.parse_args()

    online = not args.offline and is_online()
    myst = str(BIN / "myst")
    if online:
        cmd = [myst, "build", "--html"]
    else:
        prefill_offline_theme()
        cmd = [myst, "build", "--site", "--strict"]
    env = {**os.environ, "MYST_NO_UPDATE_NOTIFIER": "1"}
    server = None
    if not args.no_execute:
        cmd.append("--execute")
        token, port = secrets.token_hex(16), free_port()
        server = start_jupyter(token, port)
        env.update(JUPYTER_BASE_URL=f"http://127.0.0.1:{port}", JUPYTER_TOKEN=token)
    print(("online: " if online else "offline: ") + " ".join(cmd[1:]), flush=True)
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    if rc != 0:
        print(f"myst build failed (exit code {rc})", file=sys.stderr)
        return rc
    where = ROOT / "_build" / ("html" if online else "site")
    print(f"book built in {where.relative_to(ROOT)}: {summarize(ROOT / '_build' / 'site')}")
    if not online:
        print("offline build: the HTML theme was not downloaded; run `make book` online for _build/html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
