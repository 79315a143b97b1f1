"""Every notebook's source is a MyST Markdown file; the .ipynb copies (for Colab and nbval) must
hold the same cells, as `grading.notebooks.markdown_to_notebook` writes them (MyST rewritten into
plain Markdown). Notebooks also follow the course's conventions."""

from pathlib import Path

import jupytext
import pytest

from grading.notebooks import markdown_to_notebook

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("lectures", "solutions", "labs") for p in (ROOT / folder).glob("*.md"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ipynb_copy_is_in_sync(md):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.relative_to(ROOT)} is missing: run `make notebooks`"
    a, b = _cells(markdown_to_notebook(md.read_text(), md.parent.name)), _cells(jupytext.read(ipynb))
    assert a == b, f"{md.relative_to(ROOT)} and its .ipynb differ: run `make notebooks`"


@pytest.mark.parametrize("md", [p for p in SOURCES if p.parent.name == "lectures"], ids=lambda p: p.name)
def test_lecture_conventions(md):
    text = md.read_text()
    nb = jupytext.read(md)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0], "the first code cell installs the course on Colab"
    assert any("course_lib" in c for c in code), "lectures build on course_lib"
    assert "widgets." in text, "each lecture has an ipywidgets interaction"
    assert "## Check your understanding" in text and "## Further reading" in text
    assert "matplotlib.use(" not in text, "a non-inline backend hides the figures"


def test_lecture_ipynb_copies_carry_no_outputs():
    for ipynb in (ROOT / "lectures").glob("*.ipynb"):
        nb = jupytext.read(ipynb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{ipynb.name} has stored outputs"


def test_solution_notebooks_store_their_check_output():
    for ipynb in (ROOT / "solutions").glob("*.ipynb"):
        nb = jupytext.read(ipynb)
        checked = [c for c in nb.cells if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in c.source]
        assert checked and all(c.get("outputs") for c in checked), f"{ipynb.name}: run `make notebooks` to record outputs"
        summary = "".join(o.get("text", "") for o in checked[-1].outputs)
        assert "exercises passed" in summary and "[FAIL]" not in summary and "[TODO]" not in summary, summary
