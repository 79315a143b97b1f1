"""The lab pipeline: solutions/ -> labs/ generation, protection of student work, and the
generated labs executing to the end with every exercise reported as not done."""

import json
import re
import shutil
from pathlib import Path

import pytest

from grading.labs import LabError, generate, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.md"))


def test_strip_solutions_keeps_signature_and_indentation():
    src = "def f(x):\n    '''doc'''\n    # BEGIN SOLUTION write f\n    y = x + 1\n    return y\n    # END SOLUTION\n"
    out = strip_solutions(src)
    assert out == "def f(x):\n    '''doc'''\n    raise NotImplementedError('write f')"
    ns = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError, match="write f"):
        ns["f"](1)


@pytest.mark.parametrize("src,match", [("# BEGIN SOLUTION\nx = 1\n", "never closed"), ("x = 1\n# END SOLUTION\n", "without BEGIN")])
def test_strip_solutions_rejects_unbalanced_markers(src, match):
    with pytest.raises(LabError, match=match):
        strip_solutions(src)


def test_labs_are_exactly_what_the_solutions_generate(tmp_path):
    out = tmp_path / "labs"
    generate(ROOT, out)
    for f in sorted(out.iterdir()):
        committed = ROOT / "labs" / f.name
        assert committed.exists(), f"labs/{f.name} is missing: run `make labs`"
        assert committed.read_text() == f.read_text(), f"labs/{f.name} is stale: run `make labs`"
    assert {p.name for p in (ROOT / "labs").iterdir() if not p.name.startswith(".") and ".bak-" not in p.name} == {
        p.name for p in out.iterdir() if not p.name.startswith(".")
    }


def test_every_solution_has_exercises_and_checks():
    assert SOLUTIONS, "no solution notebooks"
    for sol in SOLUTIONS:
        text = sol.read_text()
        n = text.count("# BEGIN SOLUTION")
        assert 4 <= n <= 6, f"{sol.name}: {n} exercises (the course asks for four to six)"
        assert text.count("# NBVAL_CHECK_OUTPUT") >= n + 1, f"{sol.name}: each exercise needs a checked cell, plus the summary"


def test_generation_never_overwrites_an_edited_lab(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    generate(root)
    lab = root / "labs" / (SOLUTIONS[0].stem + ".ipynb")
    student = lab.read_text().replace("raise NotImplementedError", "return None  # my attempt", 1)
    lab.write_text(student)
    # A changed solution would normally regenerate the lab: it must refuse instead.
    sol = root / "solutions" / SOLUTIONS[0].name
    sol.write_text(sol.read_text() + "\nOne more paragraph.\n")
    with pytest.raises(LabError, match="edited since it was generated.*FORCE=1"):
        generate(root)
    assert lab.read_text() == student, "the student's work was changed"
    # --force regenerates, keeping the student's version as a backup.
    generate(root, force=True)
    backups = list(lab.parent.glob(lab.name + ".bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == student
    assert "One more paragraph." in (root / "labs" / (SOLUTIONS[0].stem + ".md")).read_text()


def test_check_mode_reports_stale_labs(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    generate(root)
    assert generate(root, check=True) == ["labs/ is up to date"]
    sol = root / "solutions" / SOLUTIONS[0].name
    sol.write_text(sol.read_text() + "\nchanged\n")
    with pytest.raises(LabError, match="out of date"):
        generate(root, check=True)


@pytest.mark.notebook
@pytest.mark.parametrize("lab", sorted((ROOT / "labs").glob("*.ipynb")), ids=lambda p: p.name)
def test_blank_lab_runs_to_the_end_and_reports_every_exercise_not_done(lab):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(lab, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(lab.parent)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "stream"
    )
    lines = re.findall(r"^\[(PASS|FAIL|TODO)\] Exercise (\d+) (\S+): (.*)$", text, flags=re.M)
    n_exercises = lab.with_suffix(".md").read_text().count("raise NotImplementedError(")
    assert len(lines) == n_exercises, f"expected {n_exercises} check lines, got {lines}"
    assert all(status == "TODO" for status, *_ in lines), lines
    assert re.search(rf": 0/{n_exercises} exercises passed, 0/\d+ points", text), text[-300:]
    print(f"{lab.name}: {n_exercises} exercises, all reported TODO")
