"""The book's table of contents and pages build with MyST in --strict mode (without executing the
notebooks here; `make book` executes them). Offline, as in CI, this is the site-content build."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (Path(sys.executable).parent / "myst").exists(), reason="mystmd is not installed")
def test_book_builds_every_page_strictly():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute", "--offline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((ROOT / "_build" / "site" / "config.json").read_text())
    built = {page["slug"] for project in config["projects"] for page in project["pages"] if "slug" in page}
    expected = [p for folder in ("lectures", "labs", "solutions", "data") for p in (ROOT / folder).glob("*.md")]
    assert len(built) >= len(expected), f"{len(built)} pages built for {len(expected)} sources"
    contents = list((ROOT / "_build" / "site" / "content").glob("*.json"))
    assert len(contents) >= len(expected) + 1  # + the README landing page
    print(f"book: {len(contents)} pages built with --strict")
