"""Write the book's generated pages into book/ (what `make book` runs first).

    python scripts/book_pages.py

- book/api/index.md and one book/api/course_lib.NAME.md per module: the API reference of
  `course_lib`, from its docstrings and signatures. Every module gets the label `api-NAME` and
  every public function, class and method `api-NAME-OBJECT` (e.g. `api-vit-patchify`,
  `api-vit-vit-forward-features`; when two names would share a label, the second gets its kind
  appended, e.g. `api-convnext-grn-class`), so a lecture links to `[](#api-vit-patchify)`.
- book/references.md: the papers of references.bib, grouped by the lectures and labs that cite
  them; the book renders the full entries below the lists.

The pages are generated, never edited by hand (book/api/ and book/references.md are ignored by
git): change a docstring or references.bib and rebuild.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BOOK = ROOT / "book"
from grading.notebooks import read_release  # noqa: E402

SOURCE_URL = read_release(ROOT).blob("")  # the source at the release the notebooks install (release.toml)
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")


def label(*parts: str) -> str:
    """`api-vit-vit-forward-features` for ("vit", "ViT", "forward_features"): lower case, one dash
    between words, as MyST writes the HTML anchor."""
    return "api-" + "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def unique(lab: str, kind: str, seen: set[str]) -> str:
    """`grn` and `GRN`, or `clip_loss` and `CLIP.loss`, share a label: the second gets its kind."""
    if lab in seen:
        lab = f"{lab}-{kind}"
    if lab in seen:
        raise SystemExit(f"two API objects would share the label {lab!r}: rename one")
    seen.add(lab)
    return lab


def markdown(doc: str | None) -> str:
    """A docstring as Markdown. Outside `code spans`, `<image>` would read as an HTML tag."""
    parts = (doc or "*(no docstring)*").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


class _Annotation(str):
    """A string annotation (`from __future__ import annotations`) shown without quotes."""

    def __repr__(self) -> str:
        return str(self)


def signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    unquote = lambda a: _Annotation(a) if isinstance(a, str) else a  # noqa: E731
    sig = sig.replace(parameters=[p.replace(annotation=unquote(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=unquote(sig.return_annotation))
    return f"{name}{sig}"


def public_members(module) -> list[tuple[str, object]]:
    """Functions and classes defined in `module` (not imported into it), in source order."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    members = [(n, getattr(module, n)) for n in names]
    members = [(n, o) for n, o in members if (inspect.isfunction(o) or inspect.isclass(o))
               and getattr(o, "__module__", None) == module.__name__]

    def line(item):
        try:
            return inspect.getsourcelines(item[1])[1]
        except (OSError, TypeError):
            return 0

    return sorted(members, key=line)


def class_methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, obj in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            obj = obj.fget
        if inspect.isfunction(obj):
            out.append((name, obj))
    return out


def source_link(obj, path: str) -> str:
    try:
        line = inspect.getsourcelines(obj)[1]
        return f"[source]({SOURCE_URL}{path}#L{line})"
    except (OSError, TypeError):
        return f"[source]({SOURCE_URL}{path})"


def teaching_pages() -> dict[str, list[str]]:
    """Module -> links to the lectures and labs whose header links to its API page."""
    out: dict[str, list[str]] = {}
    for folder in ("lectures", "labs"):
        for path in sorted((ROOT / folder).glob("*.md")):
            text = path.read_text()
            title = next((ln[2:] for ln in text.splitlines() if ln.startswith("# ")), path.stem)
            for short in dict.fromkeys(re.findall(r"\]\(#api-([a-z0-9]+)\)", text)):
                out.setdefault(short, []).append(f"[{title}](../../{folder}/{path.name})")
    return out


def module_page(short: str, module, taught_in: list[str] = ()) -> str:
    path = Path(module.__file__).relative_to(ROOT).as_posix()
    lines = [f"---\ntitle: course_lib.{short}\n---\n", f"({label(short)})=",
             f"# `course_lib.{short}`\n", markdown(inspect.getdoc(module)), "",
             f"Source: [{path}]({SOURCE_URL}{path})\n"]
    if taught_in:
        lines.append("Taught in: " + " · ".join(taught_in) + "\n")
    seen = {label(short)}
    for name, obj in public_members(module):
        kind = "class" if inspect.isclass(obj) else "function"
        if dataclasses.is_dataclass(obj):
            kind = "dataclass"
        lab = unique(label(short, name), "class" if inspect.isclass(obj) else "function", seen)
        lines += [f"({lab})=", f"## `{name}`\n", f"*{kind}* · {source_link(obj, path)}\n",
                  "```python", signature(name, obj), "```\n", markdown(inspect.getdoc(obj)), ""]
        if dataclasses.is_dataclass(obj):
            fields = dataclasses.fields(obj)
            if fields:
                lines += ["| field | type | default |", "| --- | --- | --- |"]
                for f in fields:
                    default = f.default if f.default is not dataclasses.MISSING else (
                        "(factory)" if f.default_factory is not dataclasses.MISSING else "required")
                    ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                    cells = [f"`{f.name}`", f"`{ftype}`", f"`{default!r}`"]
                    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a | in a cell ends it
                lines.append("")
        if inspect.isclass(obj):
            for mname, meth in class_methods(obj):
                mlab = unique(label(short, name, mname), "method", seen)
                lines += [f"({mlab})=", f"### `{name}.{mname}`\n", "```python",
                          signature(mname, meth), "```\n", markdown(inspect.getdoc(meth)), ""]
    return "\n".join(lines) + "\n"


def api_pages() -> dict[str, str]:
    import course_lib

    pages, rows, taught = {}, [], teaching_pages()
    for info in sorted(pkgutil.iter_modules(course_lib.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"course_lib.{info.name}")
        pages[f"api/course_lib.{info.name}.md"] = module_page(info.name, module, taught.get(info.name, []))
        summary = (inspect.getdoc(module) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(f"| [`course_lib.{info.name}`](#{label(info.name)}) | {markdown(summary)} |")
    index = [
        "---\ntitle: API reference\n---\n", "(api)=", "# API reference: `course_lib`\n",
        markdown(inspect.getdoc(course_lib)), "",
        "Generated from the docstrings by `scripts/book_pages.py` each time the book is built. "
        "Every lecture builds on these modules; its header links to the module it teaches.\n",
        "| module | what it holds |", "| --- | --- |", *rows, "",
    ]
    pages["api/index.md"] = "\n".join(index) + "\n"
    return pages


def bib_entries(bib: Path) -> dict[str, str]:
    """key -> title, read from references.bib (enough BibTeX for our own file)."""
    entries = {}
    for m in re.finditer(r"@\w+\{([^,\s]+),(.*?)\n\}", bib.read_text(), flags=re.S):
        title = re.search(r"title\s*=\s*\{(.*)\},?\s*$", m.group(2), flags=re.M)
        entries[m.group(1)] = re.sub(r"[{}]", "", title.group(1)).replace("\\&", "&") if title else m.group(1)
    return entries


def cited_keys(text: str) -> list[str]:
    keys = []
    for group in CITE.findall(text):
        for key in re.split(r"[,;]", group):
            key = re.sub(r"\{[^}]*\}", "", key).strip()  # drop {prefix}/{suffix}
            if key and key not in keys:
                keys.append(key)
    return keys


def references_page() -> str:
    entries = bib_entries(ROOT / "references.bib")
    lines = ["---\ntitle: References\n---\n", "(references)=", "# References\n",
             "The papers each lecture and lab cites, in the order it cites them; the full entries, "
             "with links, are listed at the bottom of this page. The bibliography lives in "
             "`references.bib`.\n"]
    for folder, what in (("lectures", "Lecture"), ("solutions", "Lab")):
        for path in sorted((ROOT / folder).glob("*.md")):
            keys = cited_keys(path.read_text())
            if not keys:
                continue
            title = next((ln[2:] for ln in path.read_text().splitlines() if ln.startswith("# ")), path.stem)
            target = f"../{folder}/{path.name}" if folder == "lectures" else f"../labs/{path.name}"
            lines.append(f"## [{title}]({target})\n")
            lines += [f"- {{cite:t}}`{k}`, *{entries.get(k, k)}*" for k in keys]
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    pages = api_pages()
    pages["references.md"] = references_page()
    for stale in (BOOK / "api").glob("*.md") if (BOOK / "api").exists() else []:
        if f"api/{stale.name}" not in pages:
            stale.unlink()
    for rel, text in pages.items():
        target = BOOK / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    print(f"book pages: {len(pages) - 2} API modules, index and references written under book/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
