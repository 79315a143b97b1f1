"""The `.ipynb` files students open, written from the MyST Markdown (`.md`) sources.

`markdown_to_notebook(text)` is the one place where a `.md` source becomes a notebook: the lab
generator and `make notebooks` (`python -m grading.notebooks`) both call it.

The `.md` sources keep full MyST for the book. Plain JupyterLab and Colab render CommonMark and
LaTeX only, so the markdown cells of the notebook are rewritten (`plain_markdown`):

- citations `{cite:t}`key`` -> "[Dosovitskiy et al. (2021)](paper URL)", `{cite:p}` ->
  "([Dosovitskiy et al., 2021](URL))", `{cite:alp}` -> the same without parentheses, with the
  authors, year and URL read from references.bib;
- admonitions (`:::{important} Title` ... `:::`, a fenced `{note}`) -> a blockquote with a bold title;
- `(label)=` targets -> removed;
- links to other files and to the API reference (`#api-vit`) -> the file in the repository at the
  course's release (release.toml), which opens wherever the notebook was opened.

`raw_myst(text)` lists what is left of MyST in a markdown cell; the tests require none.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import re
import sys
import unicodedata
from pathlib import Path, PurePosixPath

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_FOLDERS = ("lectures", "solutions", "labs")
CITE = re.compile(r"\{cite(?::(\w+))?\}`([^`]+)`")
TARGET = re.compile(r"^\([\w.:-]+\)=[ \t]*\n?", flags=re.M)
# An admonition: colon fence (`:::{important} Title`) or backtick fence (```{note}), up to the
# closing fence of the same length. (Other directives are left alone, and raw_myst reports them.)
ADMONITION_KINDS = "admonition|attention|caution|danger|error|hint|important|note|seealso|tip|warning"
ADMONITION = re.compile(rf"^(?P<fence>:{{3,}}|`{{3,}})\{{(?P<kind>{ADMONITION_KINDS})\}}[ \t]*(?P<title>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                        flags=re.M | re.S)
LINK = re.compile(r"(?<!!)\[(?P<text>(?:[^\[\]]|\[[^\]]*\])*)\]\((?P<url>[^)\s]+)\)")
# What plain Markdown renders as raw text: roles, directives, targets, MyST-only link targets.
RAW_MYST = {
    "role": re.compile(r"\{[\w:-]+\}`"),
    "directive": re.compile(r"^(:{3,}|`{3,})\{", flags=re.M),
    "colon fence": re.compile(r"^:::", flags=re.M),
    "target": re.compile(r"^\([\w.:-]+\)=", flags=re.M),
    "MyST-only link": re.compile(r"\]\((#api-[^)]*|[^):]+\.md(#[^)]*)?)\)"),
}
LATEX_ACCENTS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", "c": "\u0327", "u": "\u0306"}


class NotebookError(ValueError):
    """A `.md` source that cannot become a clean notebook (an unknown citation key, say)."""


@dataclasses.dataclass(frozen=True)
class Release:
    """The repository and the tag the notebooks' Colab cells install and their badges open
    (release.toml, written by `make release`)."""

    repository: str  # https://github.com/OWNER/NAME
    tag: str

    @property
    def github(self) -> str:
        """`OWNER/NAME`."""
        return self.repository.removeprefix("https://github.com/").rstrip("/")

    @property
    def pip_url(self) -> str:
        return f"git+{self.repository}@{self.tag}"

    def blob(self, path: str) -> str:
        """The file at this release on GitHub (which renders notebooks and Markdown)."""
        return f"{self.repository}/blob/{self.tag}/{path}"

    def colab(self, path: str) -> str:
        return f"https://colab.research.google.com/github/{self.github}/blob/{self.tag}/{path}"


def read_release(root: Path = ROOT) -> Release:
    # `key = "value"` lines: all release.toml holds (tomllib needs Python 3.11; the course runs on 3.10).
    config = dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"', (root / "release.toml").read_text(), flags=re.M))
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", config["repository"]):
        raise NotebookError(f"release.toml: repository {config['repository']!r} is not https://github.com/OWNER/NAME")
    return Release(config["repository"], config["tag"])


def _latex_to_text(s: str) -> str:
    """`J{\\'e}gou` -> `Jégou`: the accents and braces of our own references.bib."""
    s = re.sub(r"\\i\b", "\u0131", s)  # dotless i (H{\\i}zl{\\i})
    s = re.sub(r"\{?\\([`'\"^~cu])\{?(\w)\}?\}?", lambda m: unicodedata.normalize("NFC", m.group(2) + LATEX_ACCENTS[m.group(1)]), s)
    return s.replace("\\&", "&").replace("{", "").replace("}", "")


@functools.cache
def bibliography(bib: Path = ROOT / "references.bib") -> dict[str, dict[str, str]]:
    """key -> {"authors": "Dosovitskiy et al.", "year": "2021", "url": ...} from references.bib."""
    entries = {}
    for m in re.finditer(r"@\w+\{([^,\s]+),(.*?)\n\}", bib.read_text(), flags=re.S):
        fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", m.group(2), flags=re.M))
        surnames = [_latex_to_text(a.split(",")[0].strip()) for a in fields.get("author", "").split(" and ")]
        if len(surnames) > 2:
            authors = f"{surnames[0]} et al."
        else:
            authors = " and ".join(surnames)
        entries[m.group(1)] = {"authors": authors, "year": fields.get("year", "n.d."), "url": fields.get("url", "")}
    return entries


def _citation(kind: str | None, keys: str, bib: dict) -> str:
    parts = []
    for key in (k.strip() for k in re.split(r"[,;]", keys)):
        if key not in bib:
            raise NotebookError(f"the citation key {key!r} is not in references.bib: add the entry or fix the key")
        e = bib[key]
        text = f"{e['authors']} ({e['year']})" if kind == "t" else f"{e['authors']}, {e['year']}"
        parts.append(f"[{text}]({e['url']})" if e["url"] else text)
    joined = "; ".join(parts)
    return f"({joined})" if kind in (None, "p") else joined


def _admonition(m: re.Match) -> str:
    title = m.group("title").strip() or m.group("kind").replace("-", " ").capitalize()
    body = re.sub(r"^(:\w[\w-]*:.*\n)+", "", m.group("body"))  # directive options (`:class: ...`)
    lines = [f"**{title}**", ""] + body.rstrip("\n").split("\n")
    return "\n".join(("> " + ln).rstrip() for ln in lines)


def _link(m: re.Match, folder: str, release: Release) -> str:
    text, url = m.group("text"), m.group("url")
    if re.match(r"[a-z][\w+.-]*:", url):  # https:, mailto:, ...
        return m.group(0)
    if url.startswith("#api-"):
        # #api-vit, #api-vit-patchify, #api-image-encoder-...: the module's source file (the labels
        # of scripts/book_pages.py write `_` as `-`; the longest module name that fits wins).
        modules = {f"#api-{p.stem.replace('_', '-')}": p for p in (ROOT / "course_lib").iterdir()
                   if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
        fits = [a for a in modules if url == a or url.startswith(a + "-")]
        if not fits:
            raise NotebookError(f"the link {url!r} names no module of course_lib (labels: api-MODULE[-OBJECT])")
        path = modules[max(fits, key=len)].relative_to(ROOT).as_posix()
        return f"[{text or path}]({release.blob(path)})"
    if url.startswith("#"):
        return m.group(0)  # a heading of this notebook
    path, _, _fragment = url.partition("#")
    target = PurePosixPath(folder) / path
    parts: list[str] = []
    for part in target.parts:
        if part == "..":
            if not parts:
                raise NotebookError(f"the link {url!r} leaves the repository")
            parts.pop()
        elif part != ".":
            parts.append(part)
    resolved = "/".join(parts)
    if parts and parts[0] in NOTEBOOK_FOLDERS and resolved.endswith(".md"):
        resolved = resolved[: -len(".md")] + ".ipynb"  # the notebook students open
    # MyST labels (`#vit-registers`) are no anchors on GitHub: link the file.
    return f"[{text or resolved}]({release.blob(resolved)})"


def plain_markdown(text: str, folder: str = "lectures", release: Release | None = None) -> str:
    """A markdown cell's MyST -> CommonMark that plain Jupyter and Colab render (module docstring)."""
    release = release or read_release()
    bib = bibliography()
    text = ADMONITION.sub(_admonition, text)
    text = TARGET.sub("", text)
    text = CITE.sub(lambda m: _citation(m.group(1), m.group(2), bib), text)
    return LINK.sub(lambda m: _link(m, folder, release), text)


def raw_myst(text: str) -> list[str]:
    """The MyST constructs in `text` that plain Markdown shows as raw text: `role: {cite:t}`..."""
    found = []
    for what, pattern in RAW_MYST.items():
        for m in pattern.finditer(text):
            line = text[text.rfind("\n", 0, m.start()) + 1: text.find("\n", m.end()) % (len(text) + 1)]
            found.append(f"{what}: {line.strip()[:100]}")
    return found


def notebook_folder(nb: nbformat.NotebookNode) -> str:
    """The folder a notebook lives in, read from its own Colab badge (`.../blob/TAG/labs/01_vit.ipynb`)."""
    for cell in nb.cells:
        m = re.search(r"colab\.research\.google\.com/github/[^)\s]*/blob/[^/]+/(\w+)/[\w.-]+\.ipynb", cell.source)
        if m and m.group(1) in NOTEBOOK_FOLDERS:
            return m.group(1)
    return "lectures"


def markdown_to_notebook(text: str, folder: str | None = None, release: Release | None = None) -> nbformat.NotebookNode:
    """A MyST Markdown notebook source -> the notebook students open (no outputs).

    `folder` (lectures, solutions or labs) resolves relative links; by default it is read from
    the notebook's Colab badge."""
    nb = jupytext.reads(text, fmt="md:myst")
    folder = folder or notebook_folder(nb)
    release = release or read_release()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = plain_markdown(cell.source, folder, release)
        # Ids from the content, not random: regenerating an unchanged notebook changes nothing.
        cell.id = hashlib.sha1(f"{i}\n{cell.source}".encode()).hexdigest()[:8]
    # No pairing with the .md: saving the notebook in JupyterLab must not rewrite the MyST source.
    jupytext_meta = nb.metadata.get("jupytext", {})
    for key in ("formats", "text_representation"):
        jupytext_meta.pop(key, None)
    if not jupytext_meta:
        nb.metadata.pop("jupytext", None)
    return nb


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The .ipynb file's text (nbformat's layout, a final newline)."""
    return nbformat.writes(nb) + "\n"


def with_outputs(nb: nbformat.NotebookNode, previous: Path, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """`nb` with outputs: those of `previous` (the .ipynb written last time) when every code cell
    is unchanged, otherwise executed here (nbclient; cells tagged raises-exception may raise)."""
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    if previous.exists():
        old = nbformat.read(previous, as_version=4)
        old_code = [c for c in old.cells if c.cell_type == "code"]
        if [c.source for c in old_code] == code and all(c.get("outputs") is not None for c in old_code):
            new_code = [c for c in nb.cells if c.cell_type == "code"]
            for new, prev in zip(new_code, old_code):
                new.outputs, new.execution_count = prev.outputs, prev.execution_count
            return nb
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def write_notebooks(root: Path = ROOT, execute: bool = False) -> list[str]:
    """`make notebooks`: lectures/*.ipynb (no outputs) and solutions/*.ipynb (with outputs:
    reused when the code is unchanged, executed otherwise or with `execute`)."""
    written = []
    release = read_release(root)
    for folder in ("lectures", "solutions"):
        for md in sorted((root / folder).glob("*.md")):
            nb = markdown_to_notebook(md.read_text(), folder, release)
            ipynb = md.with_suffix(".ipynb")
            if folder == "solutions":
                nb = with_outputs(nb, ipynb if not execute else Path("/nonexistent"), md.parent)
            text = notebook_text(nb)
            if not ipynb.exists() or ipynb.read_text() != text:
                ipynb.write_text(text)
                written.append(ipynb.relative_to(root).as_posix())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write lectures/*.ipynb and solutions/*.ipynb from their .md sources.")
    p.add_argument("--execute", action="store_true", help="execute every solution, even when its code is unchanged")
    args = p.parse_args(argv)
    written = write_notebooks(execute=args.execute)
    print(f"{len(written)} notebooks written" + (": " + ", ".join(written) if written else " (all up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
