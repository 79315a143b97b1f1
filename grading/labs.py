"""Generate the student labs (labs/) from the solution notebooks (solutions/).

    python -m grading.labs            # regenerate labs/ (what `make labs` runs)
    python -m grading.labs --check    # exit 1 if labs/ is not what the solutions generate
    python -m grading.labs --force    # regenerate even edited labs, keeping a backup of each

In a solution, the code between `# BEGIN SOLUTION` and `# END SOLUTION` is replaced by a stub
that raises NotImplementedError (with the text after `# BEGIN SOLUTION`, if any, as its message);
cells tagged `remove-in-lab` are dropped; outputs are cleared; links to the solution's own .ipynb
(its "Open in Colab" badge) point to the lab's. Each lab is written as MyST
Markdown and as .ipynb. labs/.manifest.json records a hash of every generated file, so that a lab
a student has edited is never overwritten: generation refuses, and --force keeps a backup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat

from .notebooks import markdown_to_notebook

BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*(.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
MANIFEST = ".manifest.json"
BANNER = (
    "```{{note}}\nThis is the student version of this lab, generated from `solutions/{name}.md` by "
    "`make labs`. Fill in every function that raises `NotImplementedError`, then run its check cell.\n```"
)


class LabError(RuntimeError):
    pass


def strip_solutions(source: str, where: str = "") -> str:
    """Replace each `# BEGIN SOLUTION ... # END SOLUTION` region by a NotImplementedError stub."""
    out, inside, line_no = [], False, 0
    for line_no, line in enumerate(source.splitlines(), 1):
        m = BEGIN.match(line)
        if m:
            if inside:
                raise LabError(f"{where}: nested '# BEGIN SOLUTION' at line {line_no}")
            inside = True
            hint = m.group(2).strip() or "write your solution here"
            out.append(f"{m.group(1)}raise NotImplementedError({hint!r})")
        elif END.match(line):
            if not inside:
                raise LabError(f"{where}: '# END SOLUTION' without BEGIN at line {line_no}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise LabError(f"{where}: '# BEGIN SOLUTION' is never closed by '# END SOLUTION'")
    return "\n".join(out)


def make_lab(solution: Path) -> nbformat.NotebookNode:
    """The student notebook for one solution file."""
    nb = markdown_to_notebook(solution.read_text())
    cells = []
    for i, cell in enumerate(nb.cells):
        if "remove-in-lab" in cell.metadata.get("tags", []):
            continue
        cell = nbformat.from_dict(dict(cell))
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{solution.name}, cell {i + 1}")
            cell.outputs, cell.execution_count = [], None
        else:  # the solution's "Open in Colab" badge opens the student version
            cell.source = cell.source.replace(f"/solutions/{solution.stem}.ipynb", f"/labs/{solution.stem}.ipynb")
        cells.append(cell)
    # The banner goes after the title cell.
    cells.insert(1, nbformat.v4.new_markdown_cell(BANNER.format(name=solution.stem)))
    for i, cell in enumerate(cells):  # stable ids: regenerating gives the same bytes
        cell.id = hashlib.sha1(f"{solution.stem}-{i}".encode()).hexdigest()[:8]
    nb.cells = cells
    nb.metadata.pop("widgets", None)
    return nb


def render(nb: nbformat.NotebookNode) -> dict[str, str]:
    """The text of the .md and .ipynb files for a notebook."""
    from grading.notebooks import markdown_to_notebook, notebook_text

    md = jupytext.writes(nb, fmt="md:myst")
    ipynb = notebook_text(markdown_to_notebook(md, "labs"))
    return {".md": md, ".ipynb": ipynb}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generate(root: Path, out: Path | None = None, force: bool = False, check: bool = False) -> list[str]:
    """Write (or with check=True, compare) every lab. Returns the messages to print."""
    solutions = sorted((root / "solutions").glob("*.md"))
    if not solutions:
        raise LabError(f"no solution notebooks in {root / 'solutions'}: run from the course's top folder")
    out = out or root / "labs"
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    messages, stale, edited, new_manifest = [], [], [], {}
    for sol in solutions:
        for suffix, text in render(make_lab(sol)).items():
            target = out / (sol.stem + suffix)
            new_manifest[target.name] = _sha(text)
            current = target.read_text() if target.exists() else None
            if current == text:
                continue
            if check:
                stale.append(target.name)
                continue
            if current is not None and _sha(current) != manifest.get(target.name):
                if not force:
                    edited.append(target)
                    continue
                backup = target.with_name(target.name + time.strftime(".bak-%Y%m%d-%H%M%S"))
                backup.write_text(current)
                messages.append(f"kept your edited {target.name} as {backup.name}")
            target.write_text(text)
            messages.append(f"wrote {target.relative_to(root) if target.is_relative_to(root) else target}")
    if check:
        if stale:
            raise LabError(f"labs are out of date with solutions/: {', '.join(stale)}. Run `make labs`.")
        return ["labs/ is up to date"]
    if edited:
        names = ", ".join(str(p.name) for p in edited)
        raise LabError(
            f"not overwriting {names}: edited since it was generated (your work is safe). Move your "
            "copy elsewhere, or run `make labs FORCE=1` to regenerate and keep a timestamped backup."
        )
    new_text = json.dumps(new_manifest, indent=1, sort_keys=True) + "\n"
    if not manifest_path.exists() or manifest_path.read_text() != new_text:
        manifest_path.write_text(new_text)
    return messages or ["labs/ is up to date"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path.cwd(), help="the course's top folder")
    p.add_argument("--out", type=Path, default=None, help="where to write the labs (default ROOT/labs)")
    p.add_argument("--force", action="store_true", help="regenerate edited labs, keeping a backup")
    p.add_argument("--check", action="store_true", help="only check that labs/ is up to date")
    args = p.parse_args(argv)
    try:
        for m in generate(args.root, args.out, args.force, args.check):
            print(m)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
