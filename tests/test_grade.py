"""The grader (course_lib.grade): reading and identifying submissions, spotting tampering, the
command line and the gradebook; then (marked `notebook`, they run notebooks) the crafted
submissions in tests/submissions/ against tests/expected_gradebook.csv, and every solution (full
marks) and every generated lab (zero)."""

import hashlib
import json
import pkgutil
from pathlib import Path

import pytest
import torch
from make_submissions import EXPECTED, GRADE_ARGS, OUT

from course_lib import checks as checks_package
from course_lib import grade
from course_lib.checks import lab01

ROOT = Path(__file__).resolve().parents[1]
V4 = {"cells": [{"cell_type": "markdown", "source": ["# Lab 03: ConvNeXt"]}, {"cell_type": "code", "source": ["x = 1\n", "y = 2"]}],
      "nbformat": 4, "nbformat_minor": 5, "metadata": {}}
V3 = {"nbformat": 3, "worksheets": [{"cells": [{"cell_type": "code", "input": "x = 1", "language": "python"}]}]}


@pytest.mark.parametrize("data,expected", [
    (b"", "empty file"), (b" \n", "empty file"), (b"\x89PNG\r\n\x1a\n....", "not a notebook: a PNG image"),
    (b"%PDF-1.7", "not a notebook: a PDF"), (b"def f(): pass", "not a notebook: not valid JSON"),
    (b'{"name": "alice"}', "not a notebook: JSON without cells"), (b"[1, 2]", "not a notebook: JSON without cells"),
])
def test_read_notebook_says_what_a_file_is_instead(data, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        grade.read_notebook(data)


def test_read_notebook_reads_format_4_and_format_3():
    assert grade.read_notebook(json.dumps(V4).encode()) == (["x = 1\ny = 2"], "# Lab 03: ConvNeXt")
    assert grade.read_notebook(json.dumps(V3).encode()) == (["x = 1"], "")


@pytest.mark.parametrize("code,markdown,filename,lab", [
    ("from course_lib.checks import lab02 as checks", "# Lab 05", "lab07.ipynb", "02"),
    ("checks.lab04.random_masking(random_masking)", "", "", "04"),
    ("", "# Lab 3: ConvNeXt", "x.ipynb", "03"),
    ("", "", "Alice_Lab-06.ipynb", "06"),
    ("", "## lab 1", "alice.ipynb", None),
])
def test_identify_lab(code, markdown, filename, lab):
    assert grade.identify_lab(code, markdown, filename) == lab


def test_lab_checks_accepts_1_and_01_and_names_the_labs_otherwise():
    assert grade.lab_checks("1") is grade.lab_checks("01") is lab01
    with pytest.raises(grade.GradeError, match="there is no lab '9': the labs are 01, 02"):
        grade.lab_checks("9")


def test_collect_offsets_the_seeds_of_the_notebook_cases(capsys):
    seen = []
    lab01.patchify(lambda images, p: seen.append(images) or images)  # what the notebook's check passes
    capsys.readouterr()
    same, other = grade.collect(lab01, 0)["patchify"], grade.collect(lab01, 12345)["patchify"]
    assert [torch.equal(c.args[0], x) for c, x in zip(same[1], seen)] == [True] * len(seen)
    assert [c.description for c in other[1]] == [c.description for c in same[1]]  # same shapes,
    assert not any(torch.equal(a.args[0], b.args[0]) for a, b in zip(other[1], same[1]))  # other values
    assert "run" not in vars(lab01.LAB) and lab01._gen(0).initial_seed() == 0  # the checks are left as they were


def test_every_lab_builds_its_cases_the_way_the_grader_reads_them():
    """The grader relies on the check modules' convention: a LAB, one check function per exercise
    named after it, and random values drawn from _gen(seed)."""
    for module in pkgutil.iter_modules(checks_package.__path__):
        if module.name.startswith("lab"):
            checks = grade.lab_checks(module.name[3:])
            notebook, hidden = grade.collect(checks, 0), grade.collect(checks, 99)
            assert list(notebook) == list(hidden) == checks.LAB.exercises, module.name
            assert all(len(notebook[name][1]) >= 3 for name in notebook), module.name
            same = {name for name in notebook if all(_same(a.args, b.args) for a, b in zip(notebook[name][1], hidden[name][1]))}
            assert same <= SAME_CASES, (module.name, same)


# Exercises whose grading cases are the notebook's: masks and index tables have no random values,
# and lab 05's networks come from torch.manual_seed, not _gen.
SAME_CASES = {"shifted_window_mask", "relative_position_index", "ema_update", "itc_mask", "itm_mask", "itg_mask"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.nn.Module):
        return _same(a.state_dict(), b.state_dict())
    return a == b


EXERCISES = ["patchify", "attention"]


@pytest.mark.parametrize("code,no_credit", [
    ("checks.attention = lambda fn: print('[PASS]')", {"attention": "checks.attention"}),
    ("checks.LAB.results['patchify'] = None", {"patchify": "checks.LAB.results.patchify"}),
    ("import course_lib.checks\ncourse_lib.checks.compare = lambda *a, **k: None", {"patchify": "course_lib.checks.compare", "attention": "course_lib.checks.compare"}),
    ("torch.allclose = lambda *a, **k: True", {"patchify": "torch.allclose", "attention": "torch.allclose"}),
    ("def patchify(x, p):\n    torch.Tensor.__eq__ = lambda *a: True\n    return x", {"patchify": "torch.Tensor.__eq__", "attention": "torch.Tensor.__eq__"}),
    ("setattr(checks, 'patchify', print)", {"patchify": "checks.patchify"}),
    ("class checks:\n    pass", {"patchify": "changes checks", "attention": "changes checks"}),
    ("sys.modules['course_lib.checks'] = None", {"patchify": "sys.modules", "attention": "sys.modules"}),
    ("def attention(q, k, v, mask=None):\n    from course_lib.layers import attention as a\n    return a(q, k, v)[0]", {"attention": "uses course_lib"}),
    ("def attention(q, k, v, mask=None):\n    return checks.ref_attention(q, k, v)[0]", {"attention": "uses course_lib (`checks`, line 2)"}),
    ("from course_lib.vit import patchify", {"patchify": "uses course_lib"}),
    # what honest notebooks do
    ("torch.manual_seed(0)\ntorch.backends.cudnn.deterministic = True\nF = torch.nn.functional\nchecks.patchify(patchify)", {}),
    ("%pip install -q einops\ndef patchify(images, p):\n    scores = {}\n    scores['a'] = 1\n    return images", {}),
])
def test_static_checks_spot_tampering_and_course_lib_calls(code, no_credit):
    cells = ["import sys\nimport torch\nfrom course_lib.checks import lab01 as checks", code]
    found, _ = grade.static_checks(cells, EXERCISES)
    assert found.keys() == no_credit.keys()
    for name, words in no_credit.items():
        assert found[name].startswith("no credit: ") and words in found[name], found[name]


def test_static_checks_find_nothing_wrong_in_the_solutions_and_labs():
    for nb in sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb")):
        cells, _ = grade.read_notebook(nb.read_bytes())
        no_credit, where = grade.static_checks(cells, ["patchify"])
        assert no_credit == {}, (nb.name, no_credit)


def test_static_checks_locate_functions_even_in_cells_that_do_not_compile():
    _, where = grade.static_checks(["import torch", "def patchify(x, p):\n    return (x", "def attention(q, k, v):\n    pass"], EXERCISES)
    assert where == {"patchify": 2, "attention": 3}


def test_find_submissions_flat_per_student_folders_and_hidden_files(tmp_path):
    subs = tmp_path / "subs"
    for name in ["alice.ipynb", "bob.png", "carol/lab01.ipynb", "dave/lab01.ipynb", "dave/lab01_v2.ipynb", ".hidden.ipynb",
                 "erin/.ipynb_checkpoints/lab01-checkpoint.ipynb", "gradebook/feedback/alice.txt"]:
        (subs / name).parent.mkdir(parents=True, exist_ok=True)
        (subs / name).write_text("")
    found = grade.find_submissions([subs], out=subs / "gradebook")
    assert [(student, rel) for student, _, rel in found] == [
        ("alice", "alice.ipynb"), ("bob", "bob.png"), ("carol", "carol/lab01.ipynb"),
        ("dave/lab01", "dave/lab01.ipynb"), ("dave/lab01_v2", "dave/lab01_v2.ipynb")]


@pytest.mark.parametrize("args,message", [
    (["missing/"], "missing: no such file or folder"),
    (["{empty}"], "no submissions in"),
    (["{empty}", "--lab", "12"], "there is no lab '12'"),
    (["{empty}", "--timeout", "0"], "must be positive"),
    (["{empty}", "--memory", "0.5"], "--memory must be at least 1 (GB)"),
    (["{file}", "--out", "{file}"], "is a file: give a folder"),
])
def test_command_line_errors_are_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.ipynb").write_text("")
    args = [a.format(empty=tmp_path / "empty", file=tmp_path / "file.ipynb") for a in args]
    assert grade.main([*args] if "--out" in args else [*args, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_unreadable_submissions_get_rows_and_a_rerun_resumes(tmp_path, capsys):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    (subs / "alice.ipynb").write_bytes(b"")
    assert grade.main([str(subs), "--lab", "1", "--out", str(out)]) == 0
    (subs / "bob.pdf").write_bytes(b"%PDF-1.4 my answers")  # a late submission
    capsys.readouterr()
    assert grade.main([str(subs), "--lab", "01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "alice: 0/5 points (Lab 01 (ViT)) (unchanged)" in printed and "bob: 0/5 points (Lab 01 (ViT))\n" in printed
    rows = (out / "gradebook.csv").read_text().splitlines()
    assert rows[0] == ",".join(grade.FIELDS) and len(rows) == 1 + 2 * 5
    assert rows[1] == "alice,01,1,patchify,0,1,ERROR,empty file" and rows[6] == "bob,01,1,patchify,0,1,ERROR,not a notebook: a PDF"
    (subs / "carol.ipynb").write_text(json.dumps(V4 | {"cells": []}))  # a notebook that names no lab
    assert grade.main([str(subs), "--out", str(out)]) == 0  # other settings (no --lab): all graded again
    assert (out / "gradebook.csv").read_text().splitlines()[1:] == [
        "alice,,,-,0,0,ERROR,empty file", "bob,,,-,0,0,ERROR,not a notebook: a PDF",
        "carol,,,-,0,0,ERROR,cannot tell which lab this notebook is for: grade it with --lab NN"]
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "gradebook.csv", "gradebook.json"]  # no temporary files left
    assert sorted(p.name for p in (out / "feedback").iterdir()) == ["alice.txt", "bob.txt", "carol.txt"]
    assert json.loads((out / "gradebook.json").read_text())["settings"]["lab"] is None


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Grade tests/submissions/ once; return the output folder and the submissions' hashes before."""
    out = tmp_path_factory.mktemp("gradebook")
    before = _hashes(OUT)
    assert grade.main([str(OUT), "--out", str(out), *GRADE_ARGS]) == 0
    return out, before


@pytest.mark.notebook
def test_crafted_submissions_get_the_expected_gradebook(crafted):
    out, before = crafted
    assert (out / "gradebook.csv").read_text().splitlines() == EXPECTED.read_text().splitlines(), (
        "the gradebook changed: if on purpose, run `tests/make_submissions.py --expected` and read the diff")
    assert _hashes(OUT) == before, "a submission was modified"
    book = json.loads((out / "gradebook.json").read_text())
    assert {s["student"] for s in book["submissions"]} == {p.stem for p in OUT.iterdir()}
    feedback = {p.stem: p.read_text() for p in (out / "feedback").iterdir()}
    assert feedback.keys() == {p.stem for p in OUT.iterdir()}
    assert "timed out after 5 s; skipped on a rerun" in feedback["hangs_in_c_code"]  # killed from outside
    assert "the kernel died (signal 9, out of memory?); skipped on a rerun" in feedback["kernel_dies"]
    assert "timed out after 5 s" in feedback["infinite_loop"] and "ran out of memory" in feedback["memory_hog"]


@pytest.mark.notebook
def test_a_rerun_reproduces_the_gradebook_without_grading_again(crafted, capsys):
    out, _ = crafted
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert grade.main([str(OUT), "--out", str(out), *GRADE_ARGS]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.endswith("(unchanged)") for line in printed) == len(list(OUT.iterdir())), printed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.notebook
def test_solutions_get_full_marks_and_blank_labs_zero(tmp_path):
    notebooks = sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))
    assert grade.main([*map(str, notebooks), "--out", str(tmp_path), "--timeout", "60", "--jobs", "2"]) == 0
    book = json.loads((tmp_path / "gradebook.json").read_text())
    for record in book["submissions"]:
        statuses = {r["status"] for r in record["rows"]}
        points = sum(r["points"] for r in record["rows"])
        if record["student"].startswith("solutions/"):
            assert statuses == {"PASS"} and points == sum(r["max_points"] for r in record["rows"]), record
        else:
            assert statuses == {"TODO"} and points == 0, record
        assert record["lab"] == Path(record["file"]).name[:2] and not record["notes"], record
    assert len(book["submissions"]) == len(notebooks) == 16
