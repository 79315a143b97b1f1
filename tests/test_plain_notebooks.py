"""The .ipynb files students open read cleanly without MyST (plain JupyterLab, Colab): no raw
role, directive, target or book-only link in any markdown cell; citations, admonitions and links
rewritten by `grading.notebooks`; every install cell and badge pinned to release.toml."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

from grading.notebooks import (NotebookError, bibliography, markdown_to_notebook, plain_markdown, raw_myst,
                               read_release)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for folder in ("lectures", "solutions", "labs") for p in (ROOT / folder).glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))
import release  # noqa: E402

RELEASE = read_release()


def test_no_raw_myst_in_any_generated_notebook():
    assert len(NOTEBOOKS) >= 24, NOTEBOOKS
    found = {}
    for ipynb in NOTEBOOKS:
        nb = nbformat.read(ipynb, as_version=4)
        raw = [r for c in nb.cells if c.cell_type == "markdown" for r in raw_myst(c.source)]
        if raw:
            found[ipynb.relative_to(ROOT).as_posix()] = raw
    total = sum(map(len, found.values()))
    print(f"raw MyST constructs in {len(NOTEBOOKS)} notebooks: {total}")
    assert total == 0, f"run `make notebooks` / `make labs`: {json.dumps(found, indent=1)[:3000]}"


def test_sources_do_use_myst_so_the_count_above_can_fail():
    sources = [p.with_suffix(".md") for p in NOTEBOOKS]
    raw = sum(len(raw_myst(p.read_text())) for p in sources)
    assert raw > 100, "the .md sources should hold the book's MyST (citations, admonitions, API links)"


def test_citations_become_linked_author_year():
    text = "ViT {cite:t}`dosovitskiy2021vit`; DeiT {cite:p}`touvron2021deit,darcet2024registers` and {cite:alp}`dosovitskiy2021vit`."
    out = plain_markdown(text, "lectures", RELEASE)
    assert out == ("ViT [Dosovitskiy et al. (2021)](https://arxiv.org/abs/2010.11929); DeiT "
                   "([Touvron et al., 2021](https://arxiv.org/abs/2012.12877); [Darcet et al., 2024](https://arxiv.org/abs/2309.16588)) "
                   "and [Dosovitskiy et al., 2021](https://arxiv.org/abs/2010.11929).")


def test_bibliography_reads_every_entry_and_latex_accents(tmp_path):
    bib = bibliography()
    assert all(e["url"].startswith("https://") and re.fullmatch(r"\d{4}", e["year"]) for e in bib.values())
    assert not any("\\" in e["authors"] or "{" in e["authors"] for e in bib.values())
    small = tmp_path / "small.bib"
    small.write_text("@article{a2020,\n  author = {J{\\'e}gou, Herv{\\'e} and M{\\\"u}ller, Anna},\n  year = {2020},\n"
                     "  url = {https://arxiv.org/abs/1}\n}\n")
    assert bibliography(small)["a2020"] == {"authors": "J\u00e9gou and M\u00fcller", "year": "2020", "url": "https://arxiv.org/abs/1"}


def test_api_links_lead_to_the_module_source():
    blob = f"{RELEASE.repository}/blob/{RELEASE.tag}/"
    out = plain_markdown("[patchify](#api-vit-patchify) and [](#api-layers)", "labs", RELEASE)
    assert out == f"[patchify]({blob}course_lib/vit.py) and [course_lib/layers.py]({blob}course_lib/layers.py)"
    with pytest.raises(NotebookError, match="names no module"):
        plain_markdown("[x](#api-nosuchmodule)", "labs", RELEASE)


def test_unknown_citation_key_is_a_clear_error():
    with pytest.raises(NotebookError, match="'nosuchkey2099' is not in references.bib"):
        plain_markdown("{cite:t}`nosuchkey2099`", "lectures", RELEASE)


def test_admonitions_targets_and_links():
    text = (":::{important} Key idea\nPatches are tokens.\n:::\n\n```{note}\n:class: dropdown\nA note.\n```\n\n"
            "(vit-scenes)=\n## Scenes\n\nSee [lecture 04](04_mae.md#mae-simmim), [the lab](../labs/01_vit.md), "
            "[`course_lib.vit`](#api-vit), [a heading](#scenes) and [paper](https://arxiv.org/abs/1).")
    out = plain_markdown(text, "lectures", RELEASE)
    blob = f"{RELEASE.repository}/blob/{RELEASE.tag}/"
    assert out == ("> **Key idea**\n>\n> Patches are tokens.\n\n> **Note**\n>\n> A note.\n\n## Scenes\n\n"
                   f"See [lecture 04]({blob}lectures/04_mae.ipynb), [the lab]({blob}labs/01_vit.ipynb), "
                   f"[`course_lib.vit`]({blob}course_lib/vit.py), [a heading](#scenes) and [paper](https://arxiv.org/abs/1).")
    assert raw_myst(text) and not raw_myst(out)


def test_notebook_is_not_paired_with_its_source_and_is_reproducible():
    """Saving the .ipynb in JupyterLab (with jupytext) must not overwrite the MyST source."""
    text = (ROOT / "lectures" / "01_vit.md").read_text()
    a, b = markdown_to_notebook(text), markdown_to_notebook(text)
    assert "formats" not in a.metadata.get("jupytext", {})
    assert nbformat.writes(a) == nbformat.writes(b), "cell ids must not be random"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_install_cell_and_badge_name_the_release(ipynb):
    """Colab installs the release the badge opens: release.toml's repository at its tag."""
    nb = nbformat.read(ipynb, as_version=4)
    badge = RELEASE.colab(f"{ipynb.parent.name}/{ipynb.name}")
    assert f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({badge})" in nb.cells[0].source
    install = next(c.source for c in nb.cells if c.cell_type == "code")
    assert "google.colab" in install and f'%pip install -q "vit-course @ {RELEASE.pip_url}"' in install, install


def test_release_check_finds_an_unpinned_cell(tmp_path):
    assert release.disagreements(RELEASE) == [], "run `make release` (scripts/release.py)"
    unpinned = '%pip install -q "vit-course @ git+https://github.com/vit-course/vit-course"'
    assert release.pin(unpinned, RELEASE) == f'%pip install -q "vit-course @ {RELEASE.pip_url}"'
    fork = release.Release("https://github.com/uni/fork", "v9")
    assert release.pin(RELEASE.colab("labs/01_vit.ipynb"), fork) == "https://colab.research.google.com/github/uni/fork/blob/v9/labs/01_vit.ipynb"
