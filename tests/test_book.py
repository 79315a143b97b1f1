"""The book: its table of contents, citations, cross-references and generated pages build with MyST
in --strict mode (without executing the notebooks here; `make book` executes them and checks
their figures). Offline, as in CI, this is the site-content build, rendered into the static HTML
book (_build/html) by scripts/static_book.mjs; tests/test_browser.py opens it in Chromium."""

import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from grading.notebooks import read_release

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book_pages  # noqa: E402
import build_book  # noqa: E402

NOTEBOOKS = sorted(p for folder in ("lectures", "labs") for p in (ROOT / folder).glob("*.md"))


def bib_keys() -> set[str]:
    return set(book_pages.bib_entries(ROOT / "references.bib"))


BUILD_OUTPUT = {}


@pytest.fixture(scope="module")
def site():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute", "--offline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    BUILD_OUTPUT["stdout"] = proc.stdout
    return build_book.page_contents()


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "myst").exists(), reason="mystmd is not installed")
def test_offline_html_book_has_every_page_and_no_broken_link(site):
    """The static HTML book: one file per page of the table of contents, a sidebar that lists every
    page, MyST rendered (citations linked to each page's reference list, admonitions, MathML),
    no raw MyST, every local link and anchor resolved (static_book.mjs fails otherwise)."""
    html = ROOT / "_build" / "html"
    line = next(ln for ln in BUILD_OUTPUT["stdout"].splitlines() if ln.startswith("offline HTML book"))
    print(line)
    files = sorted(p.name for p in html.glob("*.html"))
    assert len(files) == len(site) and "index.html" in files, (len(files), len(site))
    assert "0 broken" in line and int(re.search(r"(\d+) local links checked", line).group(1)) > 1000
    lecture = (html / "lectures.vit.html").read_text()
    for page in [f for f in files if f.startswith("lectures.")]:
        assert f'href="{page}"' in lecture, f"the sidebar does not list {page}"
    assert re.search(r'<a href="#cite-dosovitskiy2021vit" class="cite">', lecture)
    assert '<li id="cite-dosovitskiy2021vit">' in lecture and "arxiv.org/abs/2010.11929" in lecture
    assert '<aside class="admonition important">' in lecture and "Key idea" in lecture
    assert "<math" in lecture, "math is rendered (MathML)"
    text = re.sub(r"<pre.*?</pre>|<[^>]+>", "", lecture, flags=re.S)
    assert "{cite" not in text and ":::" not in text, "raw MyST in the HTML book"


@pytest.mark.skipif(not (Path(sys.executable).parent / "myst").exists(), reason="mystmd is not installed")
def test_book_builds_every_page_strictly(site):
    missing = [p for p in build_book.expected_pages() if p not in site]
    assert not missing, f"pages not built: {missing}"
    assert not build_book.check_site(executed=False)
    modules = sorted(p.stem for p in (ROOT / "course_lib").glob("*.py") if p.stem != "__init__")
    api = [p for p in site if p.startswith("book/api/course_lib.")]
    assert len(api) >= len(modules), f"API pages {api} for modules {modules}"
    print(f"book: {len(site)} pages built with --strict, {len(api)} API pages")


@pytest.mark.skipif(not (Path(sys.executable).parent / "myst").exists(), reason="mystmd is not installed")
def test_every_reference_is_cited_and_rendered(site):
    cited = set()
    for page in site.values():
        cited |= set(page.get("references", {}).get("cite", {}).get("order", []))
    assert cited == bib_keys(), f"cited but not in references.bib: {cited - bib_keys()}; never cited: {bib_keys() - cited}"
    refs = site["book/references.md"]["references"]["cite"]
    assert set(refs["order"]) == bib_keys(), "the references page lists every entry"
    assert all("arxiv.org" in refs["data"][k]["html"] for k in refs["order"]), "every entry links to the paper"


@pytest.mark.skipif(not (Path(sys.executable).parent / "myst").exists(), reason="mystmd is not installed")
def test_solutions_are_a_part_the_book_can_drop(site):
    """Nothing outside solutions/ links into it, so an instructor can remove the part."""
    def link_urls(node):
        if isinstance(node, list):
            return [u for v in node for u in link_urls(v)]
        if not isinstance(node, dict):
            return []
        own = [node.get("url", "")] if node.get("type") in ("link", "crossReference") else []
        return own + [u for v in node.values() for u in link_urls(v)]

    for source, page in site.items():
        if not source.startswith("solutions/"):
            into = [u for u in link_urls(page["mdast"]) if u.startswith("/solutions") or "solutions/" in u]
            assert not into, f"{source} links into the solutions: {into}"


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_has_a_colab_badge_for_itself(md):
    """Every lecture and lab opens in Colab from its badge, and installs the course there, both
    at the release of release.toml."""
    release = read_release()
    nb = jupytext.read(md)
    title_cell = nb.cells[0].source
    target = release.colab(f"{md.parent.name}/{md.stem}.ipynb")
    assert f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({target})" in title_cell
    install = next(c.source for c in nb.cells if c.cell_type == "code")
    assert release.pip_url in install and "google.colab" in install


def test_citations_use_keys_of_the_bibliography():
    keys = bib_keys()
    for folder in ("lectures", "solutions", "labs"):
        for md in (ROOT / folder).glob("*.md"):
            unknown = set(book_pages.cited_keys(md.read_text())) - keys
            assert not unknown, f"{md.relative_to(ROOT)} cites {unknown}, not in references.bib"


def test_api_labels_are_unique_and_cover_public_functions():
    pages = book_pages.api_pages()
    labels = re.findall(r"^\((api[^)]*)\)=$", "".join(pages.values()), flags=re.M)
    assert len(labels) == len(set(labels))
    assert "api-vit-patchify" in labels and "api-mae-random-masking" in labels and "api-clip-clip-loss" in labels
